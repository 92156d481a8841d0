"""Gradient baselines of the *real* model: Input×Gradient, Integrated Gradients, AttnLRP and CP-LRP.

Every method explains the same scalar as the class-specific tensor collapse In+Class
(``make_tensor_method("in_class")``), so the two can be compared row by row:

* decoders (``target`` a token id ``t``): ``f(x) = ln_final(x)[i] · W_U[:, t] + b_U[t]``, the logit of
  ``t`` at output position ``i`` (before any output-logit soft-cap, like the lens at ``ln_final``);
* post-LN encoders (``target`` a readout direction ``w``, e.g. a classifier column ``W[:, c]``):
  ``f(x) = resid_post(x)[i] · w``, the final hidden state read along ``w``.

``x`` is the input of the first block, ``blocks.0.hook_resid_pre`` (token + positional embedding;
BERT: after the embedding LayerNorm) — the same ``h_in`` the In+Class collapse multiplies, so a
relevance of input position ``j`` always means "the part of ``f`` credited to ``x_j``". It is fed
with :func:`tl_tensorlens.live` (the unfrozen model), or, for the LRP rules, the unfrozen model with
gradient-rule hooks around it.

* **Input×Gradient** (Shrikumar et al. 2016; Denil et al. 2014): ``R_j = Σ_d x_j[d] ∂f/∂x_j[d]``
  (``input_x_gradient``, signed) or ``‖x_j ⊙ ∂f/∂x_j‖₂`` (``input_x_gradient_l2``, unsigned, as in
  Atanasova et al. 2020). The first-order Taylor term of the real model at 0: with ``J`` the true
  Jacobian, ``Σ_j R_j = x·∇f``. One forward + one backward per row.
* **Integrated Gradients** (Sundararajan et al. 2017): ``R_j = Σ_d (x_j − x'_j)[d] ∫₀¹ ∂f/∂x_j[d]
  (x' + α(x − x')) dα``, the integral by an ``m``-node rule on [0, 1] (default Gauss–Legendre,
  ``m = 32``, like captum's default method; or the midpoint or trapezoid rule). Completeness:
  ``Σ_j R_j = f(x) − f(x')`` up to the quadrature error. Baseline ``x'``: ``0`` by default (the
  zero input embedding of the original paper), or the block-0 input of a reference prompt (every
  token replaced by e.g. [MASK]/[PAD], positions and kept special tokens as they are), or any tensor.
  ``m`` forwards + backwards per row, batched under a memory budget.
* **CP-LRP** (Ali et al. 2022) and **AttnLRP** (Achtibat et al. 2024), in the Gradient×Input form of
  lxt's "efficient" implementation: the forward pass is the real model's, the backward pass is
  modified by rules and the relevance is ``R_j = Σ_d x_j[d] · g̃_j[d]``:

  ===================== ========================================= =========================================
  component             CP-LRP                                    AttnLRP
  ===================== ========================================= =========================================
  norm (LN / RMS)       identity rule: the scale ``hook_scale``    same
                        gets no gradient
  plain MLP act         identity rule: ``∂act(z)/∂z := act(z)/z``  same
  gated MLP             gate gets no gradient (``∂/∂gate := 0``)   identity rule on ``act(gate)`` and the
                                                                   uniform rule on the product: half the
                                                                   gradient to each factor
  attention             Q and K get no gradient (the softmax       uniform rule on ``A v`` and ``q kᵀ``:
                        path is cut: patterns are constants)       gradient ×1/4 at Q and K, ×1/2 at V
  ===================== ========================================= =========================================

  CP-LRP therefore *is* the Jacobian of the frozen replay contracted with ``x``: on every
  architecture the replay supports it equals the In+Class row (tested in float64 to 1e-10 relative;
  1e-7 on bridges whose Hugging Face RMSNorm computes in float32). AttnLRP
  differs in attention (relevance also flows through the softmax into Q and K) and in gated MLPs.
  One forward + one backward per row.

Why the LRP rules are applied with TransformerLens hooks and not with ``lxt.efficient.monkey_patch``:
lxt 2.1 cannot be imported with the ``transformers`` 5.x that TransformerLens 3.9 and 4.3 require
(``lxt.efficient`` imports every model map, and ``lxt/efficient/models/bert.py`` imports
``transformers.modeling_attn_mask_utils``, removed in transformers 5; ``lxt.explicit`` imports
``transformers.utils.fx``, also removed). Its per-architecture patches would not reach a
TransformerBridge anyway: the bridge computes attention itself (the pattern hooks must fire), so a
patched ``modeling_llama.eager_attention_forward`` is never called (0 calls in a LLaMA bridge forward), and lxt's attention patch replaces
``ALL_ATTENTION_FUNCTIONS`` with a plain ``dict`` that transformers 5 calls ``.get_interface`` on.
The rules themselves are a few lines each; applied on the hook points every backend shares
(``hook_scale``, ``attn.hook_q/k/v``, ``mlp.hook_pre/hook_pre_linear/hook_post``) they reach
HookedTransformer, HookedEncoder and TransformerBridge alike, and the hooks live in a
hook context of :mod:`tl_tensorlens.replay` (``hooks_on``), so nothing survives the call. ``tests/test_gradient_baselines.py``
checks them against lxt's own patch code on Hugging Face LLaMA, Gemma-3 and GPT-2 models.

References:
    Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep Networks", ICML 2017.
    Shrikumar et al., "Not Just a Black Box: Learning Important Features Through Propagating
    Activation Differences", 2016.
    Ali et al., "XAI for Transformers: Better Explanations through Conservative Propagation", ICML 2022.
    Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers", ICML 2024.
"""

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from tl_tensorlens._backend import is_post_ln
from tl_tensorlens.capture import ACTIVATION_SLOPE_AT_ZERO, FrozenState
from tl_tensorlens.engine import resolve_memory_budget
from tl_tensorlens.errors import TensorLensError, UnsupportedModelError
from tl_tensorlens.replay import hooks_on, record

