"""The lens: TensorLens, its slices, blocks, heads and collapses (the user API on the engine).

TensorLens (Atad et al. 2026, Sec. 3.4-3.5, App. C) writes the frozen model as
``F(X) = T vec(X) + c`` with the 4th-order tensor ``T[pos_out, d_out, pos_in, d_in]``. ``T`` is the
Jacobian of the frozen replay (:mod:`tl_tensorlens.replay`), so it is never assembled from formulas
here: every object comes from the engine's chunked vector-Jacobian products (reverse mode: one per
output channel for a slice, one per output position for the In+Out / In+Class collapses) or
Jacobian-vector products (forward mode: one per input position for the per-input contributions),
sized from a memory budget (:mod:`tl_tensorlens.engine`).

Collapses to ``[pos_out, pos_in]`` maps (Sec. 3.5), one name each:

* ``"norm"`` (Eq. 21): ``M[i, j] = ‖T[i, :, j, :]‖_F``;
* ``"in_out"`` (Eq. 22-23): ``M[i, j] = h_outᵢᵀ T[i, :, j, :] h_inⱼ``, rows sum to ``h_outᵢᵀ (F(X)ᵢ − cᵢ)``;
* ``"in_class"`` (Eq. 24): ``M[i, j] = uᵀ T[i, :, j, :] xⱼ`` for the unembedding column of a token
  (``token=``) or any readout direction (``direction=``, e.g. a classifier head's column); rows plus
  ``uᵀcᵢ`` (plus ``b_U``) give the logit / class score. ``"logit"`` and ``"class"`` are its
  deprecated names.
"""

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_tensorlens._backend import OutputPoint
from tl_tensorlens._checks import as_int, as_position, as_positions, as_token_ids
from tl_tensorlens._deprecation import moved_names, warn_deprecated
from tl_tensorlens.capture import FrozenState, capture
from tl_tensorlens.engine import Engine, check_budget, default_memory_budget, progress_bar, resolve_memory_budget
from tl_tensorlens.errors import ArgumentError
from tl_tensorlens.replay import ReplaySpec, model_output, run, verify_replay

CollapseKind = Literal["norm", "in_out", "in_class"]
COLLAPSE_KINDS: tuple[str, ...] = ("norm", "in_out", "in_class")
#: Deprecated collapse names (0.1) -> the one name of 0.2.
_OLD_KINDS = {"logit": "in_class", "class": "in_class"}


def _kind(kind: Any, allowed: Sequence[str] = COLLAPSE_KINDS) -> str:
    if isinstance(kind, str) and kind in _OLD_KINDS:
        warn_deprecated(f"collapse kind {kind!r}", "'in_class' (with token= or direction=)", stacklevel=4)
        kind = _OLD_KINDS[kind]
    if not isinstance(kind, str) or kind not in allowed:
        raise ArgumentError("kind", kind, f"one of {tuple(allowed)}")
    return kind


@dataclass(frozen=True)
class RandomizedNorm:
    """Unbiased Hutchinson estimate of the Norm collapse with its standard error.

    Attributes:
        squared: estimate of ``‖T[i, :, j, :]‖²_F`` ``[pos_out, pos_in]``.
        squared_stderr: standard error of ``squared``.
        probes: number of random probes per output position.
    """

    squared: Float[Tensor, "pos_out pos_in"]
    squared_stderr: Float[Tensor, "pos_out pos_in"]
    probes: int

    @property
    def norm(self) -> Float[Tensor, "pos_out pos_in"]:
        """Estimate of ``‖T[i, :, j, :]‖_F`` (square root of the clamped squared estimate; biased low
        by Jensen, use :attr:`squared` for unbiased comparisons)."""
        return self.squared.clamp_min(0).sqrt()

    @property
    def norm_stderr(self) -> Float[Tensor, "pos_out pos_in"]:
        """Delta-method standard error of :attr:`norm`."""
        return self.squared_stderr / (2 * self.norm.clamp_min(torch.finfo(self.squared.dtype).tiny))


