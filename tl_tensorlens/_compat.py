"""Version shims between TransformerLens 3.x (HookedTransformer + Bridge) and 4.x (Bridge only)."""

import importlib.metadata
from typing import Any


def tl_version() -> tuple[int, int]:
    """(major, minor) of the installed transformer_lens."""
    parts = importlib.metadata.version("transformer_lens").split(".")
    return int(parts[0]), int(parts[1])


def has_hooked_transformer() -> bool:
    """True where ``transformer_lens.HookedTransformer`` exists (TL < 4)."""
    return tl_version()[0] < 4


def force_eager(hf_model: Any) -> None:
    """Switch a Hugging Face model to eager attention so its attention hooks fire.

    TL 4.x ships ``force_eager_attention``; 3.9 does not, so fall back to the public HF API.
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


def bridge_from_hf(hf_model: Any, tokenizer: Any = None) -> Any:
    """Wrap an in-memory Hugging Face model in a ``TransformerBridge`` with no network access.

    The model is put in eval mode (random-init HF models start in train mode, with dropout on)
    and switched to eager attention, which the bridge needs for ``hook_pattern`` to fire.
    """
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    hf_model.eval()
    force_eager(hf_model)
    config = hf_model.config
    if not getattr(config, "architectures", None):
        config.architectures = [type(hf_model).__name__]
    return build_bridge_from_module(hf_model, type(hf_model).__name__, hf_config=config, tokenizer=tokenizer)
