"""The one place that answers backend questions: which TransformerLens line, which model class,
encoder or decoder, which output a method explains, which hook holds a block's output.

TransformerLens 3.x has ``HookedTransformer``, ``HookedEncoder`` and ``TransformerBridge``; 4.x only
the Bridge. Every other module asks here instead of testing class names or config fields itself, so
a TL change is met in one file. Shims say when they can go.
"""

import contextlib
import importlib.metadata
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from tl_tensorlens.errors import ArgumentError, UnsupportedModelError

#: What a model is, as far as the replay cares: TL's HookedTransformer, HookedEncoder, or a Bridge.
ModelKind = Literal["hooked", "encoder", "bridge"]
#: A loader's choice of TL class family.
BackendChoice = Literal["auto", "hooked", "bridge"]
#: The output points a lens or replay can read.
OutputPoint = Literal["resid_post", "ln_final", "logits"]
OUTPUT_POINTS: tuple[str, ...] = ("resid_post", "ln_final", "logits")

# Hugging Face class-name prefixes of bidirectional encoders the Bridge can wrap. TL 3.9 reports a
# BERT bridge's attention_dir as "causal", so the architecture name is the reliable test.
_ENCODER_PREFIXES = ("Bert", "Roberta", "XLMRoberta", "DistilBert", "Albert", "Electra", "Deberta")


def tl_version() -> tuple[int, int]:
    """(major, minor) of the installed transformer_lens.

    Example:
        >>> tl_version()[0] in (3, 4)
        True
    """
    parts = importlib.metadata.version("transformer_lens").split(".")
    return int(parts[0]), int(parts[1])


def has_hooked_transformer() -> bool:
    """True where ``transformer_lens.HookedTransformer`` exists (TL < 4)."""
    return tl_version()[0] < 4


def _mro_names(model: Any) -> set[str]:
    return {c.__name__ for c in type(model).__mro__}


def model_kind(model: Any) -> ModelKind:
    """``"hooked"`` (HookedTransformer), ``"encoder"`` (HookedEncoder) or ``"bridge"`` (TransformerBridge).

    Raises:
        UnsupportedModelError: ``model`` is none of the three.
    """
    names = _mro_names(model)
    if "TransformerBridge" in names:
        return "bridge"
    if "HookedEncoder" in names:
        return "encoder"
    if "HookedTransformer" in names:
        return "hooked"
    raise UnsupportedModelError(
        {"model type": f"{type(model).__name__} is not a HookedTransformer, HookedEncoder or TransformerBridge"}
    )


def is_bridge(model: Any) -> bool:
    """True for a ``TransformerBridge`` (either TL line)."""
    return "TransformerBridge" in _mro_names(model)


def architecture(model: Any) -> str:
    """The Hugging Face architecture name (``cfg.original_architecture`` on HookedTransformer,
    ``cfg.architecture`` on the Bridge), or ``""``."""
    cfg = getattr(model, "cfg", None)
    arch = getattr(cfg, "original_architecture", None) or getattr(cfg, "architecture", None) or ""
    return str(arch)


def is_encoder(model: Any) -> bool:
    """True for bidirectional encoders (HookedEncoder, or a BERT-family bridge): their classifier
    reads a position (``[CLS]``) of the last block's output, not a next-token unembedding."""
    if "HookedEncoder" in _mro_names(model):
        return True
    if is_bridge(model) and architecture(model).startswith(_ENCODER_PREFIXES):
        return True
    return getattr(getattr(model, "cfg", None), "attention_dir", "causal") == "bidirectional"


def is_post_ln(model: Any) -> bool:
    """True for BERT-style post-LN encoders, where the norms sit after each residual sum."""
    return is_encoder(model)


def has_unembedding(model: Any) -> bool:
    """True for decoders with an unembedding the next-token logits come from."""
    return not is_encoder(model) and getattr(model, "unembed", None) is not None


def default_output(model: Any) -> OutputPoint:
    """The output point a class-agnostic method explains: ``"resid_post"`` for encoders (the final
    hidden state a classifier head reads), ``"ln_final"`` for decoders (what the unembedding reads)."""
    return "resid_post" if is_encoder(model) else "ln_final"


def block_output_hook(hook_names: Mapping[str, Any] | Any, layer: int) -> str:
    """Hook name of block ``layer``'s output: HookedEncoder's post-LN blocks end at
    ``hook_normalized_resid_post``, every other block (bridge BERT included) at ``hook_resid_post``."""
    normed = f"blocks.{layer}.hook_normalized_resid_post"
    if normed in hook_names:
        return normed
    return f"blocks.{layer}.hook_resid_post"


def final_hidden_hook(model: Any) -> str:
    """Hook holding the last block's output (BERT's ``last_hidden_state``; a decoder's residual
    stream before ``ln_final``)."""
    return block_output_hook(model.hook_dict, int(model.cfg.n_layers) - 1)