@dataclass(frozen=True)
class HeadTensor:
    """One attention head's tensor ``T_h = A_h ⊗ (W_V^h W_O^h)ᵀ`` (Eq. 9), kept factored.

    Maps the attention input (the output of ``ln1``) to the head's contribution to the attention
    output: ``y[q] = Σ_k A[q, k] · x[k] @ W_V @ W_O``, i.e. ``T[q, e, k, d] = A[q, k] · W_OV[d, e]``.
    In the spirit of TransformerLens' ``FactoredMatrix``: nothing ``[pos, d, pos, d]`` is built until
    :meth:`full` is called.

    Attributes:
        layer: block index.
        head: head index.
        pattern: frozen attention pattern ``[dest_pos, src_pos]``.
        W_V: ``[d_model, d_head]`` (the kv group's, for GQA).
        W_O: ``[d_head, d_model]``.
    """

    layer: int
    head: int
    pattern: Float[Tensor, "dest_pos src_pos"]
    W_V: Float[Tensor, "d_model d_head"]
    W_O: Float[Tensor, "d_head d_model"]
    memory_budget: int | None = field(default=None, compare=False)

    def _check(self, shape: tuple[int, ...], what: str, cheaper: str) -> None:
        budget = default_memory_budget(self.pattern.device) if self.memory_budget is None else self.memory_budget
        check_budget(math.prod(shape) * self.pattern.element_size(), budget, what, cheaper)

    @property
    def OV(self) -> Any:
        """``W_V @ W_O`` as a TransformerLens ``FactoredMatrix``."""
        from transformer_lens import FactoredMatrix

        return FactoredMatrix(self.W_V, self.W_O)

    def apply(self, x: Float[Tensor, "*batch pos d_model"]) -> Float[Tensor, "*batch pos d_model"]:
        """``T_h · x``: the head's output (without biases) for attention input ``x``."""
        return self.pattern.to(x.dtype) @ (x @ self.W_V) @ self.W_O

    def __getitem__(self, dest_pos: int) -> Float[Tensor, "d_model src_pos d_model"]:
        """Output-position slice ``T_h[dest_pos]`` ``[d_out, src_pos, d_in]``."""
        n, d = self.pattern.shape[0], self.W_V.shape[0]
        dest_pos = as_position("dest_pos", dest_pos, n)
        self._check((d, n, d), f"HeadTensor[{dest_pos}] [{d}, {n}, {d}]", "norm_collapse() or OV (a FactoredMatrix)")
        ov = self.W_V @ self.W_O
        return torch.einsum("k,de->ekd", self.pattern[dest_pos], ov)

    def full(self) -> Float[Tensor, "dest_pos d_model src_pos d_model"]:
        """Materialize ``[dest_pos, d_out, src_pos, d_in]``."""
        n, d = self.pattern.shape[0], self.W_V.shape[0]
        self._check((n, d, n, d), f"HeadTensor.full() [{n}, {d}, {n}, {d}]", "head[dest_pos], norm_collapse() or OV")
        ov = self.W_V @ self.W_O
        return torch.einsum("qk,de->qekd", self.pattern, ov)

    def norm_collapse(self) -> Float[Tensor, "dest_pos src_pos"]:
        """``‖T_h[q, :, k, :]‖_F = |A[q, k]| · ‖W_V W_O‖_F`` (no materialization)."""
        return self.pattern.abs() * (self.W_V @ self.W_O).norm()

    def __repr__(self) -> str:
        n = self.pattern.shape[0]
        d = self.W_V.shape[0]
        return (
            f"HeadTensor(L{self.layer}H{self.head}, shape=[dest_pos={n}, d_out={d}, src_pos={n}, d_in={d}], "
            f"dtype={self.pattern.dtype}, device={self.pattern.device})"
        )


