"""The frozen per-prompt transport beside TL 4.3's Jacobian lens (J-lens).

TL's ``JacobianLens`` (``transformer_lens.tools.analysis.jacobian_lens``, Gurnee et al. 2026) fits,
per source layer ``l``, one ``[d_model, d_model]`` matrix: the **true** Jacobian of the final block's
output with respect to block ``l``'s output, summed over target positions ``t' ≥ t`` and averaged over
source positions ``t`` (positions ``skip_first_positions .. seq-2``) and prompts. It reads a layer as
``W_U norm(J_l h_l)``.

TensorLens has, per prompt, the exact frozen operator from block ``l``'s output to the final residual:
``TensorLens.layer_range(l + 1, n_layers)`` (``F(h) = T h + c``). Two things follow:

* its J-lens-shaped summary, :func:`transport_matrix` with ``jacobian="frozen"``: the same sums and
  averages over ``T[t', :, t, :]``. It differs from TL's matrix because the frozen operator holds the
  norm scales, attention patterns and activation ratios fixed, while the true Jacobian also
  differentiates them (``jacobian="true"`` computes TL's quantity here, and equals TL's fit);
* the exact per-prompt readout: ``T h_l + c`` is the final residual stream itself, so its readout is the
  model's prediction at every layer (by construction, up to rounding), and it says where that comes
  from: the share of each output position carried by the other positions (``T[t, :, j, :] h_j``,
  ``j ≠ t``, which no ``d_model × d_model`` lens can represent) and by the bias ``c``.

:func:`compare_jlens` measures both against a fitted TL lens on the same prompts
(``scripts/compare_jlens.py``; numbers in ``docs/tl4.md``).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from tl_tensorlens._checks import as_int
from tl_tensorlens.capture import FrozenState, capture
from tl_tensorlens.errors import ArgumentError
from tl_tensorlens.replay import ReplaySpec, run
from tl_tensorlens.tensors import TensorLens

JacobianKind = Literal["frozen", "true"]


def _valid_positions(n_pos: int, skip_first_positions: int) -> list[int]:
    """TL's source/target positions: ``skip_first_positions .. n_pos - 2``."""
    return list(range(skip_first_positions, n_pos - 1))


def transport_matrix(
    model: Any,
    state: FrozenState,
    layer: int,
    *,
    skip_first_positions: int = 16,
    jacobian: JacobianKind = "frozen",
    chunk: int = 64,
) -> Float[Tensor, "d_model d_model"]:
    """One prompt's J-lens-shaped matrix from block ``layer``'s output to the final block's output.

    ``M[e, d] = mean_{t ∈ V} Σ_{t' ∈ V, t' ≥ t} ∂y[t', e] / ∂h[t, d]`` with
    ``V = skip_first_positions .. n_pos - 2`` (TL's estimator for one prompt). ``jacobian="frozen"``
    takes the derivative of the frozen replay, i.e. sums ``T[t', :, t, :]`` of
    ``TensorLens.layer_range(layer + 1, n_layers)`` (its ``apply_adjoint``); ``"true"`` the derivative
    of the real model (what TL's ``JacobianLens.fit`` averages).

    Args:
        model: the model ``state`` was captured from.
        state: the prompt's capture.
        layer: source block ``0 .. n_layers - 2``.
        skip_first_positions: leading positions left out (TL's default 16).
        jacobian: "frozen" or "true".
        chunk: output dimensions per backward pass.

    Returns:
        ``[d_model (out), d_model (in)]``, in the model's dtype; transport ``h`` as ``h @ M.T``.

    Example:
        >>> import torch
        >>> from transformer_lens.config import TransformerBridgeConfig
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> from tl_tensorlens import capture
        >>> cfg = TransformerBridgeConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32,
        ...     d_vocab=20, n_ctx=8, act_fn="gelu_new", seed=0)
        >>> model = TransformerBridge.boot_native(cfg, dtype=torch.float64).eval()
        >>> state = capture(model, torch.tensor([1, 4, 2, 7, 3, 9]))
        >>> transport_matrix(model, state, 0, skip_first_positions=1).shape
        torch.Size([16, 16])
    """
    n_layers = state.n_layers
    layer = as_int("layer", layer, lo=0, hi=n_layers - 2, allowed=f"a source block 0 .. {n_layers - 2}")
    skip = as_int("skip_first_positions", skip_first_positions, lo=0)
    if jacobian not in ("frozen", "true"):
        raise ArgumentError("jacobian", jacobian, "'frozen' or 'true'")
    chunk = as_int("chunk", chunk, lo=1)
    n = state.n_pos
    valid = _valid_positions(n, skip)
    if not valid:
        raise ArgumentError(
            "skip_first_positions", skip, f"fewer than {n - 1} for a prompt of {n} tokens (TL also drops the last)"
        )
    h = state.resid_pre(layer + 1)
    d = int(h.shape[-1])
    idx = torch.tensor(valid, device=h.device)
    M = torch.zeros(d, d, dtype=h.dtype, device=h.device)

    def cotangent(s: int, e: int) -> Tensor:
        g = torch.zeros(e - s, n, d, dtype=h.dtype, device=h.device)
        rows = torch.arange(e - s, device=h.device)
        g[rows[:, None], idx[None, :], (s + rows)[:, None]] = 1
        return g

    if jacobian == "frozen":
        lens = TensorLens.from_state(model, state, layers=(layer + 1, n_layers), output="resid_post")
        for s in range(0, d, chunk):
            e = min(d, s + chunk)
            adj = lens.apply_adjoint(cotangent(s, e))  # [k, pos, d_in]
            M[s:e] = adj[:, idx].mean(1)
        return M
    spec = ReplaySpec(output="resid_post", start=layer + 1).resolved(state)
    for s in range(0, d, chunk):
        e = min(d, s + chunk)
        with torch.enable_grad():
            x = h.detach()[None].expand(e - s, -1, -1).clone().requires_grad_(True)
            y = run(model, state, x, spec, frozen=False)
            (gx,) = torch.autograd.grad(y, x, grad_outputs=cotangent(s, e).to(y.dtype))
        M[s:e] = gx[:, idx].mean(1).to(M)
    return M