def runs_parallel_blocks(model: Any) -> bool:
    """True where the model's blocks really add attention and MLP in parallel
    (``x + attn(ln1 x) + mlp(ln2 x)``). ``cfg.parallel_attn_mlp`` alone is not enough: TL's
    ``boot_native`` ``NativeBlock`` ignores it and always runs attention, then the MLP on the updated
    residual (TL 3.9 and 4.3), so a native bridge configured as parallel computes sequential blocks."""
    if not getattr(model.cfg, "parallel_attn_mlp", False):
        return False
    inner = getattr(model.blocks[0], "_original_component", None)
    return type(inner).__name__ != "NativeBlock"


def float32_norms_in_float64(model: Any) -> bool:
    """True where the model's own norms compute in float32 even in a float64 model (Hugging Face
    RMSNorm and TL's native RMSNorm upcast/downcast through float32): the model is then only
    float32-accurate, while the frozen replay (the bridge's own float64 norm path) stays exact."""
    return is_bridge(model) and getattr(model.cfg, "normalization_type", None) in ("RMS", "RMSPre")


def resolve_backend(backend: str) -> Literal["hooked", "bridge"]:
    """Turn ``"auto"`` into a concrete backend and check the choice against the installed TL.

    ``"auto"`` picks ``"hooked"`` on TransformerLens 3.x and ``"bridge"`` on 4.x.

    Raises:
        ArgumentError: ``backend`` is not one of the three names.
        UnsupportedModelError: ``"hooked"`` was asked for on TransformerLens >= 4.

    Example:
        >>> resolve_backend("bridge")
        'bridge'
    """
    if backend not in ("auto", "hooked", "bridge"):
        raise ArgumentError("backend", backend, "'auto', 'hooked' or 'bridge'")
    if backend == "auto":
        return "hooked" if has_hooked_transformer() else "bridge"
    if backend == "hooked" and not has_hooked_transformer():
        major, minor = tl_version()
        raise UnsupportedModelError(
            {
                "backend": f"'hooked' needs TransformerLens < 4 (HookedTransformer/HookedEncoder "
                f"were removed in 4.0; installed {major}.{minor}); use backend='bridge'"
            }
        )
    return backend  # type: ignore[return-value]


def force_eager(hf_model: Any) -> None:
    """Switch a Hugging Face model to eager attention so its attention hooks fire.

    Shim: TL 4.x ships ``force_eager_attention``; 3.9 does not, so fall back to the public HF API
    (remove the fallback when TL 3.x support ends).
    """
    try:
        from transformer_lens.utilities.attn_implementation import (  # type: ignore[import-not-found]
            force_eager_attention,
        )

        force_eager_attention(hf_model)
        return
    except ImportError:
        pass
    if hasattr(hf_model, "set_attn_implementation"):
        hf_model.set_attn_implementation("eager")
    else:  # pragma: no cover - very old transformers
        hf_model.config._attn_implementation = "eager"


def bridge_from_hf(hf_model: Any, tokenizer: Any = None, *, model_name: str | None = None) -> Any:
    """Wrap an in-memory Hugging Face model in a ``TransformerBridge`` with no network access.

    With a tokenizer, TL's public loader builds it: ``TransformerBridge.boot_transformers(name,
    hf_model=..., tokenizer=...)`` (``HF_HUB_OFFLINE=1`` is set for the call, so nothing is fetched).
    Without one (models built from a config, in tests), ``boot_transformers`` would fetch a tokenizer
    from the hub, so the private ``build_bridge_from_module`` is the documented fallback — remove it
    once ``boot_transformers`` accepts ``hf_model`` without a tokenizer offline.

    The model is put in eval mode (random-init HF models start in train mode, with dropout on) and
    switched to eager attention, which the bridge needs for ``hook_pattern`` to fire.
    """
    hf_model.eval()
    force_eager(hf_model)
    config = hf_model.config
    if not getattr(config, "architectures", None):
        config.architectures = [type(hf_model).__name__]
    dtype = next(hf_model.parameters()).dtype
    if tokenizer is not None:
        from transformer_lens.model_bridge import TransformerBridge

        previous = os.environ.get("HF_HUB_OFFLINE")
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bridge = TransformerBridge.boot_transformers(
                    model_name or type(hf_model).__name__, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype
                )
        finally:
            if previous is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = previous
        return bridge.eval()
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    return build_bridge_from_module(hf_model, type(hf_model).__name__, hf_config=config, tokenizer=None).eval()


@contextlib.contextmanager
def bridge_edit_warnings_silenced() -> Iterator[None]:
    """Silence the Bridge's warnings about the edits the replay makes on purpose.

    Editing ``hook_scale`` moves a bridge norm onto its own float64-exact path (that is the point),
    and BERT-on-Bridge ``hook_pattern`` edits are dropped — the replay rebuilds ``hook_z`` there.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="A forward hook edited hook_scale")
        warnings.filterwarnings("ignore", message=r"A hook on .*hook_pattern returned a modified tensor")
        yield