#: The registered gradient baselines (class-specific: they need ``target=``).
GRADIENT_METHODS: tuple[str, ...] = (
    "input_x_gradient",
    "input_x_gradient_l2",
    "integrated_gradients",
    "attnlrp",
    "cp_lrp",
)

Quadrature = Literal["gausslegendre", "riemann_middle", "riemann_trapezoid"]
QUADRATURES: tuple[str, ...] = ("gausslegendre", "riemann_middle", "riemann_trapezoid")
LrpRule = Literal["attnlrp", "cp_lrp"]
HookList = list[tuple[str, Callable[..., Any]]]


class CompletenessWarning(UserWarning):
    """Integrated Gradients missed ``f(x) − f(x')`` by more than the tolerance: too few steps."""


# ---------------------------------------------------------------------------------------- the scalar
@dataclass(frozen=True)
class ExplainedScalar:
    """What a class-specific method explains: ``f(x) = out(x)[position] · readout + offset``.

    Attributes:
        output: ``"ln_final"`` (decoders: what the unembedding reads) or ``"resid_post"`` (post-LN
            encoders: the final hidden state a classifier head reads).
        position: the output position (row), in ``0 .. pos-1``.
        readout: ``[d_out]``: ``W_U[:, token]`` or the given direction.
        offset: ``b_U[token]`` for a token target, else 0 (a constant: it gets no relevance).
    """

    output: Literal["ln_final", "resid_post"]
    position: int
    readout: Float[Tensor, " d_out"]
    offset: float

    def __call__(self, out: Float[Tensor, "batch pos d_out"]) -> Float[Tensor, " batch"]:
        return out[:, self.position] @ self.readout.to(out) + self.offset


def _check_state(state: Any) -> None:
    if not isinstance(state, FrozenState):
        raise TensorLensError(
            f"gradient baselines need a FrozenState from tl_tensorlens.capture (they feed its "
            f"blocks.0.hook_resid_pre to the live model), got {type(state).__name__}"
        )


