"""The method registry: every relevance method under one signature.

A method is ``fn(model, state, *, position=None, target=None) -> Float[Tensor, "pos_out pos_in"]``:
the N×N relevance map, rows = output (dest) positions, columns = input (src) positions, computed
from one capture (``state``: a ``FrozenState`` or the activation dict of one forward, batch 1).
``position`` is the output row the caller needs and ``target`` the class/token to explain; the
class-agnostic baselines ignore both. Methods whose cost grows with the number of rows (the tensor
collapses) compute only row ``position`` when it is given and fill the other rows with NaN.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from jaxtyping import Float
from torch import Tensor

from tl_tensorlens.errors import TensorLensError


@runtime_checkable
class RelevanceMethod(Protocol):
    """The one signature of every registered method."""

    def __call__(
        self, model: Any, state: Any, *, position: int | None = None, target: Any = None
    ) -> Float[Tensor, "pos_out pos_in"]: ...


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: its name, function and a one-line description."""

    name: str
    fn: RelevanceMethod
    description: str = ""


_REGISTRY: dict[str, MethodInfo] = {}


def register_method(
    name: str, fn: RelevanceMethod | Callable[..., Tensor], *, description: str = "", overwrite: bool = False
) -> None:
    """Register ``fn`` under ``name`` (see the module docstring for the signature).

    Raises:
        TensorLensError: if ``name`` is taken and ``overwrite`` is False.

    Example:
        >>> import torch
        >>> from tl_tensorlens.baselines import register_method, get_method, unregister_method
        >>> def uniform(model, state, *, position=None, target=None):
        ...     n = state["blocks.0.hook_resid_pre"].shape[1]
        ...     return torch.full((n, n), 1.0 / n)
        >>> register_method("uniform", uniform)
        >>> get_method("uniform")(None, {"blocks.0.hook_resid_pre": torch.zeros(1, 2, 4)})
        tensor([[0.5000, 0.5000],
                [0.5000, 0.5000]])
        >>> unregister_method("uniform")
    """
    if not callable(fn):
        raise TensorLensError(f"method {name!r} must be callable, got {type(fn).__name__}")
    if name in _REGISTRY and not overwrite:
        raise TensorLensError(f"a method named {name!r} is already registered (pass overwrite=True)")
    _REGISTRY[name] = MethodInfo(name, fn, description)  # type: ignore[arg-type]


def unregister_method(name: str) -> None:
    """Remove a registered method (a library error if there is none)."""
    if name not in _REGISTRY:
        raise TensorLensError(f"no method named {name!r}; registered: {list_methods()}")
    del _REGISTRY[name]


def get_method(name: str) -> RelevanceMethod:
    """The function registered under ``name``; a library error lists the known names."""
    try:
        return _REGISTRY[name].fn
    except KeyError:
        raise TensorLensError(f"no method named {name!r}; registered: {list_methods()}") from None


def method_info(name: str) -> MethodInfo:
    """Name, function and description of a registered method."""
    get_method(name)
    return _REGISTRY[name]


def list_methods() -> list[str]:
    """Names of the registered methods, in registration order."""
    return list(_REGISTRY)
