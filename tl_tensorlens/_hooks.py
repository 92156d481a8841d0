"""The one place that installs hooks on a model (the replay's read/feed primitives).

Every forward this library runs with hooks goes through :func:`hooks_on`: TransformerLens hooks via
``model.hooks(...)`` and the few plain PyTorch module hooks (for activations TL has no hook point
for) in the same ``try/finally``, so no hook survives a forward, also one that raises or is
interrupted. :class:`StopForward` is the one early-stop: a hook raises it with the value it read and
:func:`run` returns that value without computing the rest of the model.

It sits below :mod:`tl_tensorlens.capture` so that the capture can record with the same primitives;
:mod:`tl_tensorlens.replay` builds the frozen replay on them and re-exports the public ones.
"""

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from tl_tensorlens._backend import bridge_edit_warnings_silenced
from tl_tensorlens.errors import ReplayError

#: ``(hook name, fn(activation, hook) -> new activation or None)``, as TransformerLens takes them.
HookList = list[tuple[str, Callable[..., Any]]]
#: ``(module path, fn(module, inputs, output) -> new output or None)``: plain forward hooks.
ModuleHookList = list[tuple[str, Callable[..., Any]]]


class StopForward(Exception):
    """Raised from a hook to end the forward early; :func:`run` returns :attr:`value`."""

    def __init__(self, value: Any = None):
        super().__init__("forward stopped by a hook after reading what it needed")
        self.value = value


_REGISTRY_LOCK = threading.Lock()
_MODEL_LOCKS: "weakref.WeakKeyDictionary[Any, threading.RLock]" = weakref.WeakKeyDictionary()
_FROZEN_DEPTH: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()


def model_lock(model: Any) -> Any:
    """The re-entrant lock of ``model``: every hooked forward on it holds it.

    TransformerLens keeps hooks and its hook ``context_level`` on the model object, so two threads
    running hooked forwards on one model would see each other's hooks. This library serializes them
    instead: a second thread waits until the first one's forward (or ``linearized`` block) is done.
    """
    with _REGISTRY_LOCK:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


def frozen_replay_active(model: Any) -> bool:
    """True while a frozen replay (or a ``linearized`` block) has its hooks on ``model``."""
    return _FROZEN_DEPTH.get(model, 0) > 0


@contextlib.contextmanager
def hooks_on(
    model: Any,
    fwd_hooks: Sequence[tuple[str, Callable[..., Any]]] = (),
    module_hooks: Sequence[tuple[str, Callable[..., Any]]] = (),
    *,
    frozen: bool = False,
) -> Iterator[Any]:
    """Context in which ``model`` carries ``fwd_hooks`` (TL hook points) and ``module_hooks``.

    All are removed on exit, also when the body raises. The model's lock (:func:`model_lock`) is held
    throughout; ``frozen=True`` marks a frozen replay as active (a capture then refuses to run). The
    Bridge's warnings about edits made on purpose (norm scales, BERT's observational pattern) are
    silenced inside.
    """
    handles = []
    with model_lock(model):
        if frozen:
            _FROZEN_DEPTH[model] = _FROZEN_DEPTH.get(model, 0) + 1
        try:
            for path, fn in module_hooks:
                handles.append(model.get_submodule(path).register_forward_hook(fn))
            with bridge_edit_warnings_silenced(), model.hooks(fwd_hooks=list(fwd_hooks)):
                yield model
        finally:
            for h in handles:
                h.remove()
            if frozen:
                _FROZEN_DEPTH[model] -= 1


def run(
    model: Any,
    tokens: Tensor,
    fwd_hooks: Sequence[tuple[str, Callable[..., Any]]] = (),
    module_hooks: Sequence[tuple[str, Callable[..., Any]]] = (),
) -> Any:
    """``model(tokens)`` with the hooks installed; the value of a :class:`StopForward` if one is raised."""
    try:
        with hooks_on(model, fwd_hooks, module_hooks):
            return model(tokens)
    except StopForward as stop:
        return stop.value


