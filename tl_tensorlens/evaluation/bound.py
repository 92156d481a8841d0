"""How well does the tensor computed at x0 describe the model near x0? (Prop. 1, App. E)

TensorLens (Atad et al. 2026, arXiv 2601.17958, Sec. 3.6 and App. E) bounds the error of applying the
tensor computed at ``x0`` to a perturbed input. With ``F`` the **real** model read from
``blocks.0.hook_resid_pre`` and ``F(x) ≈ T(x0) x + c(x0)``, the error at ``x0 + ε`` is

    E(ε) = F(x0 + ε) − (T(x0)(x0 + ε) + c(x0)) = F(x0 + ε) − F(x0) − T(x0) ε,

because ``T(x0) x0 + c(x0) = F(x0)`` exactly. ``T(x0)`` is the Jacobian of the *frozen* replay, not of
``F`` (the derivatives of the frozen patterns, norm scales and activation gates are left out), so
``E`` is first order in ``ε``, not second order. The paper's formulas were lost with the text; this
module derives a bound of the same shape (per component a Lipschitz-type constant, one
data-dependent term per norm, ``(1 + ·)`` factors multiplied across residual blocks) and makes it
valid for the real model on the whole ball it is evaluated on.

Norm. Every quantity is measured **per token**: ``‖v_n‖`` is the Euclidean norm of token ``n``'s
``d_model`` vector. This is the norm in which "rows of A sum to 1" gives an attention constant free
of ``N``: ``‖Σ_m A_nm x_m‖ ≤ max_m ‖x_m‖`` for a (sub)stochastic row, whereas the spectral norm of
``A`` over all tokens can reach ``sqrt(N)`` (every query on one key), so the paper's
``Σ_h ‖W_V^h W_O^h‖₂`` is a valid constant in this norm, not in the Frobenius norm of ``vec(X)``.
The result is a per-token bound ``‖E_n‖ ≤ B_n``; the Frobenius statement follows as
``‖E‖_F ≤ sqrt(Σ_n B_n²)``.

Statement. Start from ``δ_n = τ_n = ‖ε_n‖`` and push both through the layers (below). ``δ`` bounds the
change of the real model, ``‖F(x0+ε)_n − F(x0)_n‖ ≤ δ_n^out``; ``τ`` bounds the frozen linear map,
``‖(T ε)_n‖ ≤ τ_n^out``. Then, for every ε (no smallness assumption),

    ‖E(ε)_n‖ ≤ ‖F(x0+ε)_n − F(x0)_n‖ + ‖(T ε)_n‖ ≤ B_n := δ_n^out + τ_n^out.

For small ε, ``B ≈ (Lip(F; x0) + ‖T(x0)‖) ‖ε‖_{∞,2}`` with ``‖ε‖_{∞,2} = max_n ‖ε_n‖``; the reported
``constant`` is that first-order factor (``max_n B_n / r`` at a uniform tiny radius ``r``).

Components (``x`` the sub-layer input at x0, ``η_n`` the bound on its change; ``‖·‖₂`` spectral norms,
all from the weights):

* **Norm** (LN, LNPre, RMS, RMSPre; ln1/ln2/ln_final, Gemma-2 ``ln*_post``, OLMo-2 post-norms, BERT
  norms, q/k norms). ``N(x) = w ⊙ C x / s(x) + b`` with ``s = sqrt(‖C x‖²/D + eps)`` (RMS: no
  centering ``C``). Its Jacobian is ``(1/s)(I − y yᵀ/(D s²)) C`` with ``y = Cx``, of norm ``≤ 1/s``.
  Frozen (T): ``‖w‖_∞ η_n / s_n`` — **the data-dependent term**: ``s_n`` is the captured
  ``hook_scale``, the smallest of which over tokens, ``σ_min``, sets the constant. Real (F): on the
  segment from ``x_n`` to ``x'_n``, ``‖C x_t‖ ≥ ρ_n − η_n`` with ``ρ_n = ‖C x_n‖ = sqrt(D (s_n² − eps))``,
  so ``s`` stays ``≥ s_lo = sqrt(max(ρ_n − η_n, 0)²/D + eps)`` and the change is
  ``≤ min(‖w‖_∞ η_n / s_lo, 2 ‖w‖_∞ sqrt(D))`` (the second term: a normalized vector has norm
  ``≤ sqrt(D)``). The scale at ``x0 + ε`` can be smaller than at ``x0``; ``s_lo`` accounts for it,
  and ``eps > 0`` keeps it positive, so the bound holds for every ε (it grows quickly once ``η_n``
  approaches ``ρ_n``, where the norm's input may pass through zero).
* **Attention**, ``y_n = Σ_h Σ_m A^h_nm z^h_m + b_O`` with ``z^h_m = v_m W_O^h``. Frozen (T):
  ``Σ_h ‖W_V^h W_O^h‖₂ Σ_m A^h_nm η_m`` (A of x0, rows ≥ 0 summing to ≤ 1). Real (F):
  ``A'z' − Az = A'(z' − z) + (A' − A) z`` gives
  ``Σ_h [‖W_V^h W_O^h‖₂ min(max_m η_m, Σ_m A^h_nm η_m + a^h_n max_m η_m) + a^h_n R^h_n]`` where the max runs
  over the keys query ``n`` may attend to (``m ≤ n`` for causal models), ``R^h_n`` is half the diameter
  of ``{z^h_m}`` (rows of ``A`` and ``A'`` both sum to 1, so ``Σ_m (A'−A)_nm = 0``; with attention sinks
  ``max_m ‖z^h_m‖``), and ``a^h_n ≥ ‖A'^h_n − A^h_n‖₁``. Softmax is not globally Lipschitz in its
  input, but its Jacobian ``diag(p) − p pᵀ`` maps a score change ``v`` to ``‖·‖₁ ≤ osc(v)/2``, so along
  the straight path in score space ``‖ΔA_n‖₁ ≤ max_m |Δs_nm|`` (masks are fixed; the soft-cap
  ``c·tanh(s/c)`` and ALiBi are 1-Lipschitz / constant; a sink logit does not move), and
  ``|Δs_nm| ≤ (‖Δq_n‖ ‖k_m‖ + ‖q_n‖ ‖Δk_m‖ + ‖Δq_n‖ ‖Δk_m‖) / attn_scale`` with ``q, k`` of x0 (rotary
  is orthogonal, so norms are unchanged) and ``‖Δq_n‖ ≤ ‖W_Q^h‖₂ η_n`` (through the q/k norm bound
  above when the model has one). Hence ``a^h_n = min(2, max_m |Δs_nm|)``: quadratic in ``η``, bounded
  over the whole ball, and exact in the data at x0.
* **MLP**. Plain ``act(x W_in + b_in) W_out``: real ``‖W_in‖₂ ‖W_out‖₂ L_act η_n`` with ``L_act = sup|act'|``
  (GELU 1.129, SiLU 1.100, ReLU 1); frozen ``‖W_in‖₂ ‖W_out‖₂ max_k |r_nk| η_n`` with ``r`` the frozen
  ratio ``act(pre)/pre``. Gated ``(act(x W_gate) ⊙ x W_in) W_out``: the frozen gate gives
  ``‖W_in‖₂ ‖W_out‖₂ G_n η_n`` with ``G_n = ‖act(g_n)‖_∞``; the real one, from
  ``act(g')⊙l' − act(g)⊙l = act(g')⊙Δl + Δact⊙l``,
  ``‖W_out‖₂ [(G_n + L_act ‖W_gate‖₂ η_n) ‖W_in‖₂ η_n + L_act ‖W_gate‖₂ η_n ‖l_n‖_∞]``.
* **Residual and blocks**: ``x + f(x)`` adds bounds (``η + Δf``), so sequential pre-norm blocks give
  ``(1 + ·)(1 + ·)`` factors, parallel blocks ``1 + · + ·``, Gemma-2 sandwich and OLMo-2 post-norms
  insert the norm bound after each sub-layer, BERT's post-LN block applies its LN bounds after each
  residual add. **Head**: ``ln_final`` (a norm), the unembedding ``‖W_U‖₂``, the output-logit
  soft-cap (1-Lipschitz; frozen ratio ``≤ 1``), BERT's MLM head (dense, GELU, LN).

Covered: HookedTransformer (every norm type, sequential / parallel / attention-only blocks, GQA,
standard / rotary / shortformer / ALiBi positions, sliding windows, soft-caps, attention sinks,
Gemma-2 sandwich norms, Gemma-3 and OLMo-2 q/k norms, OLMo-2 post-norm) and HookedEncoder (BERT).
Refused by name (:class:`~tl_tensorlens.errors.UnsupportedModelError`): the TransformerBridge (its
weights are not exposed in TransformerLens layout), activations without a known global slope bound
(SoLU, ReLU², xIELU), log-n attention scaling.

Numerics: the bound is computed in float64 and holds in exact arithmetic. The measured error is computed
in the model's dtype and carries rounding of order ``u ‖F‖`` (``u`` the unit roundoff: 1e-16 in float64,
6e-8 in float32), which the report's ``rounding`` allowance covers; it matters only where the error is
itself at rounding level (tiny ε in float32, or a model whose output does not depend on its input).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_tensorlens._backend import OUTPUT_POINTS, OutputPoint
from tl_tensorlens.capture import FrozenState, capture
from tl_tensorlens.errors import ArgumentError, UnsupportedModelError
from tl_tensorlens.replay import live
from tl_tensorlens.tensors import TensorLens

#: ``sup_x |act'(x)|`` for each activation, measured on a 2.4M-point float64 grid over [-30, 30]
#: (the maximum is at |x| ≈ 1.4-2.4) and rounded up in the 4th decimal.
ACTIVATION_SLOPE_BOUND: dict[str, float] = {
    "gelu": 1.1290,
    "gelu_new": 1.1290,
    "gelu_fast": 1.1290,
    "gelu_pytorch_tanh": 1.1290,
    "silu": 1.0999,
    "swish": 1.0999,
    "quick_gelu": 1.0999,
    "mish": 1.0885,
    "relu": 1.0,
    "tanh": 1.0,
}

_POSITIONAL = {"standard", "rotary", "shortformer", "alibi"}
_POST_NORM = {"OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"}


@dataclass(frozen=True)
class ApproximationReport:
    """Measured error of the tensor at x0 on perturbed inputs, against the Prop. 1 bound.

    One row per perturbation ε (random ones first scale by scale, ``n_random`` per scale).

    Attributes:
        output: the output point ("resid_post", "ln_final" or "logits").
        scales: per row, ``‖ε‖_F / ‖x0‖_F`` (the requested scale for random ε).
        eps_norm: per row, ``‖ε‖_F``.
        error: per row and output token, ``‖F(x0+ε)_n − F(x0)_n − (T ε)_n‖``.
        bound: per row and output token, the bound ``B_n = δ_n + τ_n`` (module docstring).
        model_change: the part ``δ_n`` bounding ``‖F(x0+ε)_n − F(x0)_n‖``.
        linear_part: the part ``τ_n`` bounding ``‖(T ε)_n‖``.
        measured_change: ``‖F(x0+ε)_n − F(x0)_n‖`` (what ``model_change`` bounds).
        measured_linear: ``‖(T ε)_n‖`` (what ``linear_part`` bounds).
        rounding: allowance for floating-point rounding in the *measured* quantities (the bound is for
            exact arithmetic): ``64 u (‖F(x0)_n‖ + ‖F(x0+ε)_n‖ + ‖(T ε)_n‖)`` with ``u`` the unit roundoff
            of the model's dtype. It matters only where the error itself is at rounding level.
        constant: first-order factor: ``B ≈ constant · max_n ‖ε_n‖`` as ε → 0.
        sigma_min: per norm (hook name of its scale), the smallest captured scale over tokens — the
            data-dependent terms of the bound.
    """

    output: str
    scales: Float[Tensor, " n_eps"]
    eps_norm: Float[Tensor, " n_eps"]
    error: Float[Tensor, "n_eps pos"]
    bound: Float[Tensor, "n_eps pos"]
    model_change: Float[Tensor, "n_eps pos"]
    linear_part: Float[Tensor, "n_eps pos"]
    measured_change: Float[Tensor, "n_eps pos"]
    measured_linear: Float[Tensor, "n_eps pos"]
    rounding: Float[Tensor, "n_eps pos"]
    constant: float
    sigma_min: dict[str, float]

    @property
    def error_max(self) -> Float[Tensor, " n_eps"]:
        """Worst token error ``max_n ‖E_n‖`` per row."""
        return self.error.amax(-1)

    @property
    def bound_max(self) -> Float[Tensor, " n_eps"]:
        """Bound on the worst token error per row."""
        return self.bound.amax(-1)

    @property
    def error_fro(self) -> Float[Tensor, " n_eps"]:
        """Frobenius error ``‖E‖_F`` per row."""
        return self.error.pow(2).sum(-1).sqrt()

    @property
    def bound_fro(self) -> Float[Tensor, " n_eps"]:
        """Bound on the Frobenius error, ``sqrt(Σ_n B_n²)``, per row."""
        return self.bound.pow(2).sum(-1).sqrt()

    @property
    def holds(self) -> bool:
        """True when every token error of every row is within its bound (and each half within its part),
        up to the :attr:`rounding` allowance."""
        return bool(
            (self.error <= self.bound + self.rounding).all()
            and (self.measured_change <= self.model_change + self.rounding).all()
            and (self.measured_linear <= self.linear_part + self.rounding).all()
        )

    @property
    def tightness(self) -> Float[Tensor, " n_eps"]:
        """``bound_max / error_max`` per row (>= 1 when the bound holds; smaller is tighter)."""
        return self.bound_max / self.error_max.clamp_min(torch.finfo(self.error.dtype).tiny)

    def table(self) -> str:
        """A plain-text table: one line per row."""
        lines = [f"{'scale':>9} {'‖ε‖_F':>10} {'max err':>10} {'max bound':>10} {'bound/err':>10}"]
        for s, e, er, b, t in zip(
            self.scales, self.eps_norm, self.error_max, self.bound_max, self.tightness, strict=True
        ):
            lines.append(f"{float(s):9.1e} {float(e):10.3e} {float(er):10.3e} {float(b):10.3e} {float(t):10.1f}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"ApproximationReport(output={self.output}, n_eps={self.error.shape[0]}, pos={self.error.shape[1]}, "
            f"holds={self.holds}, constant={self.constant:.3g}, dtype={self.error.dtype})"
        )


# ---------------------------------------------------------------------------------------------- checks
def check_bound_supported(model: Any) -> None:
    """Refuse, by name, every model setting the bound does not cover.

    Raises:
        UnsupportedModelError: listing each offending setting and why.
    """
    bad: dict[str, str] = {}
    mro = [c.__name__ for c in type(model).__mro__]
    if "HookedTransformer" not in mro and "HookedEncoder" not in mro:
        bad["backend"] = (
            f"{type(model).__name__}: the bound reads TransformerLens component weights (W_Q, W_K, W_V, W_O, "
            "W_in, W_gate, W_out, W_U, norm gains), which only HookedTransformer and HookedEncoder expose; "
            "TransformerBridge is not covered"
        )
        raise UnsupportedModelError(bad)
    cfg = model.cfg
    if not getattr(cfg, "attn_only", False):
        act = getattr(cfg, "act_fn", None)
        if act not in ACTIVATION_SLOPE_BOUND:
            bad["act_fn"] = (
                f"{act!r} has no global slope bound here (SoLU normalizes across neurons, ReLU² and xIELU have "
                f"unbounded slopes); covered: {sorted(ACTIVATION_SLOPE_BOUND)}"
            )
    pos = getattr(cfg, "positional_embedding_type", "standard")
    if pos not in _POSITIONAL:
        bad["positional_embedding_type"] = f"{pos!r} is not one of {sorted(_POSITIONAL)}"
    if getattr(cfg, "use_logn_attn", False):
        bad["use_logn_attn"] = "log-n query scaling is not modelled by the attention bound"
    if getattr(cfg, "num_experts", None):
        bad["num_experts"] = "mixture-of-experts routing is not covered"
    if getattr(cfg, "load_in_4bit", False):
        bad["load_in_4bit"] = "quantized weights have no exact spectral norms here"
    if bad:
        raise UnsupportedModelError(bad)


# ---------------------------------------------------------------------------------------------- helpers
def _spec(w: Tensor) -> float:
    """Spectral norm in float64."""
    return float(torch.linalg.matrix_norm(w.detach().double(), ord=2))


def _w_inf(mod: Any) -> float:
    w = getattr(mod, "w", None)
    return 1.0 if w is None else float(w.detach().double().abs().max())


def _per_token(x: Tensor, n: int) -> Tensor:
    """A cached ``[1, pos, ...]`` scale as ``[pos]`` (split-qkv copies per head are identical)."""
    return x.detach().double().reshape(n, -1).amin(-1)


class _Bounds:
    """The two propagations of the module docstring over one capture: ``frozen=False`` bounds the
    change of the real model, ``frozen=True`` the frozen linear map ``T``."""

    def __init__(self, model: Any, state: FrozenState):
        self.model = model
        self.state = state
        self.cfg = model.cfg
        self.acts = state.activations
        self.n = state.n_pos
        self.encoder = state.backend == "encoder"
        self.causal = (not self.encoder) and getattr(self.cfg, "attention_dir", "causal") == "causal"
        self.post_norm = getattr(self.cfg, "original_architecture", None) in _POST_NORM
        self.sandwich = bool(getattr(self.cfg, "use_normalization_before_and_after", False))
        self.eps = float(getattr(self.cfg, "eps", 1e-5))
        self.sigma_min: dict[str, float] = {}
        self._layer_cache: dict[int, dict[str, Any]] = {}

    # ------------------------------------------------------------------ norms
    def norm(self, name: str, mod: Any, d: Tensor, frozen: bool) -> Tensor:
        """Bound through the norm whose scale was captured at ``{name}.hook_scale``."""
        key = f"{name}.hook_scale"
        if key not in self.acts:  # normalization_type=None: an identity module
            return d
        s = _per_token(self.acts[key], self.n)
        self.sigma_min[key] = float(s.min())
        w = _w_inf(mod)
        dim = int(self.cfg.d_model) if getattr(mod, "w", None) is None else int(mod.w.shape[-1])
        return _norm_dev(d, s, w, dim, self.eps, frozen)

    # ------------------------------------------------------------------ attention
    def _attn_data(self, layer: int) -> dict[str, Any]:
        if layer in self._layer_cache:
            return self._layer_cache[layer]
        attn = self.model.blocks[layer].attn
        p = f"blocks.{layer}.attn."
        H = int(self.cfg.n_heads)
        W_Q = attn.W_Q.detach().double()  # [H, D, dh]
        W_K = attn.W_K.detach().double()  # [H, D, dh] (GQA: expanded to query heads)
        W_V = attn.W_V.detach().double()
        W_O = attn.W_O.detach().double()  # [H, dh, D]
        q = self.acts[p + "hook_q"][0].double()  # [pos, H, dh]
        k = self.acts[p + "hook_k"][0].double()  # [pos, Hkv, dh]
        v = self.acts[p + "hook_v"][0].double()
        rep = H // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # ‖W_V W_O‖₂ = ‖R W_O‖₂ with W_V = QR (Q orthonormal columns): a [d_head, D] SVD per head.
        ov = torch.tensor([_spec(torch.linalg.qr(W_V[h]).R @ W_O[h]) for h in range(H)], dtype=torch.float64)
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        mode = "none" if q_norm is None else ("head" if int(q_norm.w.shape[-1]) == q.shape[-1] else "full")
        # The full-vector (OLMo) norms act on the unexpanded kv heads.
        W_K_raw = getattr(attn, "_W_K", attn.W_K).detach().double()
        k_raw = self.acts[p + "hook_k"][0].double()
        z = torch.einsum("mhe,hed->hmd", v, W_O)  # [H, pos, D]
        sinks = bool(getattr(self.cfg, "use_attention_sinks", False))
        data: dict[str, Any] = dict(
            q=_QK(q, W_Q, mode, q_norm, self.eps, rep=1),
            k=_QK(k_raw, W_K_raw, mode, k_norm, self.eps, rep=rep, W_expanded=W_K),
            ov=ov,
            pattern=self.state.pattern(layer).detach().double(),
            scale=float(attn.attn_scale),
            z=z,
            sinks=sinks,
            R=self._spread(z, half_diameter=not sinks),
        )
        if mode != "none":
            self.sigma_min[p + "q_norm.hook_scale"] = data["q"].sigma_min
            self.sigma_min[p + "k_norm.hook_scale"] = data["k"].sigma_min
        self._layer_cache[layer] = data
        return data

    def _allowed_max(self, x: Tensor) -> Tensor:
        """``max_{m allowed for n} x[..., m]`` as ``[..., n]`` (prefix max when causal)."""
        if self.causal:
            return torch.cummax(x, dim=-1).values
        return x.amax(-1, keepdim=True).expand_as(x)

    def _spread(self, z: Tensor, half_diameter: bool) -> Tensor:
        """Per head and query, half the diameter (or the max norm) of the values it may attend to."""
        if not half_diameter:
            return self._allowed_max(z.norm(dim=-1))
        dist = torch.cdist(z, z)  # [H, pos, pos]
        if self.causal:
            # max over m, m' <= n: prefix max along both key axes, then the diagonal.
            dist = torch.cummax(torch.cummax(dist, dim=-1).values, dim=-2).values
            return 0.5 * torch.diagonal(dist, dim1=-2, dim2=-1)
        return 0.5 * dist.amax(dim=(-2, -1))[:, None].expand(-1, z.shape[1])

    def attention(self, layer: int, d: Tensor, frozen: bool) -> Tensor:
        data = self._attn_data(layer)
        A, ov = data["pattern"], data["ov"]  # [H, n, m], [H]
        mixed = torch.einsum("hnm,m->hn", A, d)  # Σ_m A_nm η_m
        if frozen:
            return (ov[:, None] * mixed).sum(0)
        dq, qn = data["q"].dev(d), data["q"].norms  # [n, H]
        dk, kn = data["k"].dev(d), data["k"].norms
        ds = (
            dq.T[:, :, None] * kn.T[:, None, :]
            + qn.T[:, :, None] * dk.T[:, None, :]
            + dq.T[:, :, None] * dk.T[:, None, :]
        ) / data["scale"]  # [H, n, m]
        if self.causal:
            ds = ds.masked_fill(~torch.ones(self.n, self.n, dtype=torch.bool).tril(), 0.0)
        a = ds.amax(-1).clamp_max(2.0)  # ‖ΔA_n‖₁ bound [H, n]
        dmax = self._allowed_max(d)[None]  # [1, n]
        value_part = ov[:, None] * torch.minimum(dmax, mixed + a * dmax)
        return (value_part + a * data["R"]).sum(0)

    # ------------------------------------------------------------------ MLP
    def mlp(self, layer: int, d: Tensor, frozen: bool) -> Tensor:
        mlp = self.model.blocks[layer].mlp
        p = f"blocks.{layer}.mlp."
        W_in, W_out = _spec(mlp.W_in), _spec(mlp.W_out)
        act_fn = self.cfg.act_fn
        L = ACTIVATION_SLOPE_BOUND[act_fn]
        if self.state.mlp_kind.get(layer) == "gated":
            W_gate = _spec(mlp.W_gate)
            g = self.acts[p + "hook_pre"][0]
            G = mlp.act_fn(g).detach().double().abs().amax(-1)
            if frozen:
                return W_out * G * W_in * d
            lin = self.acts[p + "hook_pre_linear"][0].double().abs().amax(-1)
            dg = L * W_gate * d
            return W_out * ((G + dg) * W_in * d + dg * lin)
        if frozen:
            r = self.state.frozen[p + "hook_post"][0].double().abs().amax(-1)
            return W_out * r * W_in * d
        return W_out * L * W_in * d

    # ------------------------------------------------------------------ blocks
    def block(self, layer: int, d: Tensor, frozen: bool) -> Tensor:
        blk = self.model.blocks[layer]
        b = f"blocks.{layer}."
        if self.encoder:  # BERT post-LN: LN1(x + attn(x)) -> LN2(h + mlp(h))
            mid = self.norm(b + "ln1", blk.ln1, d + self.attention(layer, d, frozen), frozen)
            return self.norm(b + "ln2", blk.ln2, mid + self.mlp(layer, mid, frozen), frozen)

        def attn_branch(x: Tensor) -> Tensor:
            u = x if self.post_norm else self.norm(b + "ln1", blk.ln1, x, frozen)
            y = self.attention(layer, u, frozen)
            if self.sandwich:
                y = self.norm(b + "ln1_post", blk.ln1_post, y, frozen)
            if self.post_norm:
                y = self.norm(b + "ln1", blk.ln1, y, frozen)
            return y

        def mlp_branch(x: Tensor) -> Tensor:
            u = x if self.post_norm else self.norm(b + "ln2", blk.ln2, x, frozen)
            y = self.mlp(layer, u, frozen)
            if self.sandwich:
                y = self.norm(b + "ln2_post", blk.ln2_post, y, frozen)
            if self.post_norm:
                y = self.norm(b + "ln2", blk.ln2, y, frozen)
            return y

        if getattr(self.cfg, "attn_only", False):
            return d + attn_branch(d)
        if getattr(self.cfg, "parallel_attn_mlp", False):
            return d + attn_branch(d) + mlp_branch(d)
        mid = d + attn_branch(d)
        return mid + mlp_branch(mid)

    def head(self, d: Tensor, output: str, frozen: bool) -> Tensor:
        if output == "resid_post":
            return d
        m = self.model
        if self.encoder:
            head = m.mlm_head
            ratio = self.state.head_act_ratio
            if frozen:
                slope = max((float(r.double().abs().max()) for r in ratio.values()), default=1.0)
            else:
                slope = ACTIVATION_SLOPE_BOUND[self.cfg.act_fn]
            d = self.norm("mlm_head.ln", head.ln, _spec(head.W) * slope * d, frozen)
        else:
            ln_final = getattr(m, "ln_final", None)  # absent with normalization_type=None
            if ln_final is not None:
                d = self.norm("ln_final", ln_final, d, frozen)
        if output == "ln_final":
            return d
        # Output soft-cap c·tanh(z/c): 1-Lipschitz, and its frozen ratio is <= 1.
        return _spec(m.W_U) * d

    def propagate(self, d0: Tensor, output: str, frozen: bool) -> Tensor:
        d = d0
        for layer in range(self.state.n_layers):
            d = self.block(layer, d, frozen)
        return self.head(d, output, frozen)


class _QK:
    """Per-token, per-query-head norms of q (or k) at x0 and the bound on their change, through an
    optional q/k RMSNorm over one head ("head", Gemma-3) or over all heads ("full", OLMo-2)."""

    def __init__(
        self, pre: Tensor, W: Tensor, mode: str, norm: Any, eps: float, rep: int, W_expanded: Tensor | None = None
    ):
        self.mode, self.eps, self.rep = mode, eps, rep
        n, h, dh = pre.shape
        if mode == "none":
            W_heads = W_expanded if W_expanded is not None else W
            self.w_head = torch.tensor([_spec(W_heads[i]) for i in range(W_heads.shape[0])], dtype=torch.float64)
            self.norms = pre.norm(dim=-1).repeat_interleave(rep, dim=1)  # [n, H]
            return
        w = norm.w.detach().double()
        self.w_inf = float(w.abs().max())
        if mode == "head":
            self.dim = dh
            self.w_head = torch.tensor([_spec(W[i]) for i in range(W.shape[0])], dtype=torch.float64)  # [h]
            rho = pre.norm(dim=-1)  # [n, h]
            s = (rho.pow(2) / dh + eps).sqrt()
            self.norms = (w * pre / s[..., None]).norm(dim=-1).repeat_interleave(rep, dim=1)
        else:
            self.dim = h * dh
            self.w_full = _spec(W.permute(1, 0, 2).reshape(W.shape[1], h * dh))  # [D, h*dh]
            flat = pre.reshape(n, h * dh)
            rho = flat.norm(dim=-1)[:, None]  # [n, 1]
            s = (rho.pow(2) / self.dim + eps).sqrt()
            self.norms = (w * flat / s).reshape(n, h, dh).norm(dim=-1).repeat_interleave(rep, dim=1)
        self.rho = rho
        self.sigma_min = float(s.min())

    def dev(self, d: Tensor) -> Tensor:
        """``[n, H]`` bound on the change of the (normalized) q/k of each token for input change ``d``."""
        if self.mode == "none":
            return d[:, None] * self.w_head[None]
        base = d[:, None] * (self.w_head[None] if self.mode == "head" else self.w_full)  # [n, h] or [n, 1]
        lo = ((self.rho - base).clamp_min(0).pow(2) / self.dim + self.eps).sqrt()
        out = torch.minimum(self.w_inf * base / lo, torch.full_like(base, 2 * self.w_inf * math.sqrt(self.dim)))
        if self.mode == "head":
            return out.repeat_interleave(self.rep, dim=1)
        return out.expand(-1, self.norms.shape[1])


def _norm_dev(d: Tensor, s: Tensor, w_inf: float, dim: int, eps: float, frozen: bool) -> Tensor:
    """Bound on a norm's output change per token (module docstring, "Norm")."""
    if frozen:
        return w_inf * d / s
    rho = (dim * (s.pow(2) - eps).clamp_min(0)).sqrt()
    lo = ((rho - d).clamp_min(0).pow(2) / dim + eps).sqrt()
    cap = torch.full_like(d, 2 * w_inf * math.sqrt(dim))
    return torch.where(d > 0, torch.minimum(w_inf * d / lo, cap), torch.zeros_like(d))