class TensorLens:
    """The model at one prompt as an exact affine operator ``F(X) = T vec(X) + c``.

    Build it once (one forward pass), then ask for slices, the full tensor, per-block, per-head and
    layer-range tensors, per-input contributions and N×N collapses; nothing larger than asked for is
    ever materialized, and every request is estimated against the memory budget before allocating.

    Example:
        >>> import torch
        >>> from transformer_lens.config import TransformerBridgeConfig
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> cfg = TransformerBridgeConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32,
        ...     d_vocab=20, n_ctx=8, act_fn="gelu_new", seed=0)
        >>> model = TransformerBridge.boot_native(cfg, dtype=torch.float64).eval()
        >>> lens = TensorLens.from_model(model, torch.tensor([1, 4, 2, 7]), output="ln_final")
        >>> T = lens.full()
        >>> T.shape
        torch.Size([4, 16, 4, 16])
        >>> y = torch.einsum("idjk,jk->id", T, lens.input) + lens.bias
        >>> bool(torch.allclose(y, lens.output))
        True
        >>> lens.collapse("in_class", token=3).shape
        torch.Size([4, 4])
    """

    def __init__(
        self,
        model: Any,
        state: FrozenState,
        spec: ReplaySpec,
        *,
        bias: bool = True,
        memory_budget: int | str | None = None,
        progress: bool | None = None,
    ):
        self.model = model
        self.state = state
        self.spec = spec.resolved(state)
        if not isinstance(bias, bool):
            raise ArgumentError("bias", bias, "True or False")
        self.with_bias = bias
        self.memory_budget = resolve_memory_budget(memory_budget, state.x0.device)
        self.progress = progress
        self.engine = Engine(model, state, self.spec, self.memory_budget, progress)
        self._bias: Tensor | None = None
        self._output: Tensor | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(
        cls,
        model: Any,
        tokens: Any,
        *,
        output: OutputPoint = "resid_post",
        layers: tuple[int, int] | None = None,
        heads: Mapping[int, Sequence[int]] | None = None,
        bias: bool = True,
        verify: bool = True,
        memory_budget: int | str | None = None,
        progress: bool | None = None,
    ) -> "TensorLens":
        """Capture ``tokens`` (one forward) and build the lens.

        Args:
            model: HookedTransformer, HookedEncoder or TransformerBridge.
            tokens: one prompt ``[pos]`` / ``[1, pos]`` (or a string with a tokenizer).
            output: "resid_post" (last block in range), "ln_final" (unembedding input) or "logits".
            layers: ``(start, stop)`` block range; the input is ``blocks.{start}.hook_resid_pre``.
            heads: per layer, the heads kept (others zeroed).
            bias: False drops the affine constant (``bias`` is then 0 and ``output = T x``).
            verify: first check, on this prompt, that the replay reproduces the model and is affine
                (raises :class:`~tl_tensorlens.errors.VerificationError` if not). On by default: it costs
                one batched replay of 5 inputs and catches any nonlinearity the capture could not see
                (an unhooked activation in an architecture this library has not met); pass False to
                skip it.
            memory_budget: bytes one request may allocate, or a size such as ``"2GiB"`` (default
                :func:`~tl_tensorlens.engine.default_memory_budget`).
            progress: show tqdm bars (None: only for long work).
        """
        state = capture(model, tokens)
        if verify:
            verify_replay(model, state, outputs=(output,))
        return cls.from_state(
            model,
            state,
            output=output,
            layers=layers,
            heads=heads,
            bias=bias,
            memory_budget=memory_budget,
            progress=progress,
        )

    @classmethod
    def from_state(
        cls,
        model: Any,
        state: FrozenState,
        *,
        output: OutputPoint = "resid_post",
        layers: tuple[int, int] | None = None,
        heads: Mapping[int, Sequence[int]] | None = None,
        bias: bool = True,
        memory_budget: int | str | None = None,
        progress: bool | None = None,
    ) -> "TensorLens":
        """Build a lens from an existing capture (no forward pass)."""
        if not isinstance(state, FrozenState):
            raise ArgumentError("state", type(state).__name__, "a FrozenState from tl_tensorlens.capture")
        start, stop = _range(layers)
        spec = ReplaySpec(output=output, start=start, stop=stop, heads=heads)
        return cls(model, state, spec, bias=bias, memory_budget=memory_budget, progress=progress)

    def _derive(self, **changes: Any) -> "TensorLens":
        spec = ReplaySpec(
            output=changes.get("output", self.spec.output),
            start=changes.get("start", self.spec.start),
            stop=changes.get("stop", self.spec.stop),
            heads=changes.get("heads", self.spec.heads),
        )
        return TensorLens(
            self.model, self.state, spec, bias=self.with_bias, memory_budget=self.memory_budget, progress=self.progress
        )

    def block(self, layer: int) -> "TensorLens":
        """Block ``layer`` alone: ``blocks.{layer}.hook_resid_pre`` → its output (``resid_post``)."""
        layer = as_int("layer", layer, lo=0, hi=self.state.n_layers - 1)
        return self._derive(start=layer, stop=layer + 1, output="resid_post", heads=self._heads_in(layer, layer + 1))

    def layer_range(self, start: int, stop: int, *, output: OutputPoint = "resid_post") -> "TensorLens":
        """Blocks ``start .. stop-1``: their input → the output point."""
        return self._derive(start=start, stop=stop, output=output, heads=self._heads_in(start, stop))

    def _heads_in(self, start: Any, stop: Any) -> dict[int, tuple[int, ...]] | None:
        """The lens's head subset restricted to a new range (layers outside it do not apply there)."""
        if self.spec.heads is None:
            return None
        if not isinstance(start, int) or not isinstance(stop, int):
            return {k: tuple(v) for k, v in self.spec.heads.items()}  # let the spec refuse the range by name
        return {k: tuple(v) for k, v in self.spec.heads.items() if start <= k < stop} or None

    def with_heads(self, heads: Mapping[int, Sequence[int]] | None) -> "TensorLens":
        """The same lens with only ``heads`` kept per layer (others zeroed)."""
        return self._derive(heads=heads)

    def head(self, layer: int, head: int) -> HeadTensor:
        """Per-head tensor ``A_h ⊗ (W_V^h W_O^h)ᵀ`` of ``layer``, factored (see :class:`HeadTensor`)."""
        layer = as_int("layer", layer, lo=0, hi=self.state.n_layers - 1)
        attn = self.model.blocks[layer].attn
        W_V, W_O = attn.W_V, attn.W_O
        n_heads = W_O.shape[0]
        head = as_int("head", head, lo=0, hi=n_heads - 1)
        if W_V.shape[0] != n_heads:  # GQA: query head h reads kv group h // (n_heads / n_kv)
            W_V = W_V.repeat_interleave(n_heads // W_V.shape[0], dim=0)
        pattern = self.state.pattern(layer)[head]
        return HeadTensor(
            layer, head, pattern.detach(), W_V[head].detach(), W_O[head].detach(), memory_budget=self.memory_budget
        )

    # ------------------------------------------------------------------ basic quantities
    @property
    def n_pos(self) -> int:
        """Prompt length (pos_in = pos_out)."""
        return self.state.n_pos

    @property
    def input(self) -> Float[Tensor, "pos d_model"]:
        """``x`` at the input of block ``start`` (x0 for start = 0)."""
        return self.state.resid_pre(self.spec.start)

    @property
    def d_in(self) -> int:
        """Input channels (d_model)."""
        return int(self.input.shape[-1])

    @property
    def output(self) -> Float[Tensor, "pos d_out"]:
        """``F(x) = T x + c`` at the captured input (``T x`` alone when ``bias=False``)."""
        if self._output is None:
            with torch.no_grad():
                y = run(self.model, self.state, self.input[None], self.spec)[0]
            self._output = (y - self._affine_constant()) if not self.with_bias else y
        return self._output

    @property
    def d_out(self) -> int:
        """Output channels (d_model, or d_vocab for logits)."""
        return self.engine.d_out

    def _affine_constant(self) -> Tensor:
        if self._bias is None:
            with torch.no_grad():
                self._bias = run(self.model, self.state, torch.zeros_like(self.input)[None], self.spec)[0]
        return self._bias

    @property
    def bias(self) -> Float[Tensor, "pos d_out"]:
        """The affine constant ``c = F(0)`` (every bias pushed through the maps after it); zeros when
        the lens was built with ``bias=False``."""
        c = self._affine_constant()
        return c if self.with_bias else torch.zeros_like(c)

    def model_output(self) -> Float[Tensor, "pos d_out"]:
        """The model's own output at this lens's output point, from the capture (full head set)."""
        return model_output(self.model, self.state, self.spec.output, self.spec.stop)[0]

    def _bytes(self, *shape: int) -> int:
        return math.prod(shape) * self.input.element_size()

    # ------------------------------------------------------------------ operator products
    def apply(self, x: Float[Tensor, "*batch pos d_model"]) -> Float[Tensor, "*batch pos d_out"]:
        """``T · x`` without materializing ``T`` (batched; the bias is not added)."""
        squeeze = isinstance(x, Tensor) and x.ndim == 2
        xb = x[None] if squeeze else x
        if not isinstance(xb, Tensor) or xb.ndim != 3 or xb.shape[1:] != self.input.shape:
            raise ArgumentError(
                "x",
                tuple(x.shape) if isinstance(x, Tensor) else x,
                f"a tensor [batch, {self.n_pos}, {self.d_in}] or [{self.n_pos}, {self.d_in}]",
            )
        k = xb.shape[0]
        out = None
        chunks = self.engine.column_chunks(
            k,
            lambda s, e: xb[s:e],
            reserved=self._bytes(k, self.n_pos, self.d_out),
            what=f"apply() of {k} inputs",
            cheaper="fewer inputs per call",
        )
        for s, e, y in chunks:
            if out is None:
                out = torch.empty(k, *y.shape[1:], dtype=y.dtype, device=y.device)
            out[s:e] = y
        assert out is not None
        return out[0] if squeeze else out

    def apply_adjoint(self, g: Float[Tensor, "*batch pos d_out"]) -> Float[Tensor, "*batch pos d_model"]:
        """``Tᵀ · g`` without materializing ``T`` (batched)."""
        squeeze = isinstance(g, Tensor) and g.ndim == 2
        gb = g[None] if squeeze else g
        if not isinstance(gb, Tensor) or gb.ndim != 3 or tuple(gb.shape[1:]) != (self.n_pos, self.d_out):
            raise ArgumentError(
                "g",
                tuple(g.shape) if isinstance(g, Tensor) else g,
                f"a tensor [batch, {self.n_pos}, {self.d_out}] or [{self.n_pos}, {self.d_out}]",
            )
        k = gb.shape[0]
        out = torch.empty(k, self.n_pos, self.d_in, dtype=self.input.dtype, device=self.input.device)
        chunks = self.engine.adjoint_chunks(
            k,
            lambda s, e: gb[s:e],
            reserved=self._bytes(k, self.n_pos, self.d_in),
            what=f"apply_adjoint() of {k} cotangents",
            cheaper="fewer cotangents per call",
        )
        for s, e, adj in chunks:
            out[s:e] = adj.to(out)
        return out[0] if squeeze else out

    def replay(self, x: Float[Tensor, "*batch pos d_model"]) -> Float[Tensor, "*batch pos d_out"]:
        """``F(x) = T x + c`` (``T x`` when the lens has ``bias=False``)."""
        return self.apply(x) + self.bias

    def _eye_rows(self, s: int, e: int) -> Tensor:
        """Rows ``s..e`` of the ``d_out`` identity, made on demand."""
        g = torch.zeros(e - s, self.d_out, dtype=self.input.dtype, device=self.input.device)
        g[torch.arange(e - s), torch.arange(s, e)] = 1
        return g

    # ------------------------------------------------------------------ tensors
    def slice(self, pos_out: int) -> Float[Tensor, "d_out pos_in d_in"]:
        """``T[pos_out]``: one VJP per output channel (batched)."""
        return self._slice(pos_out)

    def _slice(self, pos_out: int, select: Any = None) -> Tensor:
        """:meth:`slice` with only the engine's cotangent chunks ``select`` picks filled (zeros elsewhere)."""
        i = as_position("pos_out", pos_out, self.n_pos)
        reserved = self._bytes(self.d_out, self.n_pos, self.d_in)
        what = f"slice({pos_out}) [{self.d_out}, {self.n_pos}, {self.d_in}]"
        cheaper = "collapse(..., positions=[i]), collapse_randomized_norm(k), or output='ln_final' instead of 'logits'"
        check_budget(reserved, self.memory_budget, what, cheaper)
        out = torch.zeros(self.d_out, self.n_pos, self.d_in, dtype=self.input.dtype, device=self.input.device)
        chunks = self.engine.row_chunks(
            i, self.d_out, self._eye_rows, reserved=reserved, what=what, cheaper=cheaper, select=select
        )
        for s, e, adj in chunks:
            out[s:e, : adj.shape[1]] = adj.to(out)
        return out

    def full(self, *, method: Literal["reverse", "forward"] = "reverse") -> Float[Tensor, "pos_out d_out pos_in d_in"]:
        """The whole tensor ``[pos_out, d_out, pos_in, d_in]``.

        ``method="reverse"`` stacks slices (causal prefixes make it ~2x cheaper);
        ``method="forward"`` pushes the ``pos·d_in`` basis vectors through the replay, in chunks made
        on demand (the identity is never allocated).
        """
        if method not in ("reverse", "forward"):
            raise ArgumentError("method", method, "'reverse' or 'forward'")
        n, d_in, d_out = self.n_pos, self.d_in, self.d_out
        reserved = self._bytes(n, d_out, n, d_in)
        what = f"full() [{n}, {d_out}, {n}, {d_in}]"
        cheaper = "slice(i), collapse(...), contributions(), or fewer positions"
        check_budget(reserved, self.memory_budget, what, cheaper)
        T = torch.zeros(n, d_out, n, d_in, dtype=self.input.dtype, device=self.input.device)
        if method == "reverse":
            bar = progress_bar(n, "full (reverse)", self.progress)
            for i in range(n):
                for s, e, adj in self.engine.row_chunks(
                    i, d_out, self._eye_rows, reserved=reserved, what=what, cheaper=cheaper
                ):
                    T[i, s:e, : adj.shape[1]] = adj.to(T)
                bar.update(1)
            bar.close()
            return T

        def basis(s: int, e: int) -> Tensor:
            t = torch.zeros(e - s, n, d_in, dtype=self.input.dtype, device=self.input.device)
            idx = torch.arange(s, e, device=t.device)
            t[torch.arange(e - s, device=t.device), idx // d_in, idx % d_in] = 1
            return t

        bar = progress_bar(n * d_in, "full (forward)", self.progress)
        for s, e, cols in self.engine.column_chunks(n * d_in, basis, reserved=reserved, what=what, cheaper=cheaper):
            idx = torch.arange(s, e)
            T[:, :, idx // d_in, idx % d_in] = cols.permute(1, 2, 0).to(T)
            bar.update(e - s)
        bar.close()
        return T

    def contributions(self) -> Float[Tensor, "pos_out pos_in d_out"]:
        """``C[i, j, :] = T[i, :, j, :] @ x_j`` — input j's share of output i; ``Σ_j C[i, j] = F(x)_i − c_i``.

        Forward mode: one JVP per input position (batched).
        """
        n = self.n_pos
        reserved = self._bytes(n, n, self.d_out)
        what = f"contributions() [{n}, {n}, {self.d_out}]"
        cheaper = "collapse('in_class', direction=...)"
        check_budget(reserved, self.memory_budget, what, cheaper)
        x = self.input
        out = torch.zeros(n, n, self.d_out, dtype=x.dtype, device=x.device)

        def placed(s: int, e: int) -> Tensor:
            t = torch.zeros(e - s, n, self.d_in, dtype=x.dtype, device=x.device)
            t[torch.arange(e - s), torch.arange(s, e)] = x[s:e]
            return t

        for s, e, y in self.engine.column_chunks(n, placed, reserved=reserved, what=what, cheaper=cheaper):
            out[:, s:e] = y.permute(1, 0, 2).to(out)  # [j, i, d_out] -> [i, j, d_out]
        return out

    # ------------------------------------------------------------------ collapses
    def _readout(self, token: Any, direction: Any) -> Tensor:
        """Per-output-position readout vectors ``u_i`` [pos, d_out] of the In+Class collapse."""
        n = self.n_pos
        if (token is None) == (direction is None):
            raise ArgumentError(
                "token/direction",
                (token, direction) if token is not None else None,
                "exactly one of token= (an id, or one per output position) and direction= (a readout "
                "[d_out] or [pos_out, d_out])",
            )
        if direction is not None:
            if not isinstance(direction, Tensor) or not direction.is_floating_point():
                raise ArgumentError(
                    "direction", direction, f"a floating tensor [d_out={self.d_out}] or [{n}, {self.d_out}]"
                )
            u = direction.detach().to(self.input)
        else:
            tok = as_token_ids("token", token, int(self.model.cfg.d_vocab))
            if tok.ndim > 1 or (tok.ndim == 1 and tok.shape[0] != n):
                raise ArgumentError("token", token, f"one token id, or {n} ids (one per output position)")
            tok = tok.to(self.input.device)
            if self.spec.output == "logits":
                u = torch.nn.functional.one_hot(tok, self.d_out).to(self.input)
            elif self.spec.output == "ln_final":
                cols = self.model.W_U.detach().to(self.input)[:, tok]
                u = cols if tok.ndim == 0 else cols.T
            else:
                raise ArgumentError(
                    "token",
                    token,
                    "direction= for output='resid_post' (the residual stream is not read through ln_final), "
                    "or a lens with output='ln_final' / 'logits' for token=",
                )
        if u.ndim == 1:
            u = u.expand(n, -1)
        if tuple(u.shape) != (n, self.d_out):
            raise ArgumentError("direction", tuple(u.shape), f"a readout [d_out={self.d_out}] or [pos_out={n}, d_out]")
        return u

    def _norm_row(self, i: int, n_rows: int) -> Tensor:
        """Row ``i`` of the Norm collapse (float64), streamed chunk by chunk: the slice itself is never
        allocated. ``n_rows`` (rows of the whole request) sizes the reserved result, so a row is
        computed with the same chunks whichever process computes it (:mod:`tl_tensorlens.distributed`)."""
        n = self.n_pos
        what = f"collapse('norm') row [{self.d_out}-cotangent chunks, {n}, {self.d_in}]"
        cheaper = "collapse_randomized_norm(k) (k VJPs per row instead of d_out)"
        sq = torch.zeros(n, dtype=torch.float64, device=self.input.device)
        for _, _, adj in self.engine.row_chunks(
            i,
            self.d_out,
            self._eye_rows,
            reserved=self._bytes(n_rows, n),
            what=what,
            cheaper=cheaper,
            extra_per_item=2 * 8 * n * self.d_in,  # the float64 copy of a chunk and its square
        ):
            sq[: adj.shape[1]] += adj.double().pow(2).sum(dim=(0, 2))
        return sq.sqrt()

    def _randomized_row(self, i: int, probes: int, n_rows: int, gen: torch.Generator) -> Tensor:
        """Per-probe samples ``‖Bᵀz‖²`` ``[probes, pos_in]`` of row ``i``, drawing its probes from ``gen``."""
        n = self.n_pos
        samples = torch.zeros(probes, n, dtype=self.input.dtype, device=self.input.device)

        def probe(s: int, e: int) -> Tensor:
            # Drawn chunk by chunk from one generator: the same stream as one [probes, d_out] draw.
            return (torch.randint(0, 2, (e - s, self.d_out), generator=gen) * 2 - 1).to(self.input)

        for s, e, adj in self.engine.row_chunks(
            i,
            probes,
            probe,
            reserved=self._bytes(probes, n) + self._bytes(2, n_rows, n),
            what=f"collapse_randomized_norm({probes}) row",
            cheaper="fewer probes",
            extra_per_item=self._bytes(n, self.d_in),  # the square of a chunk
        ):
            samples[s:e, : adj.shape[1]] = adj.to(samples).pow(2).sum(-1)
        return samples

    def _skip_probes(self, probes: int, gen: torch.Generator) -> None:
        """Advance ``gen`` past one row's probes without computing them (same stream as drawing)."""
        for s in range(0, probes, 256):
            torch.randint(0, 2, (min(256, probes - s), self.d_out), generator=gen)

    def collapse(
        self,
        kind: CollapseKind | str,
        *,
        token: int | Int[Tensor, " pos_out"] | None = None,
        direction: Float[Tensor, "*pos_out d_out"] | None = None,
        positions: Sequence[int] | int | None = None,
    ) -> Float[Tensor, "n_rows pos_in"]:
        """Collapse ``T`` to an N×N map (rows: output positions, columns: input positions).

        Args:
            kind: ``"norm"`` (Eq. 21), ``"in_out"`` (Eq. 22) or ``"in_class"`` (Eq. 24, needs ``token``
                or ``direction``).
            token: for "in_class": the unembedding column(s) of a token: one id, or one per output
                position (lenses with ``output="ln_final"`` or ``"logits"``).
            direction: for "in_class": any readout vector(s) ``[d_out]`` or ``[pos_out, d_out]`` (e.g. a
                classifier head's column).
            positions: output rows to compute (default all); the result has one row each.

        Returns:
            ``[len(positions), pos_in]``.
        """
        kind = _kind(kind)
        rows = as_positions("positions", positions, self.n_pos)
        n = self.n_pos
        x = self.input
        M = torch.zeros(len(rows), n, dtype=x.dtype, device=x.device)
        if kind == "norm":
            bar = progress_bar(len(rows), "norm collapse", self.progress)
            for r, i in enumerate(rows):
                M[r] = self._norm_row(i, len(rows)).to(M)
                bar.update(1)
            bar.close()
            return M
        if kind == "in_out":
            if token is not None or direction is not None:
                raise ArgumentError("token/direction", token if token is not None else "direction", "None for 'in_out'")
            u = self.output
        else:
            u = self._readout(token, direction)

        def cotangents(s: int, e: int) -> Tensor:
            g = torch.zeros(e - s, n, self.d_out, dtype=x.dtype, device=x.device)
            for k, i in enumerate(rows[s:e]):
                g[k, i] = u[i]
            return g

        bar = progress_bar(len(rows), f"{kind} collapse", self.progress)
        for s, e, adj in self.engine.adjoint_chunks(
            len(rows),
            cotangents,
            reserved=self._bytes(len(rows), n),
            what=f"collapse({kind!r}) of {len(rows)} rows",
            cheaper="fewer positions= per call",
        ):
            M[s:e] = (adj.to(x) * x).sum(-1)
            bar.update(e - s)
        bar.close()
        return M

    def collapse_bias(
        self,
        kind: CollapseKind | str,
        *,
        token: int | Int[Tensor, " pos_out"] | None = None,
        direction: Float[Tensor, "*pos_out d_out"] | None = None,
    ) -> Float[Tensor, " pos_out"]:
        """The part of the collapsed quantity not attributed to any input: ``uᵢᵀ cᵢ``
        (``+ b_U[token]`` for a token at ``ln_final``), so ``collapse(...).sum(-1) +
        collapse_bias(...)`` is the logit / readout of the model."""
        kind = _kind(kind, ("in_out", "in_class"))
        c = self.bias
        if kind == "in_out":
            return (self.output * c).sum(-1)
        u = self._readout(token, direction)
        part = (u * c).sum(-1)
        if token is not None and self.spec.output == "ln_final":
            b_U = getattr(self.model, "b_U", None)
            if b_U is not None:
                tok = as_token_ids("token", token, int(self.model.cfg.d_vocab)).to(c.device).expand(self.n_pos)
                part = part + b_U.detach().to(c)[tok]
        return part

    def collapse_randomized_norm(
        self, probes: int = 16, *, positions: Sequence[int] | int | None = None, seed: int = 0
    ) -> RandomizedNorm:
        """Hutchinson estimate of the Norm collapse: ``probes`` VJPs per output position.

        For ``B = T[i, :, j, :]`` and a Rademacher probe ``z`` on output position ``i``,
        ``E‖Bᵀz‖² = ‖B‖²_F``, and one VJP gives ``Bᵀz`` for every ``j`` at once. Cost: ``probes`` VJPs
        per row instead of ``d_out``; the standard error shrinks as ``1/sqrt(probes)``. Probes are
        streamed in chunks under the memory budget; only the per-probe samples ``[probes, pos_in]``
        are kept.

        The per-probe samples ``‖Bᵀz‖²`` are skewed when a few directions dominate ``B``, so with few
        probes (< ~100) the *reported* standard error (sample std / sqrt(probes)) tends to
        under-cover; the estimate itself stays unbiased at any ``probes``.
        """
        probes = as_int("probes", probes, lo=2, allowed="an integer >= 2 (a standard error needs two probes)")
        seed = as_int("seed", seed)
        rows = as_positions("positions", positions, self.n_pos)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        n = self.n_pos
        sq = torch.zeros(len(rows), n, dtype=self.input.dtype)
        se = torch.zeros_like(sq)
        bar = progress_bar(len(rows), "randomized norm", self.progress)
        for r, i in enumerate(rows):
            samples = self._randomized_row(i, probes, len(rows), gen)
            sq[r] = samples.mean(0).cpu()
            se[r] = (samples.std(0, unbiased=True) / math.sqrt(probes)).cpu()
            bar.update(1)
        bar.close()
        return RandomizedNorm(sq.to(self.input.device), se.to(self.input.device), probes)

    # ------------------------------------------------------------------ misc
    def __repr__(self) -> str:
        s = self.spec
        return (
            f"TensorLens(shape=[pos_out={self.n_pos}, d_out={self.d_out}, pos_in={self.n_pos}, d_in={self.d_in}], "
            f"output={s.output}, layers=({s.start}, {s.stop}), heads={'all' if s.heads is None else dict(s.heads)}, "
            f"bias={self.with_bias}, dtype={self.input.dtype}, device={self.input.device})"
        )

    def __iter__(self) -> Iterator[Tensor]:
        raise TypeError("TensorLens is not iterable; use slice(i) or full()")


def _range(layers: Any) -> tuple[Any, Any]:
    if layers is None:
        return 0, None
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or len(layers) != 2:
        raise ArgumentError("layers", layers, "(start, stop) with 0 <= start < stop <= n_layers")
    return layers[0], layers[1]


__getattr__ = moved_names(__name__, {"_fmt_bytes": "tl_tensorlens.engine:format_bytes"})

__all__ = ["COLLAPSE_KINDS", "CollapseKind", "HeadTensor", "RandomizedNorm", "TensorLens", "default_memory_budget"]
