"""Per-head contributions to one output: the head decomposition of the frozen affine model.

With every input-dependent coefficient frozen (TensorLens, Atad et al. 2026, Eq. 9 and 18-19), the
model is affine in each head's output ``z_h`` (``hook_z``): changing ``z_h`` by ``δ`` changes the
explained quantity ``y`` (a logit, or any readout of the output) by exactly ``g_hᵀ δ`` with
``g_h = ∂y/∂z_h`` of the frozen replay, i.e. ``uᵀ T_{l→out}[p] W_Oᵀ``: the downstream tensor read by
``u`` at the explained position. The head's **contribution** is ``g_hᵀ z_h``: the part of ``y``
that passes through that head (its direct effect on the readout and every later path through the
frozen network). Zeroing the head in the frozen replay (``ReplaySpec(heads=...)``) lowers ``y`` by
exactly this amount, which is how the tests check it.

Because ``z_h[k] = Σ_j A_h[k, j] v_h[j]`` (the factored head tensor ``A_h ⊗ W_OVᵀ`` applied to the
attention input), the contribution splits over source positions:
``C[l, h, j] = Σ_k A_h[k, j] · g_h[k]ᵀ v_h[j]`` and ``Σ_j C[l, h, j]`` is the contribution.

Sums: within one layer the heads add up, ``Σ_h contribution[l, h] = y − y(layer l's heads all
zeroed)`` (exact, the frozen model being affine). Across layers they do not add up to ``y``: a path
through heads of two layers is counted in both, and embeddings, MLPs and biases carry the rest.
"""

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_tensorlens._backend import OutputPoint, default_output, has_unembedding
from tl_tensorlens._checks import as_position, as_token_ids
from tl_tensorlens.capture import FrozenState, capture
from tl_tensorlens.errors import ArgumentError


