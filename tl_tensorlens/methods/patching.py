"""TensorLens inside TransformerLens' activation patching: on the linearized model, predicted from
tensors, and frozen-component patching.

Both are exact consequences of TensorLens' frozen affine model ``F(X) = T vec(X) + c`` (Atad et al.
2026, arXiv 2601.17958, Eq. 18-20).

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

from tl_tensorlens._checks import as_int
from tl_tensorlens._deprecation import renamed_kwargs
from tl_tensorlens.capture import FrozenState
from tl_tensorlens.errors import ArgumentError, TensorLensError
from tl_tensorlens.methods.logit_lens import as_state
from tl_tensorlens.replay import linearized, replay
from tl_tensorlens.tensors import TensorLens

Component = Literal["attention", "norm", "mlp", "softcap"]
#: Classes of frozen values, in the order reports list them.
COMPONENTS: tuple[str, ...] = ("attention", "norm", "mlp", "softcap")
PatchingKind = Literal["resid_pre", "head_all_pos"]
PATCHING_KINDS: tuple[str, ...] = ("resid_pre", "head_all_pos")

_LAYER = re.compile(r"^blocks\.(\d+)\.")


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
        raise ArgumentError(
            "corrupted_tokens",
            tuple(tok.shape),
            f"the clean capture's shape {tuple(state.tokens.shape)} (patching needs prompts of the same length)",
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
        raise ArgumentError("kind", kind, f"one of {PATCHING_KINDS}")
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
        >>> from tl_tensorlens import capture
        >>> from transformer_lens.config import TransformerBridgeConfig
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> cfg = TransformerBridgeConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32,
        ...     d_vocab=20, n_ctx=8, act_fn="gelu_new", dtype=torch.float64)
        >>> model = TransformerBridge.boot_native(cfg).eval()
        >>> state = capture(model, torch.tensor([1, 4, 2, 7]))
        >>> metric = LogitDiff(position=-1, good=3, bad=5)
        >>> pred = predict_patching(model, state, torch.tensor([[1, 9, 2, 7]]), metric)
        >>> tl = linearized_patching(model, state, torch.tensor([[1, 9, 2, 7]]), metric)
        >>> bool((pred.values - tl.double()).abs().max() < 1e-5)  # TL's patching stores float32
        True
    """
    if kind not in PATCHING_KINDS:
        raise ArgumentError("kind", kind, f"one of {PATCHING_KINDS}")
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


@renamed_kwargs(layers="blocks")
def mix_frozen(
    clean: FrozenState,
    corrupted: FrozenState,
    components: Sequence[str],
    *,
    blocks: Sequence[int] | None = None,
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
        blocks: only values of these blocks are taken (values outside blocks, such as
            ``ln_final``'s scale, only when ``blocks`` is None; ``layers=`` is its deprecated name).

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
    keep = None if blocks is None else {as_int("blocks", b, lo=0, hi=clean.n_layers - 1) for b in blocks}
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


@renamed_kwargs(layers="blocks")
def frozen_component_patching(
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: LogitDiff,
    *,
    variants: Sequence[Sequence[str]] = DEFAULT_VARIANTS,
    blocks: Sequence[int] | None = None,
    memory_budget: int | str | None = None,
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
        blocks: restrict the swap to these blocks (see :func:`mix_frozen`).
        memory_budget: passed to the lenses.

    Returns:
        A :class:`ComponentPatching`.
    """
    clean_s = as_state(model, clean)
    corr_s = as_state(model, corrupted)
    pos = metric.position + clean_s.n_pos if metric.position < 0 else metric.position
    labels, comps, values, maps = [], [], [], []

    def read(state: FrozenState) -> tuple[float, Tensor]:
        with torch.no_grad():
            logits = replay(model, state, state.x0, output="logits")
            value = float(metric(logits[None]))
        lens = TensorLens.from_state(model, state, output="ln_final", memory_budget=memory_budget)
        token = torch.full((state.n_pos,), metric.good, dtype=torch.long)
        return value, lens.collapse("in_class", token=token, positions=[pos])[0]

    for variant in variants:
        v = tuple(variant)
        value, row = read(mix_frozen(clean_s, corr_s, v, blocks=blocks))
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
