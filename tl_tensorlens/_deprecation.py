"""Deprecated names, kept for one release: renamed arguments, moved functions, moved modules.

Each old name still works and warns once per call site with a ``DeprecationWarning`` that gives the
new name. Version 0.2 introduced the aliases; version 0.3 removes them.
"""

import functools
import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from tl_tensorlens.errors import ArgumentError

F = TypeVar("F", bound=Callable[..., Any])
REMOVED_IN = "0.3"


def warn_deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn that ``old`` is deprecated in favour of ``new``."""
    warnings.warn(
        f"{old} is deprecated and will be removed in tl_tensorlens {REMOVED_IN}; use {new}",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def renamed_kwargs(**old_to_new: str) -> Callable[[F], F]:
    """Decorator: accept the old keyword names ``old_to_new`` as deprecated aliases.

    Example:
        >>> @renamed_kwargs(out_path="out")
        ... def save(*, out=None):
        ...     return out
        >>> import warnings
        >>> with warnings.catch_warnings(record=True):
        ...     warnings.simplefilter("always")
        ...     save(out_path="x")
        'x'
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise ArgumentError(old, kwargs[old], f"only one of {old!r} (deprecated) and {new!r}")
                    warn_deprecated(f"{fn.__qualname__}({old}=...)", f"{new}=...")
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def moved_names(module: str, moved: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that serves names moved elsewhere (``{"old": "pkg.mod:new"}``)."""

    def __getattr__(name: str) -> Any:
        target = moved.get(name)
        if target is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        mod, _, attr = target.partition(":")
        warn_deprecated(f"{module}.{name}", f"{mod}.{attr}")
        return getattr(importlib.import_module(mod), attr)

    return __getattr__


class _AliasModule(types.ModuleType):
    """A moved module: every attribute is looked up in the new modules."""

    _targets: tuple[str, ...] = ()

    def __getattr__(self, name: str) -> Any:
        for target in self._targets:
            mod = importlib.import_module(target)
            if hasattr(mod, name):
                return getattr(mod, name)
        raise AttributeError(
            f"module {self.__name__!r} (moved to {', '.join(self._targets)}) has no attribute {name!r}"
        )


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, targets: Sequence[str]):
        self.targets = tuple(targets)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _AliasModule(spec.name)
        module._targets = self.targets
        names: list[str] = []
        for target in self.targets:
            names += list(getattr(importlib.import_module(target), "__all__", []))
        module.__all__ = list(dict.fromkeys(names))  # type: ignore[attr-defined]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        # stacklevel 6: the import machinery sits between the user's import statement and here.
        warn_deprecated(f"module {module.__name__}", " / ".join(self.targets), stacklevel=6)


class _AliasFinder(importlib.abc.MetaPathFinder):
    def __init__(self, aliases: Mapping[str, Sequence[str]]):
        self.aliases = dict(aliases)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.aliases:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(self.aliases[fullname]))


def install_module_aliases(aliases: Mapping[str, Sequence[str]]) -> None:
    """Make ``import old.module`` work for modules that moved (``{old: [new, ...]}``), with a warning."""
    if not any(isinstance(f, _AliasFinder) and f.aliases == dict(aliases) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder(aliases))