# ---------------------------------------------------------------------------------------------- live model
def _live(model: Any, state: FrozenState, x: Tensor, output: OutputPoint) -> Tensor:
    """The real (unfrozen) model on a batch of block-0 inputs ``x`` [batch, pos, d_model]."""
    return live(model, state, x, output=output)


# ---------------------------------------------------------------------------------------------- public
def approximation_bound(
    model: Any,
    state: FrozenState,
    eps_token_norms: Float[Tensor, "n_eps pos"],
    *,
    output: OutputPoint = "resid_post",
) -> tuple[Float[Tensor, "n_eps pos"], Float[Tensor, "n_eps pos"]]:
    """The two parts ``(δ, τ)`` of the bound for perturbations with the given per-token norms.

    ``‖F(x0+ε)_n − F(x0)_n‖ ≤ δ_n`` and ``‖(T ε)_n‖ ≤ τ_n`` for every ε with ``‖ε_m‖ <= eps_token_norms[m]``
    (module docstring); the bound on the error is ``δ + τ``.
    """
    check_bound_supported(model)
    b = _Bounds(model, state)
    d0 = eps_token_norms.detach().double()
    live = torch.stack([b.propagate(row, output, frozen=False) for row in d0])
    lin = torch.stack([b.propagate(row, output, frozen=True) for row in d0])
    return live, lin


