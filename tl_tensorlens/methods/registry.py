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

from tl_tensorlens._deprecation import warn_deprecated
from tl_tensorlens.errors import ArgumentError, TensorLensError

#: Old method names (0.1) -> their one name (0.2).
_RENAMED = {"tensor_logit": "tensor_in_class"}


@runtime_checkable
class RelevanceMethod(Protocol):
    """The one signature of every registered method."""

    def __call__(
        self, model: Any, state: Any, *, position: int | None = None, target: Any = None
    ) -> Float[Tensor, "pos_out pos_in"]: ...


@dataclass(frozen=True)
class MethodInfo:
    """A registered method.

    Attributes:
        name: the one name it is registered under.
        fn: the function.
        description: one line.
        family: ``"attention"`` (attention-aggregation baselines), ``"tensor"`` (TensorLens
            collapses), ``"gradient"`` (gradient baselines), ``"control"`` or ``"custom"``.
        class_specific: True when the map explains one class/token (``target`` is needed); such
            methods are compared with In+Class, the class-agnostic ones with the attention baselines.
    """

    name: str
    fn: RelevanceMethod
    description: str = ""
    family: str = "custom"
    class_specific: bool = False


_REGISTRY: dict[str, MethodInfo] = {}


def register_method(
    name: str,
    fn: RelevanceMethod | Callable[..., Tensor],
    *,
    description: str = "",
    family: str = "custom",
    class_specific: bool = False,
    overwrite: bool = False,
) -> None:
    """Register ``fn`` under ``name`` (see the module docstring for the signature).

    Raises:
        TensorLensError: if ``name`` is taken and ``overwrite`` is False.

    Example:
        >>> import torch
        >>> from tl_tensorlens.methods import register_method, get_method, unregister_method
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
    _REGISTRY[name] = MethodInfo(name, fn, description, family, class_specific)  # type: ignore[arg-type]


def _resolve(name: str) -> str:
    if isinstance(name, str) and name in _RENAMED and name not in _REGISTRY:
        warn_deprecated(f"method name {name!r}", repr(_RENAMED[name]), stacklevel=4)
        name = _RENAMED[name]
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ArgumentError("method", name, f"a registered method: {', '.join(list_methods())}")
    return name


def unregister_method(name: str) -> None:
    """Remove a registered method (a library error if there is none)."""
    del _REGISTRY[_resolve(name)]


def get_method(name: str) -> RelevanceMethod:
    """The function registered under ``name``; a library error lists the known names."""
    return _REGISTRY[_resolve(name)].fn


def method_info(name: str) -> MethodInfo:
    """Name, function, description, family and class-specificity of a registered method."""
    return _REGISTRY[_resolve(name)]


def list_methods(*, family: str | None = None, class_specific: bool | None = None) -> list[str]:
    """Names of the registered methods, in registration order (optionally filtered)."""
    return [
        m.name
        for m in _REGISTRY.values()
        if (family is None or m.family == family) and (class_specific is None or m.class_specific == class_specific)
    ]
