"""TensorLens inside the usual TransformerLens workflows: logit lens and activation patching.

Three workflows, all exact consequences of TensorLens' frozen affine model
``F(X) = T vec(X) + c`` (Atad et al. 2026, arXiv 2601.17958, Eq. 18-20):

**Tensor logit lens** (:func:`tensor_logit_lens`). TransformerLens' logit lens reads the residual
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
scale and the map equals ``TensorLens(output="ln_final").collapse("logit")``.

**Activation patching on the linearized model** (:func:`linearized_patching`,
:func:`predict_patching`). Inside :func:`tl_tensorlens.replay.linearized` the model computes
``F_clean`` (every pattern, norm scale and MLP gate frozen at the clean prompt), so
``transformer_lens.patching`` runs unchanged on it. Because ``F_clean`` is affine, the effect of
patching ``resid_pre`` of layer ``l`` at position ``p`` with its clean value is exactly
``Δmetric = (T_{l→L}ᵀ g)[p] · (T_{0→l} (x_clean − x_corrupted))[p]`` for a metric linear in the
logits with gradient ``g``; patching head ``h``'s output changes the metric by
``gᵀ (T_{l→L}^{+h} − T_{l→L}^{−all heads of l}) T_{0→l} Δx``. :func:`predict_patching` computes these
from tensors alone; the test suite checks them against TransformerLens' own patching to 1e-10.

**Frozen-component patching** (:func:`mix_frozen`, :func:`frozen_component_patching`). The tensor
depends on the prompt only through the frozen values. Taking one class of them — attention
patterns, norm scales, MLP gates/ratios — from a corrupted prompt's capture and the rest from the
clean one, and reading the result at the clean input, attributes a behaviour change to attention
routing, normalization or MLP gating. Taking no class from the corrupted prompt gives back the clean
tensor; taking every class gives the corrupted tensor exactly.
"""

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_tensorlens.capture import FrozenState, capture
from tl_tensorlens.errors import ReplayError, TensorLensError
from tl_tensorlens.replay import linearized, replay
from tl_tensorlens.tensors import TensorLens

Component = Literal["attention", "norm", "mlp", "softcap"]
#: Classes of frozen values, in the order reports list them.
COMPONENTS: tuple[str, ...] = ("attention", "norm", "mlp", "softcap")
PatchingKind = Literal["resid_pre", "head_all_pos"]
PATCHING_KINDS: tuple[str, ...] = ("resid_pre", "head_all_pos")

_LAYER = re.compile(r"^blocks\.(\d+)\.")


def _as_state(model: Any, state_or_tokens: Any) -> FrozenState:
    return state_or_tokens if isinstance(state_or_tokens, FrozenState) else capture(model, state_or_tokens)