def explained_scalar(model: Any, state: Any, position: int, target: Any) -> ExplainedScalar:
    """The scalar In+Class explains for ``(position, target)`` (see the module docstring).

    Args:
        model: the captured model.
        state: its capture.
        position: output row, ``-pos <= position < pos``.
        target: a token id (decoders) or a float readout direction ``[d_out]`` / ``[pos, d_out]``.

    Raises:
        TensorLensError: for a missing target, an out-of-range position, a token target on a post-LN
            encoder (its logits are not read through ``ln_final``) or a direction of the wrong size.
    """
    _check_state(state)
    n = state.n_pos
    if not -n <= int(position) < n:
        raise TensorLensError(f"position {position} is outside a sequence of length {n}")
    position = int(position) % n
    x0 = state.x0
    if target is None:
        raise TensorLensError(
            "gradient baselines are class-specific: pass target= (a token id for decoders, a readout "
            "direction [d_model] for encoders), as the perturbation readouts do"
        )
    output: Literal["ln_final", "resid_post"] = "resid_post" if is_post_ln(model) else "ln_final"
    if isinstance(target, Tensor) and target.is_floating_point():
        u = target.detach().to(device=x0.device, dtype=x0.dtype)
        if u.ndim == 2:
            u = u[position]
        if u.shape != (x0.shape[-1],):
            raise TensorLensError(
                f"target direction must be [d_out={x0.shape[-1]}] or [pos, d_out], got {tuple(target.shape)}"
            )
        return ExplainedScalar(output, position, u, 0.0)
    if output != "ln_final":
        raise TensorLensError(
            "a token target needs a decoder (a logit read through ln_final); this post-LN encoder is "
            "explained along a readout direction: pass target= a float tensor [d_model] (e.g. W[:, c])"
        )
    tok = int(target)
    W_U = model.W_U.detach()
    if not 0 <= tok < W_U.shape[-1]:
        raise TensorLensError(f"target token {tok} is outside the vocabulary 0..{W_U.shape[-1] - 1}")
    b_U = getattr(model, "b_U", None)
    offset = 0.0 if b_U is None else float(b_U.detach()[tok])
    return ExplainedScalar(output, position, W_U[:, tok].to(x0), offset)


# -------------------------------------------------------------------------------- batched gradients
def _item_bytes(model: Any, n: int, element_size: int) -> int:
    """Rough activation memory of one forward item of length n with its backward graph."""
    cfg = model.cfg
    d = int(cfg.d_model)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d)
    h = int(cfg.n_heads)
    d_vocab = int(getattr(cfg, "d_vocab", 0) or 0)
    per_layer = n * (16 * d + 4 * d_mlp) + 4 * h * n * n
    # The bridge runs the whole HF model (logits included) even when the output hook stops early.
    return element_size * (int(cfg.n_layers) * per_layer + n * (3 * d_vocab + 4 * d))


def _budget(memory_budget: int | str | None) -> int:
    return resolve_memory_budget(memory_budget)


def _check_grad_mode() -> None:
    if torch.is_inference_mode_enabled():
        raise TensorLensError(
            "gradient baselines need autograd: call them outside torch.inference_mode() (the state was captured "
            "without it, so that is enough)"
        )


