"""Shared plumbing for the baselines: reading a capture, per-token norms, row normalization."""

from collections.abc import Mapping
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_tensorlens.errors import TensorLensError


def activations_of(state: Any) -> Mapping[str, Tensor]:
    """The activation dict of a capture.

    Accepts a ``FrozenState`` (reads ``state.activations``), a plain dict or a TransformerLens
    ``ActivationCache`` of one forward with batch dimension 1.
    """
    acts = getattr(state, "activations", state)
    if not hasattr(acts, "__getitem__") or not hasattr(acts, "keys"):
        raise TensorLensError(f"expected a FrozenState or a dict of activations, got {type(state).__name__}")
    return acts


def read(acts: Mapping[str, Tensor], name: str) -> Tensor:
    """``acts[name]`` without the batch dimension; a library error names a missing hook."""
    try:
        value = acts[name]
    except KeyError:
        raise TensorLensError(
            f"the capture has no activation {name!r}; baselines need the full run_with_cache of one forward (batch 1)"
        ) from None
    if value.shape[0] != 1:
        raise TensorLensError(f"{name} has batch size {value.shape[0]}; baselines need batch 1")
    return value[0]


def n_layers_of(model: Any) -> int:
    return int(model.cfg.n_layers)


def is_post_ln(model: Any) -> bool:
    """True for BERT-style post-LN encoders (HookedEncoder), where the norms sit after each sum."""
    if any(c.__name__ == "HookedEncoder" for c in type(model).__mro__):
        return True
    # HookedTransformer configs name the HF class in original_architecture, bridges in architecture.
    cfg = model.cfg
    arch = getattr(cfg, "original_architecture", None) or getattr(cfg, "architecture", None) or ""
    return str(arch).startswith("Bert")


def is_bridge(model: Any) -> bool:
    return any(c.__name__ == "TransformerBridge" for c in type(model).__mro__)


def row_normalize(m: Float[Tensor, "... pos_out pos_in"]) -> Float[Tensor, "... pos_out pos_in"]:
    """Divide each row by its sum; rows that sum to 0 stay 0 (never NaN)."""
    total = m.sum(-1, keepdim=True)
    # A zero row (e.g. a position no method gives any mass) must not become NaN and poison rollout.
    return torch.where(total != 0, m / torch.where(total != 0, total, torch.ones_like(total)), m)


def submodule_or_none(model: Any, name: str | None) -> Any:
    """``model.get_submodule(name)``, or None where the model has no such module."""
    if not name:
        return None
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def norm_linear_part(
    model: Any,
    acts: Mapping[str, Tensor],
    name: str,
    pieces: Float[Tensor, "pos_out pos_in d_model"],
) -> Float[Tensor, "pos_out pos_in d_model"]:
    """Apply the frozen linear part of norm module ``name`` to each piece of a decomposed sum.

    A norm reading a sum ``y_i = Σ_j p_ij`` is linear in each piece once its per-token scale is
    frozen (Kobayashi et al. 2021, Eq. 7-8): ``LN(y_i) - β = Σ_j γ ⊙ (p_ij - mean(p_ij)) / s_i``
    with ``s_i = sqrt(var(y_i) + eps)`` the scale of the real sum (TL's ``hook_scale``). RMS norms
    skip the centering; ``*Pre`` norms have no gain; a missing norm (``normalization_type=None``)
    is the identity. The bias β is left out, as in the authors' code.

    Args:
        model: the TransformerLens model (for the norm module and its gain ``w``).
        acts: activations of one forward.
        name: dotted module name, e.g. ``"blocks.0.ln2"`` or ``"ln_final"``.
        pieces: ``p_ij`` indexed [pos_out(i), pos_in(j), d_model].
    """
    module = submodule_or_none(model, name)
    if module is None:
        return pieces
    kind = type(module).__name__
    if kind in ("Identity",):
        return pieces
    if is_bridge(model):
        # Bridge norm modules are generic wrappers: the config says which norm it is.
        kind = {"LN": "LayerNorm", "LNPre": "LayerNormPre", "RMS": "RMSNorm", "RMSPre": "RMSNormPre"}.get(
            str(getattr(model.cfg, "normalization_type", "LN")), "LayerNorm"
        )
    scale_name = f"{name}.hook_scale"
    if scale_name not in acts:
        raise TensorLensError(f"norm {name!r} ({kind}) has no {scale_name!r} in the capture; cannot freeze its scale")
    scale = read(acts, scale_name)
    if scale.dim() == 3:
        # use_split_qkv_input: ln1 fires per head with identical copies; keep one.
        scale = scale[:, 0, :]
    out = pieces
    if "RMS" not in kind:
        out = out - out.mean(-1, keepdim=True)
    out = out / scale.to(out.dtype)[:, None, :]
    w = getattr(module, "w", None)
    if isinstance(w, Tensor) and kind not in ("LayerNormPre", "RMSNormPre"):
        w = w.detach().to(out.dtype)
        if is_bridge(model) and getattr(model.cfg, "rmsnorm_uses_offset", False):
            # Gemma's HF RMSNorm multiplies by (1 + weight); HookedTransformer folds the 1 in.
            w = 1 + w
        out = out * w
    return out
