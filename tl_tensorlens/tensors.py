"""Attention tensors: the lens object, slices, blocks, heads, collapses, on a memory-aware engine.

TensorLens (Atad et al. 2026, Sec. 3.4-3.5, App. C) writes the frozen model as
``F(X) = T vec(X) + c`` with the 4th-order tensor ``T[pos_out, d_out, pos_in, d_in]``. ``T`` is the
Jacobian of the frozen replay (:mod:`tl_tensorlens.replay`), so it is never assembled from formulas
here: every object is computed from batched vector-Jacobian products (reverse mode: one per output
channel for a slice, one per output position for the In+Out / class collapses) or Jacobian-vector
products (forward mode: one per input position for the per-input contributions), in chunks sized
from a memory budget. Causal captures (every frozen pattern lower-triangular) replay only the
prefix ``<= i`` for output position ``i``.

Collapses to ``[pos_out, pos_in]`` maps (Sec. 3.5):

* ``"norm"`` (Eq. 21): ``M[i, j] = ‖T[i, :, j, :]‖_F``;
* ``"in_out"`` (Eq. 22-23): ``M[i, j] = h_outᵢᵀ T[i, :, j, :] h_inⱼ``, rows sum to ``h_outᵢᵀ (F(X)ᵢ − cᵢ)``;
* ``"logit"`` / ``"class"`` (Eq. 24): ``M[i, j] = uᵀ T[i, :, j, :] xⱼ`` for an unembedding column or any
  readout direction ``u``; rows plus ``uᵀcᵢ`` (plus ``b_U``) give the logit.
"""

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_tensorlens.capture import FrozenState, capture
from tl_tensorlens.errors import MemoryBudgetError, ReplayError
from tl_tensorlens.replay import OutputPoint, ReplaySpec, _run, model_output, verify_replay

CollapseKind = Literal["norm", "in_out", "logit", "class"]

_DEFAULT_BUDGET = 4 * 2**30


def default_memory_budget() -> int:
    """Bytes a lens may allocate at once: ``TL_TENSORLENS_MEMORY_BUDGET`` (bytes) or 4 GiB."""
    env = os.environ.get("TL_TENSORLENS_MEMORY_BUDGET")
    return int(float(env)) if env else _DEFAULT_BUDGET


