"""Argument checks shared by every public function: nothing is silently coerced.

Each check returns the normalized value or raises :class:`~tl_tensorlens.errors.ArgumentError`
naming the argument, the value and what is allowed. Booleans are not integers here, floats are not
token ids, and a string is not a number.
"""

import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from tl_tensorlens.errors import ArgumentError


def is_int(value: Any) -> bool:
    """True for Python/NumPy integers and 0-d integer tensors; False for bools and floats."""
    if isinstance(value, bool):
        return False
    if isinstance(value, Tensor):
        return value.ndim == 0 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_int(name: str, value: Any, *, lo: int | None = None, hi: int | None = None, allowed: str = "") -> int:
    """``value`` as an ``int`` within ``[lo, hi]`` (inclusive bounds, None = unbounded)."""
    what = allowed or ("an integer" + (f" in {lo}..{hi}" if lo is not None and hi is not None else ""))
    if not is_int(value):
        raise ArgumentError(name, value, what)
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ArgumentError(name, value, what)
    return v


def as_position(name: str, value: Any, n: int) -> int:
    """An output/input position of a prompt of ``n`` tokens; negative values count from the end."""
    allowed = f"an integer in 0..{n - 1} (or -{n}..-1 from the end)"
    v = as_int(name, value, allowed=allowed)
    if not -n <= v < n:
        raise ArgumentError(name, value, allowed)
    return v % n


def as_positions(name: str, value: Any, n: int) -> list[int]:
    """None (every position), one position, or a sequence / 1-d integer tensor of positions."""
    if value is None:
        return list(range(n))
    if isinstance(value, Tensor) and value.ndim == 1:
        value = value.tolist()
    if is_int(value):
        return [as_position(name, value, n)]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ArgumentError(name, value, f"None, a position, or a sequence of positions in 0..{n - 1}")
    out = [as_position(name, v, n) for v in value]
    if not out:
        raise ArgumentError(name, value, "at least one position (None for all)")
    return out


def as_layer_range(value: Any, n_layers: int) -> tuple[int, int]:
    """``layers=(start, stop)``: two integers with ``0 <= start < stop <= n_layers``."""
    allowed = f"(start, stop) with 0 <= start < stop <= n_layers={n_layers}"
    if value is None:
        return 0, n_layers
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ArgumentError("layers", value, allowed)
    start = value[0]
    stop = n_layers if value[1] is None else value[1]
    if not is_int(start) or not is_int(stop) or not 0 <= int(start) < int(stop) <= n_layers:
        raise ArgumentError("layers", value, allowed)
    return int(start), int(stop)


def as_heads(
    value: Any, n_layers: int, n_heads: int, layer_range: tuple[int, int]
) -> dict[int, tuple[int, ...]] | None:
    """``heads={layer: [head, ...]}`` with every layer inside ``layer_range`` and heads in range."""
    if value is None:
        return None
    start, stop = layer_range
    if not isinstance(value, Mapping):
        raise ArgumentError("heads", value, "a mapping {layer: [head, ...]} (e.g. {0: [1, 3]})")
    out: dict[int, tuple[int, ...]] = {}
    for layer, hs in value.items():
        layer_i = as_int("heads (layer)", layer, allowed=f"a layer in the lens's range {start}..{stop - 1}")
        if not start <= layer_i < stop:
            raise ArgumentError(
                "heads (layer)", layer, f"a layer in the lens's range {start}..{stop - 1} (layers=({start}, {stop}))"
            )
        if isinstance(hs, (str, bytes)) or not isinstance(hs, (Sequence, Tensor)) or is_int(hs):
            raise ArgumentError(f"heads[{layer_i}]", hs, f"a list of head indices in 0..{n_heads - 1} (e.g. [0, 2])")
        seq = hs.tolist() if isinstance(hs, Tensor) else list(hs)
        out[layer_i] = tuple(as_int(f"heads[{layer_i}]", h, lo=0, hi=n_heads - 1) for h in seq)
    return out


def as_token_ids(name: str, value: Any, d_vocab: int) -> Tensor:
    """Integer token ids in ``0..d_vocab-1`` as a long tensor (a scalar stays 0-d)."""
    allowed = f"integer token ids in 0..{d_vocab - 1}"
    if isinstance(value, Tensor):
        t = value
    elif is_int(value):
        t = torch.tensor(int(value))
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if not all(is_int(v) for v in value):
            raise ArgumentError(name, value, allowed)
        t = torch.tensor([int(v) for v in value], dtype=torch.long)
    else:
        raise ArgumentError(name, value, allowed)
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise ArgumentError(name, value, allowed + f" (got dtype {t.dtype})")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= d_vocab):
        bad = t[(t < 0) | (t >= d_vocab)].reshape(-1)[:5].tolist()
        raise ArgumentError(name, bad, allowed)
    return t.long()


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def as_bytes(name: str, value: Any) -> int:
    """A memory size: an integer number of bytes >= 1, or a string such as ``"4GiB"``, ``"512MB"``,
    ``"4e9"``.

    Example:
        >>> as_bytes("memory_budget", "4GiB"), as_bytes("memory_budget", 1024)
        (4294967296, 1024)
    """
    allowed = "a number of bytes >= 1 (an integer, or a string like '4GiB', '512MB', '4e9')"
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m is None:
            raise ArgumentError(name, value, allowed)
        nbytes = float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()]
    elif is_int(value):
        nbytes = float(int(value))
    elif isinstance(value, float) and value.is_integer():
        nbytes = value
    else:
        raise ArgumentError(name, value, allowed)
    if nbytes < 1 or nbytes != int(nbytes):
        raise ArgumentError(name, value, allowed)
    return int(nbytes)
