"""The built-in methods: 8 attention-aggregation baselines, the tensor collapses, a random control."""

import zlib
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_tensorlens.baselines._common import activations_of, is_post_ln, read
from tl_tensorlens.baselines._cross import layer_mean, rollout
from tl_tensorlens.baselines._intra import layer_maps
from tl_tensorlens.baselines._registry import register_method
from tl_tensorlens.errors import TensorLensError

#: The eight baselines of the paper (Sec. 4.1): intra-layer × cross-layer.
BASELINES: tuple[str, ...] = (
    "attn_rollout",
    "w_attn_rollout",
    "w_attn_res_ln_rollout",
    "globenc_rollout",
    "attn_mean",
    "w_attn_mean",
    "w_attn_res_ln_mean",
    "globenc_mean",
)
#: ALTI (Ferrando et al. 2022): not among the paper's eight, registered beside them.
ALTI = "alti_rollout"
#: Every attention-aggregation baseline: the paper's eight, then ALTI.
ALL_BASELINES: tuple[str, ...] = (*BASELINES, ALTI)
#: The tensor collapses (Norm, In+Out, In+Class), registered under the same signature.
TENSOR_METHODS: tuple[str, ...] = ("tensor_norm", "tensor_in_out", "tensor_in_class")


def _make_baseline(intra: str, cross: str) -> Any:
    # Maps that already hold the residual must not get Abnar's 0.5·I added on top.
    has_residual = intra in ("w_attn_res_ln", "globenc", "alti")

    def method(
        model: Any, state: Any, *, position: int | None = None, target: Any = None
    ) -> Float[Tensor, "pos_out pos_in"]:
        maps = layer_maps(model, state, intra)  # type: ignore[arg-type]
        if cross == "rollout":
            return rollout(maps, add_identity=not has_residual)
        return layer_mean(maps)

    method.__name__ = f"{intra}_{cross}"
    method.__doc__ = (
        f"Baseline {intra} × {cross}: see tl_tensorlens.baselines._intra (formulas, adaptation to "
        f"pre-LN/GQA/gated models) and tl_tensorlens.baselines._cross."
    )
    return method


def _seq_len(state: Any) -> int:
    return int(read(activations_of(state), "blocks.0.hook_resid_pre").shape[0])


def random_method(
    model: Any, state: Any, *, position: int | None = None, target: Any = None, seed: int = 0
) -> Float[Tensor, "pos_out pos_in"]:
    """Random-ranking control: i.i.d. uniform relevance, seeded by the input itself.

    The seed mixes ``seed`` with a CRC of the capture's ``blocks.0.hook_resid_pre``, so the same
    input always gets the same ranking (a resumed run recomputes identical rows) while different
    inputs get independent rankings.
    """
    x0 = read(activations_of(state), "blocks.0.hook_resid_pre")
    digest = zlib.crc32(x0.detach().to(torch.float64).cpu().numpy().tobytes())
    gen = torch.Generator().manual_seed((digest * 1_000_003 + seed) % (2**63))
    n = x0.shape[0]
    return torch.rand(n, n, generator=gen, dtype=torch.float64)


def _lens(model: Any, state: Any, output: Any) -> Any:
    """Build a TensorLens from the capture (imported here: the tensor engine is not needed by the
    attention baselines)."""
    from tl_tensorlens.tensors import TensorLens

    if output is None:
        output = "resid_post" if is_post_ln(model) else "ln_final"
    if hasattr(state, "frozen"):
        return TensorLens.from_state(model, state, output=output)
    tokens = getattr(state, "tokens", None)
    if tokens is None:
        raise TensorLensError(
            "tensor methods need a FrozenState from tl_tensorlens.capture (or an object with "
            ".tokens); a plain activation dict does not say which tokens it came from"
        )
    return TensorLens.from_model(model, tokens, output=output)


def _rows(lens: Any, n: int, position: int | None, kind: str, **kwargs: Any) -> Tensor:
    if position is None:
        return lens.collapse(kind, **kwargs)
    if not -n <= position < n:
        raise TensorLensError(f"position {position} is outside a sequence of length {n}")
    position = position % n
    row = lens.collapse(kind, positions=[position], **kwargs)
    # Only the requested row is computed: the others are NaN so nobody mistakes them for data.
    full = torch.full((n, row.shape[-1]), float("nan"), dtype=row.dtype, device=row.device)
    full[position] = row[0]
    return full


def make_tensor_method(collapse: str, *, output: str | None = None) -> Any:
    """A registry method for one tensor collapse.

    Args:
        collapse: ``"norm"`` (Eq. 21), ``"in_out"`` (Eq. 22) or ``"in_class"`` (Eq. 24: ``target``
            is a readout direction ``Float[Tensor, "d_out"]`` -> ``collapse("class", direction=...)``,
            or a token id -> ``collapse("logit", token=...)``).
        output: the tensor's output point; default ``"resid_post"`` for post-LN encoders (the final
            hidden state a classifier head reads) and ``"ln_final"`` for decoders (what the
            unembedding reads).
    """
    if collapse not in ("norm", "in_out", "in_class"):
        raise TensorLensError(f"unknown tensor collapse {collapse!r}")

    def method(
        model: Any, state: Any, *, position: int | None = None, target: Any = None
    ) -> Float[Tensor, "pos_out pos_in"]:
        n = _seq_len(state)
        lens = _lens(model, state, output)
        if collapse != "in_class":
            return _rows(lens, n, position, collapse)
        if target is None:
            raise TensorLensError("tensor_in_class needs target= (a class direction or a token id)")
        if isinstance(target, Tensor) and target.is_floating_point():
            return _rows(lens, n, position, "class", direction=target)
        return _rows(lens, n, position, "logit", token=int(target))

    method.__name__ = f"tensor_{collapse}"
    return method


def _register_builtins() -> None:
    descriptions = {
        "attn": "head-mean attention pattern",
        "w_attn": "value-weighted norms (Kobayashi et al. 2020)",
        "w_attn_res_ln": "+ residual and norm (Kobayashi et al. 2021)",
        "globenc": "+ second norm (Modarressi et al. 2022, GlobEnc)",
        "alti": "L1 contributions to the ResLN output (Ferrando et al. 2022, ALTI)",
    }
    for name in ALL_BASELINES:
        intra, cross = name.rsplit("_", 1)
        register_method(name, _make_baseline(intra, cross), description=f"{descriptions[intra]}, {cross}")
    register_method("tensor_norm", make_tensor_method("norm"), description="TensorLens Norm (Eq. 21)")
    register_method("tensor_in_out", make_tensor_method("in_out"), description="TensorLens In+Out (Eq. 22)")
    register_method("tensor_in_class", make_tensor_method("in_class"), description="TensorLens In+Class (Eq. 24)")
    register_method("random", random_method, description="random-ranking control")
