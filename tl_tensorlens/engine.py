"""The engine: rows and columns of an affine operator, computed in chunks under a memory budget.

For a fixed capture the replay ``F(x) = T x + c`` (:mod:`tl_tensorlens.replay`) is affine, so its
backward does not depend on the primal: one forward at batch 1 with its graph kept serves every
vector-Jacobian product (:class:`Pullback`), and forward-mode products need no primal at all
(:func:`pushforward`). Every tensor of :mod:`tl_tensorlens.tensors` is assembled from these two
primitives, in chunks of cotangents or tangents sized from the memory budget:

* reverse mode (:meth:`Engine.row_chunks`): ``Tᵀ g`` for cotangents ``g`` living on one output
  position ``i`` — ``d_out`` of them give the slice ``T[i]``, one readout vector per row gives the
  In+Out and class collapses, Rademacher probes give the Hutchinson estimate of the Norm collapse;
* forward mode (:meth:`Engine.column_chunks`): ``T t`` for tangents ``t`` — basis vectors give the
  full tensor column by column, ``x_j`` placed at position ``j`` gives the per-input contributions.

Causal captures (every frozen pattern lower-triangular) replay only the prefix ``<= i`` for output
position ``i``, which is exact (output ``i`` does not depend on later inputs).

**Memory.** Every request is estimated before anything is allocated: the result itself (which
cannot be chunked) plus the replay's activations for one chunk of work. When the result alone, or the
result plus the smallest chunk, exceeds the budget, :class:`~tl_tensorlens.errors.MemoryBudgetError`
is raised with the estimate and a cheaper request; otherwise the chunk size is chosen to fit. An
out-of-memory error inside a batched backward is raised as a ``MemoryBudgetError`` with the
estimate, never silently turned into a slower loop.
"""

import functools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tl_tensorlens._checks import as_bytes
from tl_tensorlens.capture import FrozenState
from tl_tensorlens.errors import MemoryBudgetError
from tl_tensorlens.replay import ReplaySpec, run

BUDGET_ENV = "TL_TENSORLENS_MEMORY_BUDGET"
_DEFAULT_BUDGET = 4 * 2**30
#: Share of a CUDA device's free memory the default budget takes (the rest is the allocator's slack).
CUDA_BUDGET_FRACTION = 0.8


def default_memory_budget(device: torch.device | str | None = None) -> int:
    """Bytes one request may allocate: ``TL_TENSORLENS_MEMORY_BUDGET`` (bytes or e.g. ``"4GiB"``);
    else, on a CUDA device, 80 % of its free memory; else 4 GiB.

    Raises:
        ArgumentError: the environment variable is not a size.

    Example:
        >>> default_memory_budget("cpu") > 0
        True
    """
    env = os.environ.get(BUDGET_ENV)
    if env:
        return as_bytes(BUDGET_ENV, env)
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(dev)
        return max(1, int(CUDA_BUDGET_FRACTION * free))
    return _DEFAULT_BUDGET


def resolve_memory_budget(value: Any, device: torch.device | str | None = None) -> int:
    """``memory_budget=`` as bytes (None: :func:`default_memory_budget` for ``device``)."""
    return default_memory_budget(device) if value is None else as_bytes("memory_budget", value)