def record(
    model: Any,
    tokens: Tensor,
    names: Sequence[str],
    *,
    fwd_hooks: Sequence[tuple[str, Callable[..., Any]]] = (),
    stop_after: str | None = None,
    detach: bool = True,
) -> tuple[Any, dict[str, Tensor]]:
    """Run ``model(tokens)`` and keep the activations at ``names`` (detached).

    Records under the name asked for (on a TransformerBridge ``hook.name`` is the canonical name,
    e.g. ``blocks.0.hook_in`` for ``blocks.0.hook_resid_pre``). With ``stop_after`` (one of
    ``names``) the forward ends once that hook fired and the returned output is None.
    ``detach=False`` keeps the activations in the autograd graph (to differentiate through them).

    Raises:
        ReplayError: a requested hook did not fire.

    Returns:
        ``(model output or None, {name: activation})``.
    """
    kept: dict[str, Tensor] = {}

    def keeper(name: str) -> Callable[..., None]:
        def keep(act: Tensor, hook: Any) -> None:
            kept[name] = act.detach() if detach else act
            if name == stop_after and all(n in kept for n in names):
                raise StopForward(None)

        return keep

    hooks = list(fwd_hooks) + [(n, keeper(n)) for n in dict.fromkeys(names)]
    out = run(model, tokens, hooks)
    missing = [n for n in names if n not in kept]
    if missing:
        raise ReplayError(f"hook(s) {missing} did not fire on {type(model).__name__}")
    return out, kept


def feed(name: str, value: Tensor) -> tuple[str, Callable[..., Tensor]]:
    """A hook that replaces the activation at ``name`` by ``value`` (same shape, refused otherwise)."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        if act.shape != value.shape:
            raise ReplayError(
                f"hook '{name}': fed value has shape {tuple(value.shape)}, model expects {tuple(act.shape)}"
            )
        return value

    return (name, hook)


def stop_at(name: str, transform: Callable[[Tensor], Tensor] | None = None) -> tuple[str, Callable[..., None]]:
    """A hook that ends the forward at ``name``, returning the activation (optionally transformed)."""

    def hook(act: Tensor, hook: Any) -> None:
        raise StopForward(act if transform is None else transform(act))

    return (name, hook)


@contextlib.contextmanager
def recording_modules(model: Any, paths: Sequence[str]) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """Context recording the (detached) input and output of the modules at ``paths`` during whatever
    forward runs inside it — e.g. TL's own ``run_with_cache``, so a capture needs no second forward.
    The hooks are removed on exit, also when the body raises."""
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def recorder(path: str) -> Callable[..., None]:
        def rec(mod: Any, inp: Any, out: Tensor) -> None:
            seen[path] = (inp[0].detach(), out.detach())

        return rec

    handles = []
    with model_lock(model):
        try:
            for path in paths:
                handles.append(model.get_submodule(path).register_forward_hook(recorder(path)))
            yield seen
        finally:
            for h in handles:
                h.remove()


def module_io(model: Any, tokens: Tensor, paths: Sequence[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """Input and output of the modules at ``paths`` during one forward (for activations TL has no
    hook point for, e.g. the GELU inside a BERT MLM head)."""
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def recorder(path: str) -> Callable[..., None]:
        def rec(mod: Any, inp: Any, out: Tensor) -> None:
            seen[path] = (inp[0].detach(), out.detach())

        return rec

    if paths:
        with torch.no_grad():
            run(model, tokens, module_hooks=[(p, recorder(p)) for p in paths])
    return seen


__all__ = [
    "HookList",
    "ModuleHookList",
    "StopForward",
    "feed",
    "frozen_replay_active",
    "hooks_on",
    "model_lock",
    "module_io",
    "recording_modules",
    "record",
    "run",
    "stop_at",
]