def _batched_gradients(
    model: Any,
    state: FrozenState,
    xs: Float[Tensor, "batch pos d_model"],
    scalars: Sequence[ExplainedScalar],
    *,
    rule_hooks: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    memory_budget: int | str | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """``∂f_b/∂x_b`` for each item ``b``, with ``f_b`` = ``scalars[b]`` of the live model at ``xs[b]``.

    Items run in chunks whose estimated activation memory fits ``memory_budget``; the items of a
    chunk are independent rows of one batched forward, so one backward of ``Σ_b f_b`` gives each
    item its own gradient.
    """
    from tl_tensorlens.replay import live

    _check_grad_mode()
    output = scalars[0].output
    if any(s.output != output for s in scalars):
        raise TensorLensError(
            f"one batch of gradients reads one output point, got {sorted({s.output for s in scalars})}"
        )
    chunk = max(1, _budget(memory_budget) // max(_item_bytes(model, state.n_pos, xs.element_size()), 1))
    grads = torch.empty_like(xs)
    for s in range(0, xs.shape[0], chunk):
        x = xs[s : s + chunk].detach().clone().requires_grad_(True)
        ctx = rule_hooks() if rule_hooks is not None else contextlib.nullcontext()
        with torch.enable_grad(), ctx:
            out = live(model, state, x, output=output)
            f = torch.stack([scalars[s + b](out[b : b + 1])[0] for b in range(x.shape[0])])
            (g,) = torch.autograd.grad(f.sum(), x)
        grads[s : s + chunk] = g.detach()
    return grads


def _rows_of(state: Any, position: int | None) -> list[int]:
    _check_state(state)
    n = state.n_pos
    if position is None:
        return list(range(n))
    if not -n <= int(position) < n:
        raise TensorLensError(f"position {position} is outside a sequence of length {n}")
    return [int(position) % n]


def _as_map(state: FrozenState, rows: list[int], values: Tensor) -> Float[Tensor, "pos_out pos_in"]:
    """An N×N map with ``values[k]`` in row ``rows[k]``; rows not computed are NaN."""
    n = state.n_pos
    full = torch.full((n, n), float("nan"), dtype=values.dtype, device=values.device)
    full[rows] = values
    return full


# -------------------------------------------------------------------------------- Input × Gradient
def input_x_gradient(
    model: Any,
    state: Any,
    *,
    position: int | None = None,
    target: Any = None,
    norm: Literal["sum", "l2"] = "sum",
    memory_budget: int | str | None = None,
) -> Float[Tensor, "pos_out pos_in"]:
    """Input×Gradient of the real model at ``blocks.0.hook_resid_pre``.

    ``R[i, j] = Σ_d x_j[d] ∂f_i/∂x_j[d]`` (``norm="sum"``, signed) or ``‖x_j ⊙ ∂f_i/∂x_j‖₂``
    (``norm="l2"``), with ``f_i`` the scalar of :func:`explained_scalar` at output row ``i``.

    Args:
        model: HookedTransformer, HookedEncoder or TransformerBridge.
        state: the capture of one prompt.
        position: the output row to compute (the others are NaN); None computes every row.
        target: token id (decoders) or readout direction ``[d_out]`` (encoders).
        norm: ``"sum"`` or ``"l2"`` over ``d_model``.
        memory_budget: bytes of activations per batched forward (default: the lens budget).

    Returns:
        ``[pos_out, pos_in]``.

    Example:
        >>> import torch
        >>> from transformer_lens.config import TransformerBridgeConfig
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> from tl_tensorlens import capture
        >>> cfg = TransformerBridgeConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16,
        ...     d_vocab=11, n_ctx=8, act_fn="gelu_new", dtype=torch.float64)
        >>> model = TransformerBridge.boot_native(cfg).eval()
        >>> state = capture(model, torch.tensor([1, 2, 3]))
        >>> R = input_x_gradient(model, state, position=2, target=5)
        >>> R.shape, bool(R[:2].isnan().all())
        (torch.Size([3, 3]), True)
    """
    if norm not in ("sum", "l2"):
        raise TensorLensError(f"norm must be 'sum' or 'l2', got {norm!r}")
    rows = _rows_of(state, position)
    scalars = [explained_scalar(model, state, i, target) for i in rows]
    x0 = state.x0.detach()
    xs = x0.expand(len(rows), *x0.shape)
    g = _batched_gradients(model, state, xs, scalars, memory_budget=memory_budget)
    prod = xs * g
    values = prod.sum(-1) if norm == "sum" else prod.norm(dim=-1)
    return _as_map(state, rows, values)


def input_x_gradient_l2(
    model: Any, state: Any, *, position: int | None = None, target: Any = None
) -> Float[Tensor, "pos_out pos_in"]:
    """:func:`input_x_gradient` with ``norm="l2"``: ``R[i, j] = ‖x_j ⊙ ∂f_i/∂x_j‖₂`` (unsigned)."""
    return input_x_gradient(model, state, position=position, target=target, norm="l2")


# ------------------------------------------------------------------------------ Integrated Gradients
def quadrature(m: int, method: Quadrature | str = "gausslegendre") -> tuple[Tensor, Tensor]:
    """Nodes ``α_k`` and weights ``w_k`` of an ``m``-point rule for ``∫₀¹ g(α) dα ≈ Σ_k w_k g(α_k)``.

    * ``"gausslegendre"``: exact for polynomials of degree ``2m − 1`` (captum's default method).
    * ``"riemann_middle"``: ``α_k = (k + ½)/m``, ``w_k = 1/m`` (error O(1/m²)).
    * ``"riemann_trapezoid"``: ``α_k = k/(m − 1)``, weights ``1/(m − 1)`` with halved ends (error
      O(1/m²)). captum's ``riemann_trapezoid`` uses the same nodes with weights ``1/m`` (halved
      ends), which sum to ``1 − 1/m``: an O(1/m) bias this rule does not have.

    Returns:
        ``(alphas, weights)``, float64 ``[m]`` each.

    Example:
        >>> a, w = quadrature(3, "riemann_trapezoid")
        >>> a.tolist(), w.tolist()
        ([0.0, 0.5, 1.0], [0.25, 0.5, 0.25])
    """
    if int(m) != m or m < 1:
        raise TensorLensError(f"steps must be a positive integer, got {m!r}")
    m = int(m)
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(m)
        return torch.from_numpy(0.5 * (nodes + 1)), torch.from_numpy(0.5 * weights)
    if method == "riemann_middle":
        alphas = (torch.arange(m, dtype=torch.float64) + 0.5) / m
        return alphas, torch.full((m,), 1.0 / m, dtype=torch.float64)
    if method == "riemann_trapezoid":
        if m < 2:
            raise TensorLensError("the trapezoid rule needs steps >= 2")
        alphas = torch.linspace(0, 1, m, dtype=torch.float64)
        weights = torch.full((m,), 1.0 / (m - 1), dtype=torch.float64)
        weights[0] = weights[-1] = 0.5 / (m - 1)
        return alphas, weights
    raise TensorLensError(f"quadrature method {method!r}; choose one of {QUADRATURES}")


def _stop_at(model: Any, tokens: Tensor, hook_name: str) -> Tensor:
    """The activation at ``hook_name`` for ``tokens``, stopping the forward there."""
    with torch.no_grad():
        _, acts = record(model, tokens, [hook_name], stop_after=hook_name)
    return acts[hook_name]


def reference_input(
    model: Any, state: Any, token: int, *, keep_tokens: Sequence[int] = ()
) -> Float[Tensor, "pos d_model"]:
    """``blocks.0.hook_resid_pre`` of the prompt with every token replaced by ``token``.

    Tokens listed in ``keep_tokens`` ([CLS], [SEP], BOS) stay; positional embeddings are those of
    the real positions (what most BERT IG studies use, e.g. ``[CLS] [PAD] … [PAD] [SEP]``).
    """
    _check_state(state)
    tokens = state.tokens.clone()
    keep = torch.zeros_like(tokens, dtype=torch.bool)
    for t in keep_tokens:
        keep |= tokens == int(t)
    tokens[~keep] = int(token)
    return _stop_at(model, tokens.to(state.tokens.device), "blocks.0.hook_resid_pre")[0].to(state.x0)


def integrated_gradients(
    model: Any,
    state: Any,
    *,
    position: int | None = None,
    target: Any = None,
    steps: int = 32,
    method: Quadrature | str = "gausslegendre",
    baseline: Float[Tensor, "pos d_model"] | None = None,
    baseline_token: int | None = None,
    keep_tokens: Sequence[int] = (),
    completeness_rtol: float | None = 0.05,
    memory_budget: int | str | None = None,
) -> Float[Tensor, "pos_out pos_in"]:
    """Integrated Gradients of the real model at ``blocks.0.hook_resid_pre``.

    ``R[i, j] = Σ_d (x − x')_j[d] Σ_k w_k ∂f_i/∂x_j[d](x' + α_k (x − x'))`` with the nodes and
    weights of :func:`quadrature`; ``Σ_j R[i, j] ≈ f_i(x) − f_i(x')`` (completeness).

    Args:
        model: HookedTransformer, HookedEncoder or TransformerBridge.
        state: the capture of one prompt.
        position: the output row to compute (the others are NaN); None computes every row.
        target: token id (decoders) or readout direction ``[d_out]`` (encoders).
        steps: quadrature nodes ``m`` (``m`` forwards and backwards per row).
        method: ``"gausslegendre"`` (default), ``"riemann_middle"`` or ``"riemann_trapezoid"``.
        baseline: ``x'`` ``[pos, d_model]``; default the zero vector (unless ``baseline_token``).
        baseline_token: build ``x'`` with :func:`reference_input` from this token id instead.
        keep_tokens: with ``baseline_token``: token ids left in place ([CLS], [SEP], BOS).
        completeness_rtol: warn (:class:`CompletenessWarning`) when a row misses ``f(x) − f(x')`` by
            more than this fraction of ``max(|f(x) − f(x')|, 0.01 max(|f(x)|, |f(x')|))`` (one extra
            forward of 2 items); None skips the check.
        memory_budget: bytes of activations per batched forward (default: the lens budget).

    Returns:
        ``[pos_out, pos_in]``.

    Pre-norm decoders and the zero baseline: the first norm of every block sees ``α x`` and is
    nearly scale-invariant, so along the path the integrand is concentrated in
    ``α ≲ sqrt(eps) / rms(x)``; few nodes then miss most of the integral (docs/gradient_baselines.md
    measures it). A reference-token baseline (``baseline_token=``) avoids that.
    """
    if baseline is not None and baseline_token is not None:
        raise TensorLensError("pass baseline= or baseline_token=, not both")
    rows = _rows_of(state, position)
    scalars = [explained_scalar(model, state, i, target) for i in rows]
    x0 = state.x0.detach()
    if baseline_token is not None:
        x_ref = reference_input(model, state, baseline_token, keep_tokens=keep_tokens)
    elif baseline is not None:
        x_ref = torch.as_tensor(baseline).to(x0)
        if x_ref.shape != x0.shape:
            raise TensorLensError(f"baseline must be [pos, d_model] = {tuple(x0.shape)}, got {tuple(x_ref.shape)}")
    else:
        x_ref = torch.zeros_like(x0)
    alphas, weights = quadrature(steps, method)
    alphas, weights = alphas.to(x0), weights.to(x0)
    delta = x0 - x_ref
    path = x_ref + alphas[:, None, None] * delta  # [m, pos, d]
    xs = path.repeat(len(rows), 1, 1)  # row-major: row r's m points are contiguous
    g = _batched_gradients(
        model, state, xs, [s for s in scalars for _ in range(len(alphas))], memory_budget=memory_budget
    )
    avg = (g.view(len(rows), len(alphas), *x0.shape) * weights[None, :, None, None]).sum(1)
    values = (delta * avg).sum(-1)
    if completeness_rtol is not None:
        _check_completeness(model, state, x0, x_ref, rows, scalars, values, completeness_rtol, steps, method)
    return _as_map(state, rows, values)


def _check_completeness(
    model: Any,
    state: FrozenState,
    x0: Tensor,
    x_ref: Tensor,
    rows: list[int],
    scalars: Sequence[ExplainedScalar],
    values: Tensor,
    rtol: float,
    steps: int,
    method: str,
) -> None:
    from tl_tensorlens.replay import live

    with torch.no_grad():
        out = live(model, state, torch.stack([x0, x_ref]), output=scalars[0].output)
    worst: tuple[float, int, float, float] | None = None
    for k, s in enumerate(scalars):
        fx, fr = (float(v) for v in s(out))
        err = abs(float(values[k].sum()) - (fx - fr))
        scale = max(abs(fx - fr), 0.01 * max(abs(fx), abs(fr)), torch.finfo(x0.dtype).tiny)
        if err > rtol * scale and (worst is None or err / scale > worst[0]):
            worst = (err / scale, rows[k], fx, fr)
    if worst is not None:
        rel, row, fx, fr = worst
        warnings.warn(
            CompletenessWarning(
                f"integrated_gradients: row {row} sums to f(x) - f(x') = {fx - fr:.4g} only within "
                f"{rel:.1%} (tolerance {rtol:.0%}) with {steps} {method} nodes; use more steps or a "
                f"reference-token baseline (baseline_token=)"
            ),
            stacklevel=3,
        )


def make_integrated_gradients(
    *,
    steps: int = 32,
    method: Quadrature | str = "gausslegendre",
    baseline_token: int | None = None,
    keep_tokens: Sequence[int] = (),
) -> Callable[..., Tensor]:
    """A registry method: :func:`integrated_gradients` with fixed settings.

    Example (an encoder study with a [MASK] baseline, special tokens kept)::

        register_method("ig_mask", make_integrated_gradients(baseline_token=mask_id, keep_tokens=(cls, sep)))
    """
    quadrature(steps, method)  # validate now, not at the first call

    def method_fn(
        model: Any, state: Any, *, position: int | None = None, target: Any = None
    ) -> Float[Tensor, "pos_out pos_in"]:
        return integrated_gradients(
            model,
            state,
            position=position,
            target=target,
            steps=steps,
            method=method,
            baseline_token=baseline_token,
            keep_tokens=keep_tokens,
        )

    method_fn.__name__ = "integrated_gradients"
    method_fn.__doc__ = (
        f"Integrated Gradients, {steps} {method} nodes, baseline "
        f"{'zero' if baseline_token is None else f'token {baseline_token} (keeping {tuple(keep_tokens)})'}."
    )
    return method_fn


# ---------------------------------------------------------------------------------------- LRP rules
def _scale_grad(factor: float) -> Callable[..., Tensor]:
    """Identity forward, gradient × ``factor`` (lxt's ``divide_gradient``: the uniform rule)."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        return act.detach() + factor * (act - act.detach())

    return hook


def _no_grad_hook(act: Tensor, hook: Any) -> Tensor:
    """Identity forward, no gradient (lxt's ``stop_gradient``); a new tensor, so bridges see the edit."""
    return act.detach().clone()


def _stash(stash: dict[str, Tensor], key: str) -> Callable[..., None]:
    def hook(act: Tensor, hook: Any) -> None:
        stash[key] = act

    return hook


def _take(stash: dict[str, Tensor], key: str, hook: Any) -> Tensor:
    value = stash.pop(key, None)
    if value is None:
        raise UnsupportedModelError({hook.name: f"the hook that feeds it ({key}) did not fire first in this forward"})
    return value


def _expand_to(value: Tensor, act: Tensor, name: str) -> Tensor:
    if value.shape[1:] != act.shape[1:]:
        raise UnsupportedModelError({name: f"captured value {tuple(value.shape)} does not match {tuple(act.shape)}"})
    return value.to(act.dtype).expand(act.shape[0], *value.shape[1:])


def _identity_act(ratio: Tensor, stash: dict[str, Tensor], key: str) -> Callable[..., Tensor]:
    """``act(z)``'s forward value, gradient ``act(z)/z`` (lxt's ``identity_rule_implicit``)."""

    def hook(post: Tensor, hook: Any) -> Tensor:
        pre = _take(stash, key, hook)
        return post.detach() + _expand_to(ratio, pre, hook.name) * (pre - pre.detach())

    return hook


def _gate_activation(model: Any, layer: int) -> Callable[[Tensor], Tensor]:
    mlp = model.blocks[layer].mlp
    for owner in (mlp, getattr(mlp, "original_component", None)):
        fn = getattr(owner, "act_fn", None)
        if callable(fn):
            return cast(Callable[[Tensor], Tensor], fn)
    raise UnsupportedModelError(
        {
            f"blocks.{layer}.mlp": "AttnLRP's gated-MLP rule needs the gate activation, found neither .act_fn nor "
            ".original_component.act_fn"
        }
    )


def _uniform_gated(
    model: Any, layer: int, act_fn: str | None, stash: dict[str, Tensor], gate_key: str, lin_key: str
) -> Callable[..., Tensor]:
    """AttnLRP on ``act(gate) ⊙ lin``: identity rule on ``act``, uniform rule (½ each) on the product."""
    act = _gate_activation(model, layer)
    slope0 = ACTIVATION_SLOPE_AT_ZERO.get(act_fn or "", 0.0)

    def hook(post: Tensor, hook: Any) -> Tensor:
        gate, lin = _take(stash, gate_key, hook), _take(stash, lin_key, hook)
        g0, l0 = gate.detach(), lin.detach()
        a0 = act(g0)
        # Self-check: post = act(gate) ⊙ lin + b_in, with b_in the same at every position.
        rest = post.detach() - a0 * l0
        if not torch.allclose(
            rest, rest[:, :1].expand_as(rest), rtol=1e-4, atol=1e-5 * float(post.detach().abs().max())
        ):
            raise UnsupportedModelError(
                {
                    hook.name: "is not act(hook_pre) * hook_pre_linear (+ a bias): the gate activation found "
                    "does not reproduce this gated MLP"
                }
            )
        tiny = math.sqrt(torch.finfo(g0.dtype).tiny)
        small = g0.abs() < tiny
        ratio = torch.where(small, torch.full_like(g0, slope0), a0 / torch.where(small, torch.ones_like(g0), g0))
        return post.detach() + 0.5 * a0 * (lin - l0) + 0.5 * ratio * l0 * (gate - g0)

    return hook


def lrp_hooks(model: Any, state: Any, rule: LrpRule | str) -> HookList:
    """The gradient-rule hooks of ``rule`` (``"attnlrp"`` or ``"cp_lrp"``) for ``model``.

    They leave every forward value as it is and change only the backward pass (table in the module
    docstring). Use them inside ``tl_tensorlens.replay.hooks_on(model, ...)``, as :func:`lrp` does.

    Raises:
        UnsupportedModelError: naming the component no rule covers (SoLU MLPs; a missing hook).
    """
    _check_state(state)
    if rule not in ("attnlrp", "cp_lrp"):
        raise TensorLensError(f"LRP rule {rule!r}; choose 'attnlrp' or 'cp_lrp'")
    names = set(model.hook_dict)
    hooks: HookList = [(name, _no_grad_hook) for name in sorted(names) if name.endswith("hook_scale")]
    stash: dict[str, Tensor] = {}
    act_fn = getattr(model.cfg, "act_fn", None)
    for layer in range(state.n_layers):
        p = f"blocks.{layer}."
        qkv = [p + f"attn.hook_{c}" for c in "qkv"]
        missing = [h for h in qkv if h not in names]
        if missing:
            raise UnsupportedModelError({h: "no such hook: the attention rule acts on Q, K and V" for h in missing})
        if rule == "cp_lrp":
            hooks += [(qkv[0], _no_grad_hook), (qkv[1], _no_grad_hook)]
        else:
            hooks += [(qkv[0], _scale_grad(0.25)), (qkv[1], _scale_grad(0.25)), (qkv[2], _scale_grad(0.5))]
        kind = state.mlp_kind.get(layer)
        if kind == "solu":
            raise UnsupportedModelError(
                {f"{p}mlp (act_fn={act_fn!r})": "AttnLRP/CP-LRP define no rule for SoLU's x ⊙ softmax(x)"}
            )
        if kind == "plain":
            ratio = state.frozen[p + "mlp.hook_post"]
            hooks += [
                (p + "mlp.hook_pre", _stash(stash, f"pre{layer}")),
                (p + "mlp.hook_post", _identity_act(ratio, stash, f"pre{layer}")),
            ]
        elif kind == "gated":
            if rule == "cp_lrp":
                hooks.append((p + "mlp.hook_pre", _no_grad_hook))
            else:
                for h in ("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post"):
                    if p + h not in names:
                        raise UnsupportedModelError({p + h: "no such hook: AttnLRP's gated-MLP rule needs it"})
                hooks += [
                    (p + "mlp.hook_pre", _stash(stash, f"gate{layer}")),
                    (p + "mlp.hook_pre_linear", _stash(stash, f"lin{layer}")),
                    (p + "mlp.hook_post", _uniform_gated(model, layer, act_fn, stash, f"gate{layer}", f"lin{layer}")),
                ]
    return hooks


def lrp(
    model: Any,
    state: Any,
    *,
    rule: LrpRule | str,
    position: int | None = None,
    target: Any = None,
    memory_budget: int | str | None = None,
) -> Float[Tensor, "pos_out pos_in"]:
    """AttnLRP or CP-LRP relevance of ``blocks.0.hook_resid_pre``: ``R[i, j] = Σ_d x_j[d] g̃_j[d]``.

    ``g̃`` is the gradient of ``f_i`` (:func:`explained_scalar`) through the real model with the
    backward pass modified by :func:`lrp_hooks`. CP-LRP equals the In+Class row of the frozen
    tensor; AttnLRP differs in attention and gated MLPs (module docstring).

    Args:
        model: HookedTransformer, HookedEncoder or TransformerBridge.
        state: the capture of one prompt.
        rule: ``"attnlrp"`` or ``"cp_lrp"``.
        position: the output row to compute (the others are NaN); None computes every row.
        target: token id (decoders) or readout direction ``[d_out]`` (encoders).
        memory_budget: bytes of activations per batched forward (default: the lens budget).

    Returns:
        ``[pos_out, pos_in]``.
    """
    rows = _rows_of(state, position)
    scalars = [explained_scalar(model, state, i, target) for i in rows]
    hooks = lrp_hooks(model, state, rule)

    @contextlib.contextmanager
    def rules() -> Iterator[None]:
        with hooks_on(model, hooks):
            yield

    x0 = state.x0.detach()
    xs = x0.expand(len(rows), *x0.shape)
    g = _batched_gradients(model, state, xs, scalars, rule_hooks=rules, memory_budget=memory_budget)
    return _as_map(state, rows, (xs * g).sum(-1))


def attnlrp(
    model: Any, state: Any, *, position: int | None = None, target: Any = None
) -> Float[Tensor, "pos_out pos_in"]:
    """AttnLRP (Achtibat et al. 2024) relevance: :func:`lrp` with ``rule="attnlrp"``."""
    return lrp(model, state, rule="attnlrp", position=position, target=target)


def cp_lrp(
    model: Any, state: Any, *, position: int | None = None, target: Any = None
) -> Float[Tensor, "pos_out pos_in"]:
    """CP-LRP (Ali et al. 2022) relevance: :func:`lrp` with ``rule="cp_lrp"`` (= In+Class)."""
    return lrp(model, state, rule="cp_lrp", position=position, target=target)
