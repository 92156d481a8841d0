"""The tensor collapses as registry methods: ``tensor_norm``, ``tensor_in_out``, ``tensor_in_class``.

Each builds a :class:`~tl_tensorlens.tensors.TensorLens` on the capture at the output the method
explains (:func:`tl_tensorlens._backend.default_output`: the final hidden state a classifier reads
for encoders, the unembedding input for decoders) and collapses it (paper Sec. 3.5): Norm (Eq. 21),
In+Out (Eq. 22) and In+Class (Eq. 24, class-specific: ``target`` is a token id, one id per output
position, or a readout direction ``[d_out]`` such as a classifier head's column).
"""

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_tensorlens._backend import OutputPoint, default_output
from tl_tensorlens._checks import as_position
from tl_tensorlens.errors import ArgumentError

#: The tensor collapses, registered under the same signature as the baselines.
TENSOR_METHODS: tuple[str, ...] = ("tensor_norm", "tensor_in_out", "tensor_in_class")
#: The Hutchinson estimate of the Norm collapse (16 probes per row), for models where the exact one
#: (d_out VJPs per row) is too costly.
RANDOMIZED_NORM = "tensor_norm_randomized"
_KINDS = {"tensor_norm": "norm", "tensor_in_out": "in_out", "tensor_in_class": "in_class"}


def _lens(model: Any, state: Any, output: OutputPoint | None) -> Any:
    from tl_tensorlens.capture import FrozenState
    from tl_tensorlens.tensors import TensorLens

    if not isinstance(state, FrozenState):
        raise ArgumentError(
            "state",
            type(state).__name__,
            "a FrozenState from tl_tensorlens.capture (tensor methods need the frozen values)",
        )
    return TensorLens.from_state(model, state, output=output or default_output(model))


def rows(lens: Any, position: int | None, kind: str, **kwargs: Any) -> Tensor:
    """All rows of a collapse, or only row ``position`` with the other rows NaN (so nobody mistakes
    an uncomputed row for data)."""
    n = lens.n_pos
    if position is None:
        return lens.collapse(kind, **kwargs)
    p = as_position("position", position, n)
    row = lens.collapse(kind, positions=[p], **kwargs)
    full = torch.full((n, row.shape[-1]), float("nan"), dtype=row.dtype, device=row.device)
    full[p] = row[0]
    return full


def readout_kwargs(target: Any) -> dict[str, Any]:
    """``target`` of a class-specific method as ``collapse("in_class", ...)`` keywords: a float
    tensor is a readout direction, integers are token ids."""
    if target is None:
        raise ArgumentError("target", None, "a token id, one id per output position, or a readout direction [d_out]")
    if isinstance(target, Tensor) and target.is_floating_point():
        return {"direction": target}
    return {"token": target}


def make_tensor_method(name: str, *, output: OutputPoint | None = None) -> Any:
    """A registry method for one tensor collapse (``"tensor_norm"``, ``"tensor_in_out"`` or
    ``"tensor_in_class"``) at ``output`` (default: :func:`~tl_tensorlens._backend.default_output`)."""
    if name not in _KINDS:
        raise ArgumentError("name", name, f"one of {TENSOR_METHODS}")
    kind = _KINDS[name]

    def method(
        model: Any, state: Any, *, position: int | None = None, target: Any = None
    ) -> Float[Tensor, "pos_out pos_in"]:
        lens = _lens(model, state, output)
        if kind != "in_class":
            return rows(lens, position, kind)
        return rows(lens, position, kind, **readout_kwargs(target))

    method.__name__ = name
    return method


def make_randomized_norm_method(probes: int = 16, *, seed: int = 0, output: OutputPoint | None = None) -> Any:
    """A registry method for :meth:`~tl_tensorlens.tensors.TensorLens.collapse_randomized_norm`: the
    unbiased estimate of ``‖T[i, :, j, :]‖²_F`` from ``probes`` Rademacher VJPs per row, returned as its
    square root (``RandomizedNorm.norm``). The probes are seeded, so a resumed run recomputes the same map."""

    def method(
        model: Any, state: Any, *, position: int | None = None, target: Any = None
    ) -> Float[Tensor, "pos_out pos_in"]:
        lens = _lens(model, state, output)
        n = lens.n_pos
        rows_ = list(range(n)) if position is None else [as_position("position", position, n)]
        est = lens.collapse_randomized_norm(probes, positions=rows_, seed=seed).norm
        full = torch.full((n, n), float("nan"), dtype=est.dtype, device=est.device)
        full[rows_] = est
        return full

    method.__name__ = f"{RANDOMIZED_NORM}_{probes}"
    return method


__all__ = [
    "RANDOMIZED_NORM",
    "TENSOR_METHODS",
    "make_randomized_norm_method",
    "make_tensor_method",
    "readout_kwargs",
    "rows",
]