@dataclass(frozen=True)
class HeadContributions:
    """What every attention head contributes to one explained quantity ``y`` (see the module docstring).

    Attributes:
        position: the explained output position.
        token: the explained token (its logit is ``y``), or None for a ``direction`` readout.
        value: ``y`` itself, as the frozen replay computes it (the model's logit for a token).
        contributions: ``[layer, head]``: ``y``'s part that passes through each head.
        by_source: ``[layer, head, pos_in]``: the contribution split over the head's source positions
            (sums over ``pos_in`` to ``contributions``).
        by_edge: with ``edges=True``, ``[layer, head, dest_pos, src_pos]``: the split over every
            attention edge ``k ← j`` of the head (sums over ``dest_pos`` to ``by_source``); else None.
    """

    position: int
    token: int | None
    value: float
    contributions: Float[Tensor, "layer head"]
    by_source: Float[Tensor, "layer head pos_in"]
    by_edge: Float[Tensor, "layer head dest_pos src_pos"] | None = None

    def top(self, k: int = 10, *, by: str = "abs") -> list[tuple[int, int, float]]:
        """The ``k`` heads with the largest contribution: ``[(layer, head, contribution), ...]``.

        Args:
            k: how many (all when larger than the number of heads).
            by: ``"abs"`` (largest magnitude first), ``"positive"`` or ``"negative"`` (most negative first).
        """
        if by not in ("abs", "positive", "negative"):
            raise ArgumentError("by", by, "'abs', 'positive' or 'negative'")
        c = self.contributions
        key = {"abs": c.abs(), "positive": c, "negative": -c}[by].reshape(-1)
        n_heads = c.shape[1]
        order = torch.argsort(key, descending=True, stable=True)[: max(0, int(k))]
        return [(int(i) // n_heads, int(i) % n_heads, float(c.reshape(-1)[i])) for i in order]


def _readout(model: Any, token: Any, direction: Any, d_out: int) -> tuple[OutputPoint, int | None, Tensor | None]:
    if (token is None) == (direction is None):
        raise ArgumentError("token/direction", (token, direction), "exactly one of token= and direction=")
    if token is not None:
        if not has_unembedding(model):
            raise ArgumentError("token", token, "direction= (this model has no unembedding to read a token logit)")
        tok = as_token_ids("token", token, int(model.cfg.d_vocab))
        if tok.ndim != 0:
            raise ArgumentError("token", token, "one token id")
        return "logits", int(tok), None
    if not isinstance(direction, Tensor) or direction.ndim != 1 or direction.shape[0] != d_out:
        raise ArgumentError("direction", direction, f"a floating tensor [d_model={d_out}]")
    return default_output(model), None, direction


def head_contributions(
    model: Any,
    state_or_tokens: Any,
    *,
    position: int = -1,
    token: int | None = None,
    direction: Float[Tensor, " d_out"] | None = None,
    edges: bool = False,
) -> HeadContributions:
    """Each head's contribution to one logit (or readout) through the frozen model, with its sources.

    One forward and one backward pass of the frozen replay, whatever the number of heads.

    Args:
        model: a TransformerLens model (HookedTransformer, HookedEncoder or TransformerBridge).
        state_or_tokens: a :class:`~tl_tensorlens.capture.FrozenState` or a prompt.
        position: the explained output position.
        token: explain this token's logit (decoders).
        direction: or explain ``directionᵀ`` (the default output: ``ln_final`` of a decoder, the last
            block's output of an encoder) at ``position``.
        edges: also keep the split over every attention edge (``by_edge``, ``layer·head·pos²`` values).

    Returns:
        A :class:`HeadContributions`.

    Raises:
        ArgumentError: neither or both of token/direction, a token outside the vocabulary, a
            position out of range.

    Example:
        >>> import torch
        >>> from transformer_lens.config import TransformerBridgeConfig
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> cfg = TransformerBridgeConfig(n_layers=2, d_model=8, n_heads=2, d_head=4, d_mlp=16,
        ...     d_vocab=11, n_ctx=8, act_fn="gelu_new", seed=0)
        >>> model = TransformerBridge.boot_native(cfg, dtype=torch.float64).eval()
        >>> hc = head_contributions(model, torch.tensor([1, 2, 3, 4]), token=5)
        >>> tuple(hc.contributions.shape), tuple(hc.by_source.shape)
        ((2, 2), (2, 2, 4))
        >>> bool(torch.allclose(hc.by_source.sum(-1), hc.contributions))
        True
    """
    from tl_tensorlens._hooks import StopForward, feed, hooks_on
    from tl_tensorlens.replay import ReplaySpec, _module_ratio_hooks, _output_hooks, frozen_hooks

    state = state_or_tokens if isinstance(state_or_tokens, FrozenState) else capture(model, state_or_tokens)
    p = as_position("position", position, state.n_pos)
    d_model = int(state.x0.shape[-1])
    output, tok, u = _readout(model, token, direction, d_model)
    spec = ReplaySpec(output).resolved(state)
    n_layers = state.n_layers
    x0 = state.x0[None].detach()
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    probes = [torch.zeros_like(state.activations[name], requires_grad=True) for name in z_names]

    def adder(delta: Tensor) -> Any:
        def hook(act: Tensor, hook: Any) -> Tensor:
            return act + delta.to(act.dtype)

        return hook

    hooks = frozen_hooks(model, state, spec) + [feed("blocks.0.hook_resid_pre", x0)]
    hooks += [(name, adder(d)) for name, d in zip(z_names, probes, strict=True)] + _output_hooks(model, state, spec)
    out: Tensor | None = None
    with torch.enable_grad():
        try:
            with hooks_on(model, hooks, _module_ratio_hooks(state), frozen=True):
                model(state.tokens)
        except StopForward as stop:
            out = stop.value
        if out is None:
            raise ArgumentError("model", type(model).__name__, "a model whose output hook fires")
        y = out[0, p, tok] if tok is not None else (out[0, p] * u.to(out)).sum()  # type: ignore[union-attr]
        grads = torch.autograd.grad(y, probes, allow_unused=True)
    contrib, by_source, by_edge = [], [], []
    for layer, (name, g) in enumerate(zip(z_names, grads, strict=True)):
        z = state.activations[name][0]  # [pos, head, d_head]
        g = torch.zeros_like(z) if g is None else g[0].to(z)
        v = state.activations[f"blocks.{layer}.attn.hook_v"][0]
        if v.shape[1] != z.shape[1]:  # GQA: query head h reads kv group h // (n_heads / n_kv)
            v = v.repeat_interleave(z.shape[1] // v.shape[1], dim=1)
        pattern = state.pattern(layer).to(z)  # [head, dest, src]
        # C[h, j] = Σ_k A[h, k, j] · g[k, h]·v[j, h]
        edge = pattern * torch.einsum("khd,jhd->hkj", g, v.to(z))
        by_source.append(edge.sum(1))
        if edges:
            by_edge.append(edge)
        contrib.append((g * z).sum(dim=(0, 2)))
    return HeadContributions(
        position=p,
        token=tok,
        value=float(y.detach()),
        contributions=torch.stack(contrib).detach(),
        by_source=torch.stack(by_source).detach(),
        by_edge=torch.stack(by_edge).detach() if edges else None,
    )


def attention_received(state: FrozenState) -> Float[Tensor, " pos"]:
    """Mean attention each position receives from the positions that can attend to it, over every
    layer and head: ``mean_{l, h, q ≠ j (q > j when causal)} A[l, h, q, j]`` (0 where no position can).

    Attention sinks (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks")
    are the positions where this is large: typically the first token of a decoder (BOS or not).

    Example:
        >>> import torch
        >>> from transformer_lens.config import TransformerBridgeConfig
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> cfg = TransformerBridgeConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16,
        ...     d_vocab=11, n_ctx=8, act_fn="gelu_new", seed=0)
        >>> model = TransformerBridge.boot_native(cfg, dtype=torch.float64).eval()
        >>> r = attention_received(capture(model, torch.tensor([1, 2, 3])))
        >>> r.shape[0], float(r[-1])  # nothing attends to the last position of a causal model
        (3, 0.0)
    """
    A = torch.stack([state.pattern(layer).double() for layer in range(state.n_layers)])  # [L, H, q, k]
    n = state.n_pos
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    allowed = (q > k) if state.is_causal else (q != k)
    allowed = allowed.to(A.device)
    total = (A * allowed).sum(dim=(0, 1, 2))
    count = allowed.sum(0).to(A) * A.shape[0] * A.shape[1]
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total)).cpu()


def detect_sinks(state: FrozenState, threshold: float = 0.3) -> list[int]:
    """Positions whose :func:`attention_received` is at least ``threshold`` (attention sinks).

    Raises:
        ArgumentError: a threshold outside (0, 1].
    """
    if not isinstance(threshold, (int, float)) or not 0 < float(threshold) <= 1:
        raise ArgumentError("threshold", threshold, "a number in (0, 1]")
    r = attention_received(state)
    return [int(j) for j in torch.nonzero(r >= float(threshold)).reshape(-1)]


__all__ = ["HeadContributions", "attention_received", "detect_sinks", "head_contributions"]