def _fmt_bytes(n: float | int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _progress(total: int, desc: str, enabled: bool | None) -> Any:
    from tqdm.auto import tqdm

    disable = (total < 32) if enabled is None else not enabled
    return tqdm(total=total, desc=desc, disable=disable, leave=False)


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
        ov = self.W_V @ self.W_O
        return torch.einsum("k,de->ekd", self.pattern[dest_pos], ov)

    def full(self) -> Float[Tensor, "dest_pos d_model src_pos d_model"]:
        """Materialize ``[dest_pos, d_out, src_pos, d_in]``."""
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


class _Pullback:
    """``g ↦ Tᵀ g`` for batches of cotangents, from ONE forward of the replay at batch 1.

    The replay is affine, so its backward does not depend on the primal: the forward graph is kept
    (``retain_graph``) and every chunk of cotangents is pulled back through it with a vmapped
    backward (``is_grads_batched``). Falls back to a loop of single backwards where an op has no
    batching rule.
    """

    def __init__(self, model: Any, state: FrozenState, spec: ReplaySpec):
        self.x = state.resid_pre(spec.start).detach()[None].clone().requires_grad_(True)
        with torch.enable_grad():
            self.y = _run(model, state, self.x, spec)
        self.batched = True

    def __call__(self, g: Tensor) -> Tensor:
        g = g.to(self.y.dtype)
        if self.batched:
            try:
                (gx,) = torch.autograd.grad(
                    self.y, self.x, grad_outputs=g[:, None], retain_graph=True, is_grads_batched=True
                )
                return gx[:, 0].detach()
            except RuntimeError:
                self.batched = False
        return torch.stack(
            [torch.autograd.grad(self.y, self.x, grad_outputs=gi[None], retain_graph=True)[0][0] for gi in g]
        ).detach()


class TensorLens:
    """The model at one prompt as an exact affine operator ``F(X) = T vec(X) + c``.

    Build it once (one forward pass), then ask for slices, the full tensor, per-block, per-head and
    layer-range tensors, per-input contributions and N×N collapses; nothing larger than asked for is
    ever materialized, and requests over the memory budget are refused before allocating.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32,
        ...     d_vocab=20, n_ctx=8, act_fn="gelu_new", dtype=torch.float64)
        >>> model = HookedTransformer(cfg)
        >>> lens = TensorLens.from_model(model, torch.tensor([1, 4, 2, 7]), output="ln_final")
        >>> T = lens.full()
        >>> T.shape
        torch.Size([4, 16, 4, 16])
        >>> y = torch.einsum("idjk,jk->id", T, lens.input) + lens.bias
        >>> bool(torch.allclose(y, lens.output))
        True
        >>> lens.collapse("logit", token=3).shape
        torch.Size([4, 4])
    """

    def __init__(
        self,
        model: Any,
        state: FrozenState,
        spec: ReplaySpec,
        *,
        bias: bool = True,
        memory_budget: int | None = None,
        progress: bool | None = None,
    ):
        self.model = model
        self.state = state
        self.spec = spec.resolved(state)
        self.with_bias = bias
        self.memory_budget = default_memory_budget() if memory_budget is None else int(memory_budget)
        self.progress = progress
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
        memory_budget: int | None = None,
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
            memory_budget: bytes one request may allocate (default :func:`default_memory_budget`).
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
        memory_budget: int | None = None,
        progress: bool | None = None,
    ) -> "TensorLens":
        """Build a lens from an existing capture (no forward pass)."""
        start, stop = layers if layers is not None else (0, None)
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
        return self._derive(start=layer, stop=layer + 1, output="resid_post")

    def layer_range(self, start: int, stop: int, *, output: OutputPoint = "resid_post") -> "TensorLens":
        """Blocks ``start .. stop-1``: their input → the output point."""
        return self._derive(start=start, stop=stop, output=output)

    def with_heads(self, heads: Mapping[int, Sequence[int]] | None) -> "TensorLens":
        """The same lens with only ``heads`` kept per layer (others zeroed)."""
        return self._derive(heads=heads)

    def head(self, layer: int, head: int) -> HeadTensor:
        """Per-head tensor ``A_h ⊗ (W_V^h W_O^h)ᵀ`` of ``layer``, factored (see :class:`HeadTensor`)."""
        attn = self.model.blocks[layer].attn
        W_V, W_O = attn.W_V, attn.W_O
        n_heads = W_O.shape[0]
        if not 0 <= head < n_heads:
            raise ReplayError(f"head {head} out of range 0..{n_heads - 1} for layer {layer}")
        if W_V.shape[0] != n_heads:  # GQA: query head h reads kv group h // (n_heads / n_kv)
            W_V = W_V.repeat_interleave(n_heads // W_V.shape[0], dim=0)
        pattern = self.state.pattern(layer)[head]
        return HeadTensor(layer, head, pattern.detach(), W_V[head].detach(), W_O[head].detach())

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
                y = _run(self.model, self.state, self.input[None], self.spec)[0]
            self._output = (y - self._affine_constant()) if not self.with_bias else y
        return self._output

    @property
    def d_out(self) -> int:
        """Output channels (d_model, or d_vocab for logits)."""
        return int(self.bias.shape[-1])

    def _affine_constant(self) -> Tensor:
        if self._bias is None:
            with torch.no_grad():
                self._bias = _run(self.model, self.state, torch.zeros_like(self.input)[None], self.spec)[0]
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

    # ------------------------------------------------------------------ engine
    def _item_bytes(self, n: int) -> int:
        """Rough activation memory of one replay item of length n with its backward graph."""
        cfg = self.model.cfg
        d = self.d_in
        d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d)
        h = int(cfg.n_heads)
        layers = int(self.spec.stop or self.state.n_layers)
        item = self.input.element_size()
        per_layer = n * (16 * d + 4 * d_mlp) + 4 * h * n * n
        d_vocab = int(getattr(cfg, "d_vocab", 0) or 0)
        head = n * (3 * d_vocab if self.spec.output == "logits" else 4 * d)
        return item * (layers * per_layer + head)

    def _chunk(self, n: int, total: int, extra_per_item: int = 0) -> int:
        per = self._item_bytes(n) + extra_per_item
        return max(1, min(total, self.memory_budget // max(per, 1)))

    def _check_budget(self, nbytes: int, what: str, cheaper: str) -> None:
        if nbytes > self.memory_budget:
            raise MemoryBudgetError(
                f"{what} needs an estimated {_fmt_bytes(nbytes)}, over the memory budget of "
                f"{_fmt_bytes(self.memory_budget)} (TL_TENSORLENS_MEMORY_BUDGET or memory_budget=); "
                f"cheaper: {cheaper}"
            )

    def _state_for(self, i: int) -> FrozenState:
        """The capture cut to positions <= i when causal (exact then), else the whole capture."""
        if self._causal and i + 1 < self.n_pos:
            return self.state.prefix(i + 1)
        return self.state

    @property
    def _causal(self) -> bool:
        if not hasattr(self, "_causal_cache"):
            self._causal_cache = self.state.is_causal
        return self._causal_cache

    def _pullback(self, state: FrozenState) -> "_Pullback":
        """``g ↦ Tᵀ g`` on (a prefix of) the capture: one forward at batch 1, then batched backwards."""
        return _Pullback(self.model, state, self.spec)

    def _jvp(self, x: Tensor) -> Tensor:
        """``T x`` for a batch ``x`` [B, pos, d_in] (forward mode: no ``F(x) - F(0)`` cancellation)."""
        primal = torch.zeros_like(x)
        with torch.enable_grad():
            tangent_out = torch.func.jvp(lambda inp: _run(self.model, self.state, inp, self.spec), (primal,), (x,))[1]
        return tangent_out.detach()

    def apply(self, x: Float[Tensor, "*batch pos d_model"]) -> Float[Tensor, "*batch pos d_out"]:
        """``T · x`` without materializing ``T`` (batched; the bias is not added)."""
        squeeze = x.ndim == 2
        xb = x[None] if squeeze else x
        if xb.ndim != 3 or xb.shape[1:] != self.input.shape:
            raise ReplayError(
                f"apply: x must be [batch, {self.n_pos}, {self.d_in}] or [pos, d_model], got {tuple(x.shape)}"
            )
        chunk = self._chunk(self.n_pos, xb.shape[0])
        outs = [self._jvp(xb[s : s + chunk].to(self.input)) for s in range(0, xb.shape[0], chunk)]
        y = torch.cat(outs)
        return y[0] if squeeze else y

    def apply_adjoint(self, g: Float[Tensor, "*batch pos d_out"]) -> Float[Tensor, "*batch pos d_model"]:
        """``Tᵀ · g`` without materializing ``T`` (batched)."""
        squeeze = g.ndim == 2
        gb = g[None] if squeeze else g
        if gb.ndim != 3 or gb.shape[1:] != self.bias.shape:
            raise ReplayError(f"apply_adjoint: g must be [batch, {self.n_pos}, {self.d_out}], got {tuple(g.shape)}")
        chunk = self._chunk(self.n_pos, gb.shape[0])
        pull = self._pullback(self.state)
        x = torch.cat([pull(gb[s : s + chunk].to(self.input)) for s in range(0, gb.shape[0], chunk)])
        return x[0] if squeeze else x

    def replay(self, x: Float[Tensor, "*batch pos d_model"]) -> Float[Tensor, "*batch pos d_out"]:
        """``F(x) = T x + c`` (``T x`` when the lens has ``bias=False``)."""
        return self.apply(x) + self.bias

    def _rows(self, i: int, cot: Tensor, desc: str = "") -> Tensor:
        """``Tᵀ`` applied to cotangents living on output position ``i`` only.

        Args:
            cot: ``[k, d_out]`` cotangents at position i.

        Returns:
            ``[k, pos_in, d_in]`` (zeros beyond ``i`` for causal captures).
        """
        state = self._state_for(i)
        n = state.n_pos
        k = cot.shape[0]
        out = torch.zeros(k, self.n_pos, self.d_in, dtype=self.input.dtype, device=self.input.device)
        chunk = self._chunk(n, k, extra_per_item=2 * n * (self.d_out + self.d_in) * self.input.element_size())
        pull = self._pullback(state)
        for s in range(0, k, chunk):
            c = cot[s : s + chunk]
            g = torch.zeros(c.shape[0], n, self.d_out, dtype=self.input.dtype, device=self.input.device)
            g[:, i] = c
            out[s : s + c.shape[0], :n] = pull(g)
        return out

    def _positions(self, positions: Sequence[int] | int | None) -> list[int]:
        if positions is None:
            return list(range(self.n_pos))
        if isinstance(positions, int):
            positions = [positions]
        pos = [int(p) + self.n_pos if int(p) < 0 else int(p) for p in positions]
        for p in pos:
            if not 0 <= p < self.n_pos:
                raise ReplayError(f"output position {p} out of range 0..{self.n_pos - 1}")
        return pos

    # ------------------------------------------------------------------ tensors
    def slice(self, pos_out: int) -> Float[Tensor, "d_out pos_in d_in"]:
        """``T[pos_out]``: one VJP per output channel (batched)."""
        (i,) = self._positions(pos_out)
        nbytes = self.d_out * self.n_pos * self.d_in * self.input.element_size()
        self._check_budget(
            nbytes,
            f"slice({pos_out}) [{self.d_out}, {self.n_pos}, {self.d_in}]",
            "collapse(..., positions=[i]) or a 'ln_final' output instead of 'logits'",
        )
        eye = torch.eye(self.d_out, dtype=self.input.dtype, device=self.input.device)
        return self._rows(i, eye)

    def full(self, *, method: Literal["reverse", "forward"] = "reverse") -> Float[Tensor, "pos_out d_out pos_in d_in"]:
        """The whole tensor ``[pos_out, d_out, pos_in, d_in]``.

        ``method="reverse"`` stacks slices (causal prefixes make it ~2x cheaper);
        ``method="forward"`` pushes the ``pos·d_in`` basis vectors through the replay in batches.
        """
        n, d_in, d_out = self.n_pos, self.d_in, self.d_out
        nbytes = n * d_out * n * d_in * self.input.element_size()
        self._check_budget(
            nbytes,
            f"full() [{n}, {d_out}, {n}, {d_in}]",
            "slice(i), collapse(...), contributions(), or fewer positions",
        )
        T = torch.zeros(n, d_out, n, d_in, dtype=self.input.dtype, device=self.input.device)
        if method == "reverse":
            bar = _progress(n, "full (reverse)", self.progress)
            eye = torch.eye(d_out, dtype=self.input.dtype, device=self.input.device)
            for i in range(n):
                T[i] = self._rows(i, eye)
                bar.update(1)
            bar.close()
            return T
        if method != "forward":
            raise ReplayError(f"full(method={method!r}): choose 'reverse' or 'forward'")
        basis = torch.eye(n * d_in, dtype=self.input.dtype, device=self.input.device).reshape(n * d_in, n, d_in)
        chunk = self._chunk(n, n * d_in)
        bar = _progress(n * d_in, "full (forward)", self.progress)
        for s in range(0, n * d_in, chunk):
            cols = self._jvp(basis[s : s + chunk])  # [k, n_out, d_out]
            idx = torch.arange(s, s + cols.shape[0])
            T[:, :, idx // d_in, idx % d_in] = cols.permute(1, 2, 0)
            bar.update(cols.shape[0])
        bar.close()
        return T

    def contributions(self) -> Float[Tensor, "pos_out pos_in d_out"]:
        """``C[i, j, :] = T[i, :, j, :] @ x_j`` — input j's share of output i; ``Σ_j C[i, j] = F(x)_i − c_i``.

        Forward mode: one JVP per input position (batched).
        """
        n = self.n_pos
        nbytes = n * n * self.d_out * self.input.element_size()
        self._check_budget(nbytes, f"contributions() [{n}, {n}, {self.d_out}]", "collapse('class', direction=...)")
        x = self.input
        basis = torch.zeros(n, n, self.d_in, dtype=x.dtype, device=x.device)
        basis[torch.arange(n), torch.arange(n)] = x
        out = self.apply(basis)  # [j, i, d_out]
        return out.permute(1, 0, 2).contiguous()

    # ------------------------------------------------------------------ collapses
    def _readout(self, kind: str, token: Any, direction: Any) -> Tensor:
        """Per-output-position readout vectors ``u_i`` [pos, d_out] for the class/logit collapses."""
        n = self.n_pos
        if kind == "class":
            if direction is None:
                raise ReplayError("collapse('class') needs direction= (a [d_out] or [pos_out, d_out] readout)")
            u = torch.as_tensor(direction).to(self.input)
        else:
            if token is None:
                raise ReplayError("collapse('logit') needs token= (an id, or one id per output position)")
            tok = torch.as_tensor(token, device=self.input.device).long()
            if self.spec.output == "logits":
                u = torch.nn.functional.one_hot(tok, self.d_out).to(self.input)
            elif self.spec.output == "ln_final":
                cols = self.model.W_U.detach().to(self.input)[:, tok]
                u = cols if tok.ndim == 0 else cols.T
            else:
                raise ReplayError(
                    "collapse('logit') needs output='ln_final' or 'logits' (the residual stream is not read "
                    "through ln_final); use collapse('class', direction=...) for a readout of resid_post"
                )
        if u.ndim == 1:
            u = u.expand(n, -1)
        if u.shape != (n, self.d_out):
            raise ReplayError(f"readout must be [d_out={self.d_out}] or [pos_out={n}, d_out], got {tuple(u.shape)}")
        return u

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
            kind: "norm", "in_out", "logit" (needs ``token``) or "class" (needs ``direction``).
            token: unembedding column(s) for "logit": one id, or one per output position.
            direction: readout vector(s) for "class" ``[d_out]`` or ``[pos_out, d_out]`` (e.g. a
                classifier head's column).
            positions: output rows to compute (default all); the result has one row each.

        Returns:
            ``[len(positions), pos_in]``.
        """
        rows = self._positions(positions)
        n = self.n_pos
        M = torch.zeros(len(rows), n, dtype=self.input.dtype, device=self.input.device)
        x = self.input
        if kind == "norm":
            bar = _progress(len(rows), "norm collapse", self.progress)
            eye = torch.eye(self.d_out, dtype=x.dtype, device=x.device)
            for r, i in enumerate(rows):
                sl = self._rows(i, eye)  # [d_out, n, d_in], one slice at a time
                M[r] = sl.pow(2).sum(dim=(0, 2)).sqrt()
                bar.update(1)
            bar.close()
            return M
        if kind == "in_out":
            u = self.output
            h_in = x
        elif kind in ("logit", "class"):
            u = self._readout(kind, token, direction)
            h_in = x
        else:
            raise ReplayError(f"collapse kind {kind!r}; choose 'norm', 'in_out', 'logit' or 'class'")
        g = torch.zeros(len(rows), n, self.d_out, dtype=x.dtype, device=x.device)
        for r, i in enumerate(rows):
            g[r, i] = u[i]
        bar = _progress(len(rows), f"{kind} collapse", self.progress)
        chunk = self._chunk(n, len(rows))
        pull = self._pullback(self.state)
        for s in range(0, len(rows), chunk):
            adj = pull(g[s : s + chunk])  # [k, n, d_in]
            M[s : s + adj.shape[0]] = (adj * h_in).sum(-1)
            bar.update(adj.shape[0])
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
        (``+ b_U[token]`` for the logit collapse at ``ln_final``), so ``collapse(...).sum(-1) +
        collapse_bias(...)`` is the logit / readout of the model."""
        c = self.bias
        if kind == "in_out":
            return (self.output * c).sum(-1)
        if kind not in ("logit", "class"):
            raise ReplayError(f"collapse_bias({kind!r}): only 'in_out', 'logit' and 'class' have a bias part")
        u = self._readout(kind, token, direction)
        part = (u * c).sum(-1)
        if kind == "logit" and self.spec.output == "ln_final":
            b_U = getattr(self.model, "b_U", None)
            if b_U is not None:
                tok = torch.as_tensor(token, device=c.device).long().expand(self.n_pos)
                part = part + b_U.detach().to(c)[tok]
        return part

    def collapse_randomized_norm(
        self, probes: int = 16, *, positions: Sequence[int] | int | None = None, seed: int = 0
    ) -> RandomizedNorm:
        """Hutchinson estimate of the Norm collapse: ``probes`` VJPs per output position.

        For ``B = T[i, :, j, :]`` and a Rademacher probe ``z`` on output position ``i``,
        ``E‖Bᵀz‖² = ‖B‖²_F``, and one VJP gives ``Bᵀz`` for every ``j`` at once. Cost: ``probes`` VJPs
        per row instead of ``d_out``; the standard error shrinks as ``1/sqrt(probes)``.

        The per-probe samples ``‖Bᵀz‖²`` are skewed when a few directions dominate ``B``, so with few
        probes (< ~100) the *reported* standard error (sample std / sqrt(probes)) tends to
        under-cover; the estimate itself stays unbiased at any ``probes``.
        """
        if probes < 2:
            raise ReplayError("collapse_randomized_norm needs probes >= 2 to report a standard error")
        rows = self._positions(positions)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        n = self.n_pos
        sq = torch.zeros(len(rows), n, dtype=self.input.dtype)
        se = torch.zeros_like(sq)
        bar = _progress(len(rows), "randomized norm", self.progress)
        for r, i in enumerate(rows):
            z = (torch.randint(0, 2, (probes, self.d_out), generator=gen) * 2 - 1).to(self.input)
            adj = self._rows(i, z)  # [probes, n, d_in]
            samples = adj.pow(2).sum(-1)  # [probes, n]
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


__all__ = ["HeadTensor", "RandomizedNorm", "TensorLens", "default_memory_budget"]