# ---------------------------------------------------------------------------------------------
# Tensor logit lens
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorLogitLens:
    """Per-layer class-specific maps of the logit-lens prediction, next to TransformerLens' logit lens.

    Row ``r`` of every map belongs to output position ``positions[r]``. Index ``k`` of the ``layer``
    axis is the residual stream after ``layers[k]`` blocks (0 = the embeddings, ``n_layers`` = the
    final residual), the same indexing as ``ActivationCache.accumulated_resid``.

    Attributes:
        tokens: the prompt ``[pos]``.
        positions: output positions of the rows.
        layers: number of blocks applied for each entry of the layer axis.
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
    layers: tuple[int, ...]
    target: Int[Tensor, "layer row"]
    maps: Float[Tensor, "layer row pos_in"]
    bias: Float[Tensor, "layer row"]
    tl_logits: Float[Tensor, "layer row"]
    tl_top: Int[Tensor, "layer row"]

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
        n = int(self.tokens.shape[0])
        p = position + n if position < 0 else position
        if p not in self.positions:
            raise ReplayError(f"position {position} was not computed; positions={self.positions}")
        return self.maps[:, self.positions.index(p)]

    def __repr__(self) -> str:
        return (
            f"TensorLogitLens(layers={list(self.layers)}, rows={len(self.positions)}, pos_in={int(self.tokens.shape[0])}, "
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
            with model.hooks(fwd_hooks=[("ln_final.hook_scale", record)]):
                live = read(resid[None])[0]
        else:
            live = read(resid[None])[0]
    tgt = live.argmax(-1) if target is None else target.to(live.device)
    hooks = [("ln_final.hook_scale", frozen)] if "s" in scale else []
    r = torch.zeros_like(resid)[None].requires_grad_(True)
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        out = read(r)[0]
        picked = out.gather(-1, tgt[:, None])[:, 0]
        # The read-out is affine and acts position-wise, so one backward of the sum gives every u_i.
        (u,) = torch.autograd.grad(picked.sum(), r)
    return live.detach(), tgt, u[0].detach(), picked.detach()


def tensor_logit_lens(
    model: Any,
    state_or_tokens: Any,
    *,
    token: int | Int[Tensor, " pos"] | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | int | None = None,
    memory_budget: int | None = None,
) -> TensorLogitLens:
    """The tensor logit lens: per layer, which input tokens drive the logit-lens prediction.

    For each ``k`` in ``layers`` the residual stream after ``k`` blocks is read through
    ``ln_final`` with the scale frozen at that residual (exactly what
    ``accumulated_resid(apply_ln=True)`` computes) and the unembedding; the class-specific collapse of
    ``T_{0→k}`` with that read-out direction splits the logit-lens logit over the input positions.

    Args:
        model: a decoder (HookedTransformer or TransformerBridge) with ``ln_final`` and ``unembed``.
        state_or_tokens: a :class:`~tl_tensorlens.capture.FrozenState` or one prompt.
        token: the token whose logit is explained: one id, one per position, or None for each
            layer's own logit-lens top-1 at each position.
        layers: entries of the layer axis as numbers of blocks applied (default ``0 .. n_layers``).
        positions: output positions (rows) to compute (default all).
        memory_budget: passed to every :class:`~tl_tensorlens.tensors.TensorLens`.

    Returns:
        A :class:`TensorLogitLens`.

    Raises:
        ReplayError: the model has no unembedding (an encoder), or a layer/position is out of range.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32,
        ...     d_vocab=20, n_ctx=8, act_fn="gelu_new", dtype=torch.float64)
        >>> model = HookedTransformer(cfg)
        >>> ll = tensor_logit_lens(model, torch.tensor([1, 4, 2, 7]))
        >>> ll.maps.shape, ll.max_error < 1e-10
        (torch.Size([3, 4, 4]), True)
    """
    state = _as_state(model, state_or_tokens)
    if state.backend == "encoder" or getattr(model, "unembed", None) is None:
        raise ReplayError("tensor_logit_lens needs a decoder with ln_final and unembed (an encoder has no logit lens)")
    n_layers, n = state.n_layers, state.n_pos
    ks = list(range(n_layers + 1)) if layers is None else [int(k) for k in layers]
    for k in ks:
        if not 0 <= k <= n_layers:
            raise ReplayError(f"layers: {k} out of range 0..{n_layers} (number of blocks applied)")
    if positions is None:
        rows = list(range(n))
    else:
        rows = [
            int(p) + n if int(p) < 0 else int(p) for p in ([positions] if isinstance(positions, int) else positions)
        ]
    for p in rows:
        if not 0 <= p < n:
            raise ReplayError(f"positions: {p} out of range 0..{n - 1}")
    x0 = state.x0
    fixed: Tensor | None = None
    if token is not None:
        fixed = torch.as_tensor(token, device=x0.device).long().expand(n).clone()

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
        maps.append(lens.collapse("class", direction=u, positions=rows))
        biases.append((lens.collapse_bias("class", direction=u) + beta)[idx])
    return TensorLogitLens(
        tokens=state.tokens[0],
        positions=tuple(rows),
        layers=tuple(ks),
        target=torch.stack(targets),
        maps=torch.stack(maps),
        bias=torch.stack(biases),
        tl_logits=torch.stack(tl_logits),
        tl_top=torch.stack(tl_top),
    )


# ---------------------------------------------------------------------------------------------
# Activation patching on the linearized model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitDiff:
    """A patching metric linear in the logits: ``logit[position, good] - logit[position, bad]``.

    Callable on logits ``[batch, pos, d_vocab]`` (the signature ``transformer_lens.patching`` expects;
    the batch mean is returned) and able to give its own gradient, which is what makes the patching
    results computable from tensors.

    Attributes:
        position: output position read (negative counts from the end).
        good: token whose logit counts positively.
        bad: token subtracted (None: the plain logit of ``good``).
    """

    position: int
    good: int
    bad: int | None = None

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Tensor:
        value = logits[:, self.position, self.good]
        if self.bad is not None:
            value = value - logits[:, self.position, self.bad]
        return value.mean()

    def gradient(self, n_pos: int, d_vocab: int, like: Tensor) -> Float[Tensor, "pos d_vocab"]:
        """``∂metric/∂logits`` for one prompt."""
        g = torch.zeros(n_pos, d_vocab, dtype=like.dtype, device=like.device)
        g[self.position, self.good] += 1
        if self.bad is not None:
            g[self.position, self.bad] -= 1
        return g


def _cache_of(model: Any, state: FrozenState) -> Any:
    from transformer_lens import ActivationCache

    return ActivationCache(dict(state.activations), model)


def _check_corrupted(state: FrozenState, corrupted_tokens: Any) -> Tensor:
    tok = torch.as_tensor(corrupted_tokens)
    if tok.ndim == 1:
        tok = tok[None]
    if tok.shape != state.tokens.shape:
        raise ReplayError(
            f"corrupted tokens have shape {tuple(tok.shape)}, the clean capture {tuple(state.tokens.shape)}: "
            "patching needs prompts of the same length"
        )
    return tok.to(state.tokens.device).long()


def linearized_patching(
    model: Any,
    state: FrozenState,
    corrupted_tokens: Int[Tensor, "1 pos"],
    metric: Callable[[Tensor], Tensor],
    *,
    kind: PatchingKind = "resid_pre",
) -> Float[Tensor, "layer index"]:
    """Run ``transformer_lens.patching`` on the model linearized at the clean capture ``state``.

    The corrupted prompt goes through ``F_clean`` (frozen at the clean prompt); clean activations
    come from the capture. Everything inside is ordinary TransformerLens.

    Args:
        model: the model ``state`` was captured from.
        state: the clean capture.
        corrupted_tokens: ``[1, pos]`` (the clean length).
        metric: logits ``[batch, pos, d_vocab]`` -> scalar (e.g. :class:`LogitDiff`).
        kind: ``"resid_pre"`` (``get_act_patch_resid_pre``, ``[layer, pos]``) or ``"head_all_pos"``
            (``get_act_patch_attn_head_out_all_pos``, ``[layer, head]``).

    Returns:
        TransformerLens' patching result.
    """
    from transformer_lens import patching

    if kind not in PATCHING_KINDS:
        raise ReplayError(f"kind={kind!r}; choose one of {PATCHING_KINDS}")
    tok = _check_corrupted(state, corrupted_tokens)
    fn = patching.get_act_patch_resid_pre if kind == "resid_pre" else patching.get_act_patch_attn_head_out_all_pos
    with linearized(model, state):
        return fn(model, tok, _cache_of(model, state), metric).detach()


def corrupted_input(
    model: Any, state: FrozenState, corrupted_tokens: Int[Tensor, "1 pos"]
) -> Float[Tensor, "pos d_model"]:
    """``blocks.0.hook_resid_pre`` of the corrupted prompt as the linearized model computes it
    (an encoder's embedding norm stays frozen at the clean scale)."""
    tok = _check_corrupted(state, corrupted_tokens)
    with torch.no_grad(), linearized(model, state):
        _, cache = model.run_with_cache(tok, names_filter=["blocks.0.hook_resid_pre"])
    return cache["blocks.0.hook_resid_pre"][0].detach()


@dataclass(frozen=True)
class PatchingPrediction:
    """Patching results computed from tensors alone (see :func:`predict_patching`).

    Attributes:
        kind: "resid_pre" (``values[layer, pos]``) or "head_all_pos" (``values[layer, head]``).
        values: predicted metric after each patch.
        corrupted: metric of the linearized model on the corrupted prompt (no patch).
        clean: metric on the clean prompt.
    """

    kind: str
    values: Float[Tensor, "layer index"]
    corrupted: float
    clean: float


def predict_patching(
    model: Any,
    state: FrozenState,
    corrupted_tokens: Int[Tensor, "1 pos"],
    metric: LogitDiff,
    *,
    kind: PatchingKind = "resid_pre",
    memory_budget: int | None = None,
) -> PatchingPrediction:
    """Predict :func:`linearized_patching` from tensors: one VJP (per head) and one JVP per layer.

    With ``Δx = x_clean − x_corrupted`` at ``blocks.0.hook_resid_pre`` and ``g`` the metric's
    gradient, ``Δr_l = T_{0→l} Δx`` is the clean-minus-corrupted residual entering layer ``l`` and

    * ``resid_pre``: ``value[l, p] = m_corr + (T_{l→L}ᵀ g)[p] · Δr_l[p]``;
    * ``head_all_pos``: ``value[l, h] = m_corr + ⟨(T_{l→L}^{heads l = {h}} − T_{l→L}^{heads l = ∅})ᵀ g, Δr_l⟩``.

    Exact because the linearized model is affine; the constant ``c`` cancels in every difference.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32,
        ...     d_vocab=20, n_ctx=8, act_fn="gelu_new", dtype=torch.float64)
        >>> model = HookedTransformer(cfg)
        >>> state = capture(model, torch.tensor([1, 4, 2, 7]))
        >>> metric = LogitDiff(position=-1, good=3, bad=5)
        >>> pred = predict_patching(model, state, torch.tensor([[1, 9, 2, 7]]), metric)
        >>> tl = linearized_patching(model, state, torch.tensor([[1, 9, 2, 7]]), metric)
        >>> bool((pred.values - tl.double()).abs().max() < 1e-5)  # TL's patching stores float32
        True
    """
    if kind not in PATCHING_KINDS:
        raise ReplayError(f"kind={kind!r}; choose one of {PATCHING_KINDS}")
    L, n = state.n_layers, state.n_pos
    x0 = state.x0
    xc = corrupted_input(model, state, corrupted_tokens)
    full = TensorLens.from_state(model, state, output="logits", memory_budget=memory_budget)
    g = metric.gradient(n, full.d_out, x0)
    m_corr = float((g * (full.apply(xc) + full.bias)).sum())
    m_clean = float((g * full.output).sum())
    dx = x0 - xc
    n_heads = int(state.pattern(0).shape[0])
    values = torch.zeros(L, n if kind == "resid_pre" else n_heads, dtype=x0.dtype, device=x0.device)
    for layer in range(L):
        dr = dx if layer == 0 else full.layer_range(0, layer).apply(dx)
        tail = full.layer_range(layer, L, output="logits")
        if kind == "resid_pre":
            values[layer] = m_corr + (tail.apply_adjoint(g) * dr).sum(-1)
            continue
        none = tail.with_heads({**dict(tail.spec.heads or {}), layer: []}).apply_adjoint(g)
        for h in range(n_heads):
            only = tail.with_heads({**dict(tail.spec.heads or {}), layer: [h]}).apply_adjoint(g)
            values[layer, h] = m_corr + ((only - none) * dr).sum()
    return PatchingPrediction(kind, values, m_corr, m_clean)


# ---------------------------------------------------------------------------------------------
# Frozen-component patching
# ---------------------------------------------------------------------------------------------


def component_of(hook_name: str) -> str:
    """Class of a frozen value by its hook name: "attention", "norm", "mlp" (or raises).

    Example:
        >>> component_of("blocks.1.attn.hook_pattern"), component_of("ln_final.hook_scale")
        ('attention', 'norm')
    """
    if hook_name.endswith("attn.hook_pattern"):
        return "attention"
    if hook_name.endswith("hook_scale"):
        return "norm"
    if re.search(r"mlp\.hook_(pre|post|mid)$", hook_name):
        return "mlp"
    raise TensorLensError(f"frozen value '{hook_name}' belongs to no known component class {COMPONENTS}")


def _layer_of(hook_name: str) -> int | None:
    m = _LAYER.match(hook_name)
    return int(m.group(1)) if m else None


def mix_frozen(
    clean: FrozenState,
    corrupted: FrozenState,
    components: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
) -> FrozenState:
    """The clean capture with the frozen values of ``components`` taken from ``corrupted``.

    Tokens and activations (hence the lens input) stay the clean ones, so a lens built on the result
    reads ``F_mixed`` at the clean input.

    Args:
        clean: the base capture.
        corrupted: the donor capture (same model, same length).
        components: classes taken from ``corrupted``: "attention" (patterns), "norm" (every norm
            scale), "mlp" (MLP gates / activation ratios, an encoder head's GELU ratio), "softcap"
            (the frozen output-logit soft-cap ratio).
        layers: only values of these blocks are taken (values outside blocks, such as
            ``ln_final``'s scale, only when ``layers`` is None).

    Returns:
        A new :class:`~tl_tensorlens.capture.FrozenState` (``dataclasses.replace`` of ``clean``).

    Raises:
        TensorLensError: unknown component, or captures of different shapes/models.
    """
    bad = set(components) - set(COMPONENTS)
    if bad:
        raise TensorLensError(f"unknown component(s) {sorted(bad)}; choose from {COMPONENTS}")
    if clean.tokens.shape != corrupted.tokens.shape or set(clean.frozen) != set(corrupted.frozen):
        raise TensorLensError(
            f"captures differ: tokens {tuple(clean.tokens.shape)} vs {tuple(corrupted.tokens.shape)}, "
            f"{len(clean.frozen)} vs {len(corrupted.frozen)} frozen hooks; capture both prompts on the same "
            "model with the same length"
        )
    keep = None if layers is None else {int(layer) for layer in layers}
    take = set(components)

    def chosen(name: str) -> bool:
        layer = _layer_of(name)
        return keep is None or (layer is not None and layer in keep)

    frozen = {k: (corrupted.frozen[k] if component_of(k) in take and chosen(k) else v) for k, v in clean.frozen.items()}
    head_act = dict(clean.head_act_ratio)
    if "mlp" in take and keep is None:
        head_act = dict(corrupted.head_act_ratio)
    logit_ratio = corrupted.logit_ratio if "softcap" in take and keep is None else clean.logit_ratio
    return dataclasses.replace(clean, frozen=frozen, head_act_ratio=head_act, logit_ratio=logit_ratio)


@dataclass(frozen=True)
class ComponentPatching:
    """Result of :func:`frozen_component_patching`: one row per variant.

    Attributes:
        labels: variant names ("clean", "corrupted attention", ..., "corrupted prompt").
        components: classes taken from the corrupted capture, per variant (None: the corrupted
            prompt itself, read at its own input).
        metric: the metric of each variant ``[variant]``.
        maps: class-specific (logit) collapse of each variant's tensor at ``position`` for the
            metric's ``good`` token ``[variant, pos_in]``.
        position: the output position read.
    """

    labels: tuple[str, ...]
    components: tuple[tuple[str, ...] | None, ...]
    metric: Float[Tensor, " variant"]
    maps: Float[Tensor, "variant pos_in"]
    position: int

    def table(self) -> str:
        """A Markdown table of the metric per variant, with the share of the clean→corrupted change."""
        clean, corr = float(self.metric[0]), float(self.metric[-1])
        span = corr - clean
        lines = ["| variant | metric | share of clean→corrupted change |", "|---|---|---|"]
        for label, v in zip(self.labels, self.metric.tolist(), strict=True):
            share = (v - clean) / span if abs(span) > 1e-12 else float("nan")
            lines.append(f"| {label} | {v:.4f} | {share:.1%} |")
        return "\n".join(lines)


DEFAULT_VARIANTS: tuple[tuple[str, ...], ...] = (
    (),
    ("attention",),
    ("norm",),
    ("mlp",),
    ("attention", "norm", "mlp", "softcap"),
)


def frozen_component_patching(
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: LogitDiff,
    *,
    variants: Sequence[Sequence[str]] = DEFAULT_VARIANTS,
    layers: Sequence[int] | None = None,
    memory_budget: int | None = None,
) -> ComponentPatching:
    """Attribute a behaviour change to attention routing, normalization or MLP gating.

    For each variant the clean capture gets the frozen values of the named classes from the
    corrupted capture (:func:`mix_frozen`); the resulting affine model is read at the **clean**
    input. The last row is the corrupted prompt itself (its own tensor at its own input). A class
    whose swap alone moves the metric most of the way from clean to corrupted carries the behaviour.

    Args:
        model: the model.
        clean: clean capture or prompt.
        corrupted: corrupted capture or prompt (same length).
        metric: a :class:`LogitDiff` (its ``good`` token also picks the logit collapse shown in ``maps``).
        variants: tuples of classes to take from the corrupted capture.
        layers: restrict the swap to these blocks (see :func:`mix_frozen`).
        memory_budget: passed to the lenses.

    Returns:
        A :class:`ComponentPatching`.
    """
    clean_s = _as_state(model, clean)
    corr_s = _as_state(model, corrupted)
    pos = metric.position + clean_s.n_pos if metric.position < 0 else metric.position
    labels, comps, values, maps = [], [], [], []

    def read(state: FrozenState) -> tuple[float, Tensor]:
        with torch.no_grad():
            logits = replay(model, state, state.x0, output="logits")
            value = float(metric(logits[None]))
        lens = TensorLens.from_state(model, state, output="ln_final", memory_budget=memory_budget)
        token = torch.full((state.n_pos,), metric.good, dtype=torch.long)
        return value, lens.collapse("logit", token=token, positions=[pos])[0]

    for variant in variants:
        v = tuple(variant)
        value, row = read(mix_frozen(clean_s, corr_s, v, layers=layers))
        labels.append("clean" if not v else "corrupted " + "+".join(v))
        comps.append(v)
        values.append(value)
        maps.append(row)
    value, row = read(corr_s)
    labels.append("corrupted prompt")
    comps.append(None)
    values.append(value)
    maps.append(row)
    x0 = clean_s.x0
    return ComponentPatching(tuple(labels), tuple(comps), torch.tensor(values, dtype=x0.dtype), torch.stack(maps), pos)


def frozen_class_counts(state: FrozenState) -> Mapping[str, int]:
    """How many frozen hooks of each class a capture holds (a quick check of what a swap moves)."""
    counts: dict[str, int] = {c: 0 for c in COMPONENTS}
    for name in state.frozen:
        counts[component_of(name)] += 1
    counts["mlp"] += len(state.head_act_ratio)
    counts["softcap"] += int(state.logit_ratio is not None)
    return counts


__all__ = [
    "COMPONENTS",
    "ComponentPatching",
    "LogitDiff",
    "PATCHING_KINDS",
    "PatchingPrediction",
    "TensorLogitLens",
    "component_of",
    "corrupted_input",
    "frozen_class_counts",
    "frozen_component_patching",
    "linearized_patching",
    "mix_frozen",
    "predict_patching",
    "tensor_logit_lens",
]