def format_bytes(n: float | int) -> str:
    """``1536 -> '1.5 KiB'``.

    Example:
        >>> format_bytes(3 * 2**20)
        '3.0 MiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_budget(nbytes: int, budget: int, what: str, cheaper: str) -> None:
    """Refuse ``what`` when its estimated ``nbytes`` exceed ``budget``, naming a cheaper request."""
    if nbytes > budget:
        raise MemoryBudgetError(
            f"{what} needs an estimated {format_bytes(nbytes)}, over the memory budget of "
            f"{format_bytes(budget)} ({BUDGET_ENV} or memory_budget=); cheaper: {cheaper}"
        )


def progress_bar(total: int, desc: str, enabled: bool | None) -> Any:
    """A tqdm bar (None: shown only for long work, 32 steps or more)."""
    from tqdm.auto import tqdm

    disable = (total < 32) if enabled is None else not enabled
    return tqdm(total=total, desc=desc, disable=disable, leave=False)


#: The smallest chunk :meth:`Engine.cache_chunk` picks (smaller chunks starve the matmuls).
MIN_CHUNK = 8
#: Overrides the cache target of :func:`cache_target_bytes` (bytes, or a size like ``"8MiB"``).
CACHE_ENV = "TL_TENSORLENS_CACHE_TARGET"


@functools.lru_cache(maxsize=1)
def _l3_bytes() -> int | None:
    """The last-level cache size from Linux sysfs (None elsewhere or when unreadable)."""
    best = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1024, "M": 1024**2, "G": 1024**3}
        value = int(size[:-1]) * units[size[-1]] if size and size[-1] in units else int(size or 0)
        best = max(best or 0, value)
    return best


def cache_target_bytes() -> int:
    """Bytes one elementwise buffer of a cotangent chunk may take on a CPU: ``$TL_TENSORLENS_CACHE_TARGET``,
    else a quarter of the last-level cache (a read and a write buffer, with room for the weights),
    clamped to 2–32 MiB; 8 MiB when the cache size is unknown."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return as_bytes(CACHE_ENV, env)
    l3 = _l3_bytes()
    if not l3:
        return 8 * 1024**2
    return min(max(l3 // 4, 2 * 1024**2), 32 * 1024**2)


def _is_oom(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(err, oom):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


class Pullback:
    """``g ↦ Jᵀ g`` of ``fn`` at ``x0`` for batches of cotangents, from ONE forward at batch 1.

    For an affine ``fn`` (the frozen replay) the backward does not depend on the primal, so the
    forward graph is kept (``retain_graph``) and every chunk of cotangents is pulled back through it
    with a vmapped backward (``is_grads_batched``). Where an op has no batching rule, it falls back to
    a loop of single backwards (same numbers, slower) and records why in :attr:`fallback_reason`.
    Out-of-memory errors are never caught by that fallback: they are raised as
    :class:`~tl_tensorlens.errors.MemoryBudgetError` with the chunk's estimate.

    Args:
        fn: ``x [1, *in_shape] -> y [1, *out_shape]``.
        x0: the point ``[*in_shape]`` (any point, for an affine ``fn``).
        chunk_bytes: the estimate of one cotangent's work, for the error message.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], x0: Tensor, *, chunk_bytes: int = 0):
        with torch.inference_mode(False):
            self.x = x0.detach()[None].clone().requires_grad_(True)
            with torch.enable_grad():
                self.y = fn(self.x)
        self.batched = True
        self.fallback_reason: str | None = None
        self.chunk_bytes = chunk_bytes

    @property
    def out_shape(self) -> torch.Size:
        return self.y.shape[1:]

    def __call__(self, g: Tensor) -> Tensor:
        """``[k, *out_shape] -> [k, *in_shape]``."""
        g = g.to(device=self.y.device, dtype=self.y.dtype)
        with torch.inference_mode(False):
            if self.batched:
                try:
                    (gx,) = torch.autograd.grad(
                        self.y, self.x, grad_outputs=g[:, None], retain_graph=True, is_grads_batched=True
                    )
                    return gx[:, 0].detach()
                except RuntimeError as err:
                    if _is_oom(err):
                        raise MemoryBudgetError(
                            f"out of device memory in a batched backward of {g.shape[0]} cotangents (estimated "
                            f"{format_bytes(self.chunk_bytes * g.shape[0])}): lower memory_budget / "
                            f"{BUDGET_ENV} so that chunks are smaller"
                        ) from err
                    self.batched = False
                    self.fallback_reason = str(err).splitlines()[0]
            rows = [torch.autograd.grad(self.y, self.x, grad_outputs=gi[None], retain_graph=True)[0][0] for gi in g]
            return torch.stack(rows).detach()


def pushforward(fn: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
    """``T t`` for a batch of tangents ``t`` of an affine ``fn`` (forward mode at the zero primal:
    no ``F(x) − F(0)`` cancellation)."""
    with torch.inference_mode(False), torch.enable_grad():
        out = torch.func.jvp(fn, (torch.zeros_like(t),), (t,))[1]
    return out.detach()


def jacobian(fn: Callable[[Tensor], Tensor], x0: Tensor, *, chunk: int = 256) -> Tensor:
    """``∂fn/∂x`` at ``x0`` as ``[*out_shape, *in_shape]`` for any differentiable ``fn`` (not only
    affine ones: the graph is built at ``x0``), in chunks of batched vector-Jacobian products.

    Example:
        >>> A = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 1.0]])
        >>> jacobian(lambda x: (x @ A.T) ** 2, torch.tensor([1.0, 1.0])).shape
        torch.Size([3, 2])
    """
    pull = Pullback(lambda x: fn(x[0])[None], x0)
    out_shape = pull.out_shape
    n_out = math.prod(out_shape)
    eye = torch.eye(n_out, dtype=pull.y.dtype, device=pull.y.device)
    rows = [pull(eye[s : s + chunk].reshape(-1, *out_shape)) for s in range(0, n_out, chunk)]
    return torch.cat(rows).reshape(*out_shape, *x0.shape)


@dataclass
class Engine:
    """Chunked Jacobian rows and columns of one lens's frozen replay.

    Attributes:
        model: the model the state was captured from.
        state: the capture.
        spec: a :meth:`~tl_tensorlens.replay.ReplaySpec.resolved` spec.
        memory_budget: bytes one request may allocate.
        progress: tqdm bars (None: only for long work).
    """

    model: Any
    state: FrozenState
    spec: ReplaySpec
    memory_budget: int
    progress: bool | None = None
    _causal: bool | None = field(default=None, repr=False)
    _d_out: int | None = field(default=None, repr=False)
    #: The largest peak a :meth:`plan` has admitted so far (bytes: result + kept graph + one chunk);
    #: ``benchmarks/bench_memory.py`` compares it with the measured peak RSS. Reset it to 0 to measure one call.
    planned_peak: int = field(default=0, repr=False)

    # ------------------------------------------------------------------ shapes
    @property
    def x(self) -> Tensor:
        """The replay input ``[pos, d_in]`` (``blocks.{start}.hook_resid_pre`` of the capture)."""
        return self.state.resid_pre(self.spec.start)

    @property
    def n(self) -> int:
        return self.state.n_pos

    @property
    def d_in(self) -> int:
        return int(self.x.shape[-1])

    @property
    def d_out(self) -> int:
        if self._d_out is None:
            cfg = self.model.cfg
            d_vocab = int(getattr(cfg, "d_vocab_out", -1) or -1)
            d_vocab = d_vocab if d_vocab > 0 else int(cfg.d_vocab)
            self._d_out = d_vocab if self.spec.output == "logits" else int(cfg.d_model)
        return self._d_out

    @property
    def element_size(self) -> int:
        return self.x.element_size()

    @property
    def causal(self) -> bool:
        """True when every frozen pattern is lower-triangular (read from the data, once)."""
        if self._causal is None:
            self._causal = self.state.is_causal
        return self._causal

    def fn(self, state: FrozenState) -> Callable[[Tensor], Tensor]:
        """The affine replay on (a prefix of) the capture, ``[b, pos, d_in] -> [b, pos, d_out]``."""
        return lambda x: run(self.model, state, x, self.spec)

    def state_for(self, i: int) -> FrozenState:
        """The capture cut to positions ``<= i`` when causal (exact then), else the whole capture."""
        if self.causal and i + 1 < self.n:
            return self.state.prefix(i + 1)
        return self.state

    # ------------------------------------------------------------------ memory model
    def _layer_elements(self, n: int, vocab_copies: int) -> tuple[int, int, int]:
        """(elements of one block's activations, number of blocks, elements of the head) at length ``n``;
        ``vocab_copies``: ``[n, d_vocab]`` buffers the head holds at ``output="logits"``."""
        cfg = self.model.cfg
        d = self.d_in
        d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d)
        h = int(cfg.n_heads)
        layers = int((self.spec.stop or self.state.n_layers) - self.spec.start)
        per_layer = n * (16 * d + 4 * d_mlp) + 4 * h * n * n
        head = n * (vocab_copies * self.d_out if self.spec.output == "logits" else 4 * d)
        return per_layer, layers, head

    def item_bytes(self, n: int) -> int:
        """Activation memory of one replay item of length ``n`` kept for a backward: the forward with
        its graph (every block's saved activations, and the logits with the unembedding's buffers)."""
        per_layer, layers, head = self._layer_elements(n, 3)
        return self.element_size * (layers * per_layer + head)

    def step_bytes(self, n: int) -> int:
        """Working memory of one cotangent (tangent) during a backward (forward-mode) pass: the pass
        frees each block's buffers as it moves on, so about one block's activations are alive at once,
        not all of them; at the logits the cotangent itself is the only ``[n, d_vocab]`` buffer, and it
        is counted with the chunk (calibrated against measured peak RSS: ``benchmarks/bench_memory.py``)."""
        per_layer, _, head = self._layer_elements(n, 0)
        return self.element_size * (per_layer + head)

    def cache_chunk(self, n: int) -> int:
        """The most cotangents (tangents) per chunk that keep one elementwise buffer of a chunk —
        ``[chunk, n, max(d_mlp, d_model)]`` — within :func:`cache_target_bytes` on a CPU, so that the
        backward's memory-bound elementwise work (frozen MLP ratios, norm scales, residual adds) runs
        from the last-level cache instead of main memory; at least :data:`MIN_CHUNK`, so the matmuls
        stay large. Unbounded on other devices (a GPU wants the largest batch the budget allows).

        Measured (``benchmarks/bench_tensors.py``; one thread, float32): one slice at d_model 256 /
        64 tokens took 3.0–4.3 s with all 256 cotangents in one chunk and 1.7–1.9 s in chunks of 32.
        """
        if self.x.device.type != "cpu":
            return 1 << 62
        cfg = self.model.cfg
        width = max(int(getattr(cfg, "d_mlp", None) or 4 * self.d_in), self.d_in)
        return max(MIN_CHUNK, cache_target_bytes() // max(n * width * self.element_size, 1))

    def plan(self, total: int, *, n: int, per_item: int, reserved: int, what: str, cheaper: str, base: int = 0) -> int:
        """Chunk size for ``total`` items of ``per_item`` bytes each (plus :meth:`step_bytes` of working
        memory each), next to ``reserved`` bytes (the result) and ``base`` bytes (a kept forward graph);
        refuses when not even one item fits. Within the budget, chunks are capped by
        :meth:`cache_chunk` (speed; the numbers do not depend on it beyond float rounding)."""
        per = self.step_bytes(n) + per_item
        fixed = reserved + base
        check_budget(fixed + per * min(total, 1), self.memory_budget, what, cheaper)
        chunk = max(1, min(total, (self.memory_budget - fixed) // max(per, 1), self.cache_chunk(n)))
        self.planned_peak = max(self.planned_peak, fixed + per * chunk)
        return chunk

    # ------------------------------------------------------------------ reverse mode
    def row_chunks(
        self,
        i: int,
        k: int,
        cotangent: Callable[[int, int], Tensor],
        *,
        reserved: int,
        what: str,
        cheaper: str,
        select: Callable[[int], bool] | None = None,
        extra_per_item: int = 0,
    ) -> Iterator[tuple[int, int, Tensor]]:
        """``Tᵀ g`` for ``k`` cotangents living on output position ``i``, in chunks.

        Args:
            i: the output position.
            k: number of cotangents.
            cotangent: ``(start, stop) -> [stop - start, d_out]``: the cotangents of a chunk, made on
                demand (so ``[k, d_out]`` is never allocated at once).
            reserved: bytes of the caller's result, counted against the budget.
            what, cheaper: for the refusal message.
            select: ``chunk index -> bool``: compute only the chosen chunks (the chunks themselves do
                not change, so a chunk has the same bits whichever process computes it).
            extra_per_item: bytes per cotangent the caller allocates while reducing a chunk (e.g. a
                float64 copy of it), counted in the plan.

        Yields:
            ``(start, stop, adj)`` with ``adj [stop - start, n_i, d_in]``, ``n_i = i + 1`` for causal
            captures (the columns beyond are exact zeros), else ``n``.
        """
        state = self.state_for(i)
        n = state.n_pos
        es = self.element_size
        per_item = es * n * (self.d_out + 2 * self.d_in) + extra_per_item
        chunk = self.plan(
            k, n=n, per_item=per_item, reserved=reserved, base=self.item_bytes(n), what=what, cheaper=cheaper
        )
        pull = Pullback(self.fn(state), state.resid_pre(self.spec.start), chunk_bytes=self.step_bytes(n) + per_item)
        for index, s in enumerate(range(0, k, chunk)):
            if select is not None and not select(index):
                continue
            e = min(k, s + chunk)
            c = cotangent(s, e)
            g = torch.zeros(e - s, n, self.d_out, dtype=pull.y.dtype, device=pull.y.device)
            g[:, i] = c.to(g)
            yield s, e, pull(g)

    def adjoint_chunks(
        self, k: int, cotangent: Callable[[int, int], Tensor], *, reserved: int, what: str, cheaper: str
    ) -> Iterator[tuple[int, int, Tensor]]:
        """``Tᵀ g`` for ``k`` full cotangents ``[pos, d_out]`` (any output positions), in chunks."""
        es = self.element_size
        per_item = es * self.n * (self.d_out + 2 * self.d_in)
        chunk = self.plan(
            k, n=self.n, per_item=per_item, reserved=reserved, base=self.item_bytes(self.n), what=what, cheaper=cheaper
        )
        pull = Pullback(self.fn(self.state), self.x, chunk_bytes=self.step_bytes(self.n) + per_item)
        for s in range(0, k, chunk):
            e = min(k, s + chunk)
            yield s, e, pull(cotangent(s, e))

    # ------------------------------------------------------------------ forward mode
    def column_chunks(
        self, k: int, tangent: Callable[[int, int], Tensor], *, reserved: int, what: str, cheaper: str
    ) -> Iterator[tuple[int, int, Tensor]]:
        """``T t`` for ``k`` tangents ``[pos, d_in]``, made on demand per chunk.

        Yields:
            ``(start, stop, out)`` with ``out [stop - start, pos, d_out]``.
        """
        es = self.element_size
        # Forward mode carries the primal beside each tangent (torch.func.jvp at a batch of zeros), so
        # a tangent's working set is two blocks' activations, plus its input, its output and the
        # caller's reordered copy of that output.
        per_item = self.step_bytes(self.n) + es * self.n * (2 * self.d_in + 3 * self.d_out)
        chunk = self.plan(k, n=self.n, per_item=per_item, reserved=reserved, what=what, cheaper=cheaper)
        fn = self.fn(self.state)
        for s in range(0, k, chunk):
            e = min(k, s + chunk)
            t = tangent(s, e).to(self.x)
            yield s, e, pushforward(fn, t)


__all__ = [
    "BUDGET_ENV",
    "CACHE_ENV",
    "MIN_CHUNK",
    "Engine",
    "Pullback",
    "cache_target_bytes",
    "check_budget",
    "default_memory_budget",
    "format_bytes",
    "jacobian",
    "progress_bar",
    "pushforward",
    "resolve_memory_budget",
]