def approximation_error(
    model: Any,
    tokens_or_state: Any,
    *,
    eps: Float[Tensor, "*n_eps pos d_model"] | None = None,
    scales: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0),
    n_random: int = 4,
    seed: int = 0,
    output: OutputPoint = "resid_post",
) -> ApproximationReport:
    """Measure ``‖F(x0+ε) − F(x0) − T(x0) ε‖`` per token and compare it with the Prop. 1 bound.

    ``F`` is the real model with ``x0 + ε`` fed at ``blocks.0.hook_resid_pre``; ``T(x0) ε`` comes from
    :meth:`TensorLens.apply` (never materialized). The bound is derived in the module docstring.

    Args:
        model: a HookedTransformer or HookedEncoder (TL 3.x).
        tokens_or_state: one prompt, or a :class:`~tl_tensorlens.capture.FrozenState` of it.
        eps: perturbations ``[pos, d_model]`` or ``[n_eps, pos, d_model]``; None draws ``n_random``
            Gaussian directions, each scaled to ``‖ε‖_F = scale · ‖x0‖_F`` for every scale (the same
            directions at every scale, so rows of equal direction show the error's order in ``‖ε‖``).
        scales: relative sizes of the random ε.
        n_random: random directions per scale.
        seed: seed of the random directions.
        output: "resid_post", "ln_final" or "logits".

    Returns:
        An :class:`ApproximationReport`.

    Raises:
        UnsupportedModelError: the model is outside what the bound covers (see
            :func:`check_bound_supported`).
        ArgumentError: ``eps`` has the wrong shape, or ``output`` is unknown.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32,
        ...     d_vocab=20, n_ctx=8, act_fn="gelu_new", dtype=torch.float64)
        >>> report = approximation_error(HookedTransformer(cfg), torch.tensor([1, 4, 2, 7]), n_random=2)
        >>> report.holds
        True
        >>> report.error.shape  # 4 scales x 2 directions, 4 tokens
        torch.Size([8, 4])
    """
    check_bound_supported(model)
    if output not in OUTPUT_POINTS:
        raise ArgumentError("output", output, f"one of {OUTPUT_POINTS}")
    state = tokens_or_state if isinstance(tokens_or_state, FrozenState) else capture(model, tokens_or_state)
    x0 = state.x0.detach()
    if eps is None:
        if n_random < 1 or not scales:
            raise ArgumentError(
                "n_random/scales", (n_random, tuple(scales)), "n_random >= 1 and at least one scale when eps is None"
            )
        gen = torch.Generator(device="cpu").manual_seed(seed)
        z = torch.randn((n_random, *x0.shape), generator=gen, dtype=torch.float64)
        z = z / z.flatten(1).norm(dim=-1)[:, None, None]
        x_norm = float(x0.double().norm())
        eps_t = torch.cat([float(s) * x_norm * z for s in scales]).to(x0)
    else:
        eps_t = torch.as_tensor(eps).to(x0)
        if eps_t.ndim == 2:
            eps_t = eps_t[None]
        if eps_t.ndim != 3 or eps_t.shape[1:] != x0.shape:
            raise ArgumentError(
                "eps", tuple(eps_t.shape), f"[pos={x0.shape[0]}, d_model={x0.shape[1]}] or [n_eps, pos, d_model]"
            )
    lens = TensorLens.from_state(model, state, output=output)
    with torch.no_grad():
        ys = _live(model, state, torch.cat([x0[None], x0[None] + eps_t]), output)
    t_eps = lens.apply(eps_t).detach()
    err = (ys[1:] - ys[:1] - t_eps).double().norm(dim=-1)
    y_norm = ys.double().norm(dim=-1)
    live, lin = approximation_bound(model, state, eps_t.double().norm(dim=-1), output=output)

    # First-order factor: the bound is positively homogeneous to first order in a uniform radius r.
    r = 1e-12 * float(x0.double().norm(dim=-1).mean())
    b0_live, b0_lin = approximation_bound(
        model, state, torch.full((1, state.n_pos), r, dtype=torch.float64), output=output
    )
    constant = float((b0_live + b0_lin).amax() / r)
    sigma = _Bounds(model, state)
    sigma.propagate(torch.zeros(state.n_pos, dtype=torch.float64), output, frozen=True)
    x_norm = x0.double().norm().clamp_min(torch.finfo(torch.float64).tiny)
    return ApproximationReport(
        output=output,
        scales=eps_t.double().flatten(1).norm(dim=-1) / x_norm,
        eps_norm=eps_t.double().flatten(1).norm(dim=-1),
        error=err,
        bound=live + lin,
        model_change=live,
        linear_part=lin,
        measured_change=(ys[1:] - ys[:1]).double().norm(dim=-1),
        measured_linear=t_eps.double().norm(dim=-1),
        rounding=64 * torch.finfo(ys.dtype).eps * (y_norm[:1] + y_norm[1:] + t_eps.double().norm(dim=-1)),
        constant=constant,
        sigma_min=dict(sigma.sigma_min),
    )


__all__ = [
    "ACTIVATION_SLOPE_BOUND",
    "ApproximationReport",
    "approximation_bound",
    "approximation_error",
    "check_bound_supported",
]
