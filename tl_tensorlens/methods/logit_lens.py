"""The tensor logit lens: per layer, which input tokens drive the logit-lens prediction.

An exact consequence of TensorLens' frozen affine model ``F(X) = T vec(X) + c`` (Atad et al. 2026,
arXiv 2601.17958, Eq. 18-20).

TransformerLens' logit lens reads the residual
stream after ``k`` blocks through the final norm and the unembedding,
``logits_k = unembed(ln_final(resid_k))``; ``ActivationCache.accumulated_resid(apply_ln=True)``
recomputes the norm statistics of each ``resid_k``. Freezing *that* scale ``s_{k,i}`` (not the
model's final one) makes the read-out an affine function of ``resid_k``, so the logit-lens logit of
token ``t`` at position ``i`` is ``u_{k,i}ᵀ resid_{k,i} + β_{k,i}`` with
``u_{k,i} = C (w ⊙ W_U[:, t]) / s_{k,i}`` (``C = I - 11ᵀ/D`` for LayerNorm, absent for RMS; ``C`` is
symmetric, so centring the residual equals centring the read-out direction). Composed with the
tensor ``T_{0→k}`` of the first ``k`` blocks this is an exact affine map from the input to the
logit-lens logits, and the class-specific collapse (Eq. 24) with direction ``u_{k,i}`` says which
input tokens drive the layer-``k`` logit-lens prediction: ``Σ_j M_k[i, j] + bias_k[i]`` *is*
TransformerLens' logit-lens logit. At ``k = n_layers`` the scale is the model's own ``ln_final``
scale and the map equals ``TensorLens(output="ln_final").collapse("in_class", token=...)``.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_tensorlens._backend import has_unembedding
from tl_tensorlens._checks import as_int, as_position, as_positions, as_token_ids
from tl_tensorlens._deprecation import renamed_kwargs, warn_deprecated
from tl_tensorlens.capture import FrozenState, capture
from tl_tensorlens.errors import ArgumentError
from tl_tensorlens.replay import hooks_on
from tl_tensorlens.tensors import TensorLens


def as_state(model: Any, state_or_tokens: Any) -> FrozenState:
    """A capture, or the capture of a prompt."""
    return state_or_tokens if isinstance(state_or_tokens, FrozenState) else capture(model, state_or_tokens)


@dataclass(frozen=True)
class TensorLogitLens:
    """Per-layer class-specific maps of the logit-lens prediction, next to TransformerLens' logit lens.

    Row ``r`` of every map belongs to output position ``positions[r]``. Index ``k`` of the ``layer``
    axis is the residual stream after ``depths[k]`` blocks (0 = the embeddings, ``n_layers`` = the
    final residual), the same indexing as ``ActivationCache.accumulated_resid``.

    Attributes:
        tokens: the prompt ``[pos]``.
        positions: output positions of the rows.
        depths: number of blocks applied for each entry of the layer axis.
        target: token whose logit-lens logit each row explains ``[layer, row]``.
        maps: ``M_k[i, j]``: input ``j``'s share of the layer-``k`` logit-lens logit of ``target`` at
            position ``i`` ``[layer, row, pos_in]``.
        bias: the share of no input (biases pushed through, ``ln_final``'s ``b``, ``b_U``) ``[layer, row]``.
        tl_logits: TransformerLens' logit-lens logit of ``target`` (``unembed(ln_final(resid_k))``)
            ``[layer, row]``.
        tl_top: TransformerLens' logit-lens top-1 token ``[layer, row]``.
    """

    tokens: Int[Tensor, " pos"]
    positions: tuple[int, ...]
    depths: tuple[int, ...]
    target: Int[Tensor, "layer row"]
    maps: Float[Tensor, "layer row pos_in"]
    bias: Float[Tensor, "layer row"]
    tl_logits: Float[Tensor, "layer row"]
    tl_top: Int[Tensor, "layer row"]

    @property
    def layers(self) -> tuple[int, ...]:
        """Deprecated name of :attr:`depths`."""
        warn_deprecated("TensorLogitLens.layers", "TensorLogitLens.depths")
        return self.depths

    @property
    def logits(self) -> Float[Tensor, "layer row"]:
        """Logit-lens logits rebuilt from the maps: ``maps.sum(-1) + bias`` (equals :attr:`tl_logits`)."""
        return self.maps.sum(-1) + self.bias

    @property
    def max_error(self) -> float:
        """``max |logits - tl_logits|``: how exactly the tensor reproduces TransformerLens' logit lens."""
        return float((self.logits - self.tl_logits).abs().max())

    def row(self, position: int) -> Float[Tensor, "layer pos_in"]:
        """``[layer, pos_in]`` map of one output position (must be among :attr:`positions`)."""
        p = as_position("position", position, int(self.tokens.shape[0]))
        if p not in self.positions:
            raise ArgumentError("position", position, f"one of the computed positions {self.positions}")
        return self.maps[:, self.positions.index(p)]

    def __repr__(self) -> str:
        return (
            f"TensorLogitLens(depths={list(self.depths)}, rows={len(self.positions)}, pos_in={int(self.tokens.shape[0])}, "
            f"max_error={self.max_error:.1e}, dtype={self.maps.dtype}, device={self.maps.device})"
        )


def _final_norm(model: Any) -> Any:
    norm = getattr(model, "ln_final", None)
    if norm is None or isinstance(norm, torch.nn.Identity):
        return None
    return norm


def _readout(model: Any, resid: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Read ``resid`` [pos, d_model] through ``ln_final`` (its scale frozen at ``resid``) and the unembedding.

    Returns:
        live logits ``[pos, d_vocab]`` (TransformerLens' logit lens), the targets ``[pos]`` (the
        live top-1 where ``target`` is None), the read-out directions ``u`` ``[pos, d_model]`` and
        constants ``β`` ``[pos]`` with ``logit[i, target_i] = u_i · resid_i + β_i``.
    """
    norm = _final_norm(model)
    scale: dict[str, Tensor] = {}

    def record(s: Tensor, hook: Any) -> None:
        scale["s"] = s.detach()

    def frozen(s: Tensor, hook: Any) -> Tensor:
        # A new tensor, not an in-place edit: the Bridge detects norm edits by object identity.
        return scale["s"].to(s.dtype).expand_as(s).clone()

    def read(r: Tensor) -> Tensor:
        return model.unembed(norm(r) if norm is not None else r)

    with torch.no_grad():
        if norm is not None:
            with hooks_on(model, [("ln_final.hook_scale", record)]):
                live = read(resid[None])[0]
        else:
            live = read(resid[None])[0]
    tgt = live.argmax(-1) if target is None else target.to(live.device)
    hooks = [("ln_final.hook_scale", frozen)] if "s" in scale else []
    r = torch.zeros_like(resid)[None].requires_grad_(True)
    with torch.enable_grad(), hooks_on(model, hooks):
        out = read(r)[0]
        picked = out.gather(-1, tgt[:, None])[:, 0]
        # The read-out is affine and acts position-wise, so one backward of the sum gives every u_i.
        (u,) = torch.autograd.grad(picked.sum(), r)
    return live.detach(), tgt, u[0].detach(), picked.detach()


@renamed_kwargs(layers="depths")
def tensor_logit_lens(
    model: Any,
    state_or_tokens: Any,
    *,
    token: int | Int[Tensor, " pos"] | None = None,
    depths: Sequence[int] | None = None,
    positions: Sequence[int] | int | None = None,
    memory_budget: int | str | None = None,
) -> TensorLogitLens:
    """The tensor logit lens: per layer, which input tokens drive the logit-lens prediction.

    For each ``k`` in ``depths`` the residual stream after ``k`` blocks is read through
    ``ln_final`` with the scale frozen at that residual (exactly what
    ``accumulated_resid(apply_ln=True)`` computes) and the unembedding; the class-specific collapse of
    ``T_{0→k}`` with that read-out direction splits the logit-lens logit over the input positions.

    Args:
        model: a decoder (HookedTransformer or TransformerBridge) with ``ln_final`` and ``unembed``.
        state_or_tokens: a :class:`~tl_tensorlens.capture.FrozenState` or one prompt.
        token: the token whose logit is explained: one id, one per position, or None for each
            layer's own logit-lens top-1 at each position.
        depths: entries of the layer axis as numbers of blocks applied, ``0..n_layers`` (default all;
            ``layers=`` is its deprecated name).
        positions: output positions (rows) to compute (default all).
        memory_budget: passed to every :class:`~tl_tensorlens.tensors.TensorLens`.

    Returns:
        A :class:`TensorLogitLens`.

    Raises:
        ArgumentError: the model has no unembedding (an encoder), or a depth/position/token is out of
            range.

    Example:
        >>> import torch
        >>> from transformer_lens.config import TransformerBridgeConfig
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> cfg = TransformerBridgeConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32,
        ...     d_vocab=20, n_ctx=8, act_fn="gelu_new", seed=0)
        >>> model = TransformerBridge.boot_native(cfg, dtype=torch.float64).eval()
        >>> ll = tensor_logit_lens(model, torch.tensor([1, 4, 2, 7]))
        >>> ll.maps.shape, ll.max_error < 1e-10
        (torch.Size([3, 4, 4]), True)
    """
    if not has_unembedding(model):
        raise ArgumentError(
            "model", type(model).__name__, "a decoder with ln_final and unembed (an encoder has no logit lens)"
        )
    state = as_state(model, state_or_tokens)
    n_layers, n = state.n_layers, state.n_pos
    if depths is None:
        ks = list(range(n_layers + 1))
    elif isinstance(depths, (str, bytes)) or not isinstance(depths, Sequence):
        raise ArgumentError("depths", depths, f"a sequence of block counts in 0..{n_layers}")
    else:
        ks = [as_int("depths", k, lo=0, hi=n_layers) for k in depths]
    rows = as_positions("positions", positions, n)
    x0 = state.x0
    fixed: Tensor | None = None
    if token is not None:
        tok = as_token_ids("token", token, int(model.cfg.d_vocab))
        if tok.ndim > 1 or (tok.ndim == 1 and tok.shape[0] != n):
            raise ArgumentError("token", token, f"one token id, or {n} ids (one per position)")
        fixed = tok.to(x0.device).expand(n).clone()

    idx = torch.tensor(rows, device=x0.device)
    maps, biases, targets, tl_logits, tl_top = [], [], [], [], []
    for k in ks:
        resid = state.resid_pre(0) if k == 0 else state.block_output(k - 1)
        live, tgt, u, beta = _readout(model, resid, fixed)
        tl_top.append(live.argmax(-1)[idx])
        tl_logits.append(live.gather(-1, tgt[:, None])[:, 0][idx])
        targets.append(tgt[idx])
        if k == 0:
            # No block applied: T is the identity, so input j only feeds output j.
            M = torch.zeros(len(rows), n, dtype=x0.dtype, device=x0.device)
            M[torch.arange(len(rows)), idx] = (u * x0).sum(-1)[idx]
            maps.append(M)
            biases.append(beta[idx])
            continue
        lens = TensorLens.from_state(model, state, layers=(0, k), output="resid_post", memory_budget=memory_budget)
        maps.append(lens.collapse("in_class", direction=u, positions=rows))
        biases.append((lens.collapse_bias("in_class", direction=u) + beta)[idx])
    return TensorLogitLens(
        tokens=state.tokens[0],
        positions=tuple(rows),
        depths=tuple(ks),
        target=torch.stack(targets),
        maps=torch.stack(maps),
        bias=torch.stack(biases),
        tl_logits=torch.stack(tl_logits),
        tl_top=torch.stack(tl_top),
    )


__all__ = ["TensorLogitLens", "as_state", "tensor_logit_lens"]