def lens_readout(model: Any, residual: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_vocab"]:
    """``W_U norm(r) + b_U`` with the model's own (live) final norm, as TL's J-lens and logit lens read."""
    r = residual.to(model.W_U.dtype)
    flat = r.reshape(1, -1, r.shape[-1])
    with torch.no_grad():
        out = model.unembed(model.ln_final(flat))
    return out.reshape(*r.shape[:-1], -1)


@dataclass(frozen=True)
class JLensLayer:
    """Per-layer numbers of :func:`compare_jlens` (means over prompts, at each prompt's last position).

    Attributes:
        layer: source block.
        matrix_rel_diff: ``‖J_TL − J_frozen‖_F / ‖J_TL‖_F`` (both averaged over the same prompts).
        matrix_cosine: cosine of the flattened matrices.
        true_rel_diff: ``‖J_TL − J_true‖_F / ‖J_TL‖_F`` (this module's true-Jacobian estimator; ~0
            up to float32 rounding when it computes TL's quantity).
        top1_logit_lens / top1_jlens / top1_frozen_lens / top1_exact: share of prompts whose readout's
            top-1 token is the model's own prediction, for the logit lens, TL's J-lens, the frozen
            matrix used as a J-lens, and the exact per-prompt transport ``T h + c``.
        top1_jlens_vs_frozen: share of prompts where TL's J-lens and the frozen matrix agree on top-1.
        exact_max_logit_error: worst ``|readout(T h + c) − model logits|`` (the frozen transport is exact).
        other_positions_share: ``‖(T h)_t − T[t,:,t,:] h_t‖ / ‖(T h)_t‖`` at the last position: the part
            of the transported vector carried by other positions (no ``d × d`` lens has it).
        bias_share: ``‖c_t‖ / ‖T h_t + c_t‖`` at the last position.
    """

    layer: int
    matrix_rel_diff: float
    matrix_cosine: float
    true_rel_diff: float | None
    top1_logit_lens: float
    top1_jlens: float
    top1_frozen_lens: float
    top1_exact: float
    top1_jlens_vs_frozen: float
    exact_max_logit_error: float
    other_positions_share: float
    bias_share: float


def compare_jlens(
    model: Any,
    prompts: Sequence[Any],
    jlens: Any,
    *,
    layers: Sequence[int] | None = None,
    skip_first_positions: int = 16,
    with_true: bool = False,
) -> list[JLensLayer]:
    """Compare the frozen per-prompt transport with a fitted TL ``JacobianLens`` on ``prompts``.

    Args:
        model: the raw bridge the lens was fitted on (or any model, with ``jlens`` a mapping).
        prompts: the prompts the lens was fitted on (strings or token ids).
        jlens: TL's ``JacobianLens`` (its ``jacobians``), or a mapping ``{layer: [d, d]}``.
        layers: source layers (default: every layer of the lens).
        skip_first_positions: as in the fit.
        with_true: also compute this module's true-Jacobian estimator (checks it equals TL's fit).

    Returns:
        One :class:`JLensLayer` per layer.
    """
    mats: Mapping[int, Tensor] = getattr(jlens, "jacobians", jlens)
    layers = sorted(mats) if layers is None else list(layers)
    states = [capture(model, p) for p in prompts]
    rows: list[JLensLayer] = []
    for layer in layers:
        J_tl = mats[layer].double()
        per_frozen = [transport_matrix(model, st, layer, skip_first_positions=skip_first_positions) for st in states]
        J_fr = torch.stack(per_frozen).mean(0).double().cpu()
        true_diff = None
        if with_true:
            per_true = [
                transport_matrix(model, st, layer, skip_first_positions=skip_first_positions, jacobian="true")
                for st in states
            ]
            J_tr = torch.stack(per_true).mean(0).double().cpu()
            true_diff = float((J_tl - J_tr).norm() / J_tl.norm())
        hits = {k: 0 for k in ("ll", "jl", "fr", "ex", "jf")}
        err = 0.0
        other, bias = [], []
        for st in states:
            t = st.n_pos - 1
            h = st.resid_pre(layer + 1)
            pred = int(st.logits[0, t].argmax()) if st.logits is not None else -1
            dev = h.device
            read = lens_readout(
                model,
                torch.stack([h[t], h[t] @ J_tl.to(h).T.to(dev), h[t] @ J_fr.to(h).T.to(dev)]),
            )
            top = read.argmax(-1).tolist()
            lens = TensorLens.from_state(model, st, layers=(layer + 1, st.n_layers), output="resid_post")
            Th = lens.apply(h)
            own = torch.zeros_like(h)
            own[t] = h[t]
            Th_own = lens.apply(own)[t]
            c = lens.bias[t]
            exact = lens_readout(model, Th[t] + c)
            if st.logits is not None:
                err = max(err, float((exact - st.logits[0, t].to(exact)).abs().max()))
            hits["ll"] += top[0] == pred
            hits["jl"] += top[1] == pred
            hits["fr"] += top[2] == pred
            hits["jf"] += top[1] == top[2]
            hits["ex"] += int(exact.argmax()) == pred
            other.append(float((Th[t] - Th_own).norm() / Th[t].norm().clamp_min(1e-30)))
            bias.append(float(c.norm() / (Th[t] + c).norm().clamp_min(1e-30)))
        k = len(states)
        rows.append(
            JLensLayer(
                layer=layer,
                matrix_rel_diff=float((J_tl - J_fr).norm() / J_tl.norm()),
                matrix_cosine=float((J_tl.flatten() @ J_fr.flatten()) / (J_tl.norm() * J_fr.norm())),
                true_rel_diff=true_diff,
                top1_logit_lens=hits["ll"] / k,
                top1_jlens=hits["jl"] / k,
                top1_frozen_lens=hits["fr"] / k,
                top1_exact=hits["ex"] / k,
                top1_jlens_vs_frozen=hits["jf"] / k,
                exact_max_logit_error=err,
                other_positions_share=sum(other) / k,
                bias_share=sum(bias) / k,
            )
        )
    return rows


def format_jlens_table(rows: Sequence[JLensLayer]) -> str:
    """A Markdown table of :func:`compare_jlens`."""
    head = (
        "| layer | ‖J_TL−J_frozen‖/‖J_TL‖ | cos | ‖J_TL−J_true‖/‖J_TL‖ | top-1 = model: logit lens | J-lens | "
        "frozen matrix | exact T h + c | J-lens = frozen matrix | exact: max logit err | other positions | bias |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        true = "—" if r.true_rel_diff is None else f"{r.true_rel_diff:.1e}"
        lines.append(
            f"| {r.layer} | {r.matrix_rel_diff:.3f} | {r.matrix_cosine:.3f} | {true} | {r.top1_logit_lens:.2f} | "
            f"{r.top1_jlens:.2f} | {r.top1_frozen_lens:.2f} | {r.top1_exact:.2f} | {r.top1_jlens_vs_frozen:.2f} | "
            f"{r.exact_max_logit_error:.1e} | {r.other_positions_share:.2f} | {r.bias_share:.2f} |"
        )
    return "\n".join(lines)


__all__ = ["JLensLayer", "compare_jlens", "format_jlens_table", "lens_readout", "transport_matrix"]
