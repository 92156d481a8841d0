"""Per-component direct logit attribution (DLA) from the frozen operator, with the token-level split.

At a fixed prompt the frozen model is exactly affine (:mod:`tl_tensorlens.replay`), so the final
residual stream at the read position ``i`` is the sum of what every component wrote there: the
embedding (and positional embedding), each attention head ``z_h W_O^h``, each attention layer's
output bias, each MLP. The frozen final norm and the unembedding are one affine map of that residual
(``readout = g · resid_final + final_bias``, ``g`` the readout's gradient at position ``i``), so

    readout = Σ_c g · comp_c  +  final_bias          (exactly, every term float64)

where ``readout`` is a logit, or a logit difference ``logit[answer] − logit[incorrect]``. This is the
quantity TransformerLens' ``direct_logit_attribution`` (TL 4.3, ``tools/analysis``) computes on a
bridge in compatibility mode, which also divides each component by the frozen final-norm scale
(``logit_attrs`` / ``apply_ln_to_stack``): its ``unit="component"`` rows are the sums of this table's
``embed``, ``pos_embed``, per-layer heads + ``attn_bias``, and MLP rows, its ``unit="head"`` rows the
head rows, and its total is ``readout − b_U``.

What only the tensor gives is the **token-level split**: every component is itself an affine function
of the prompt's input embeddings ``x0`` (through the frozen routing of every earlier layer), so its
contribution splits over source tokens ``j``,

    g · comp_c = Σ_j gᵀ J_c[i, :, j, :] x0_j  +  token_bias_c

with ``J_c`` the component's block of the frozen operator ``T`` (the Jacobian of the replay). Summed
over components, the token rows are the In+Class collapse of :class:`~tl_tensorlens.TensorLens` at
``output="logits"`` with the readout direction, and ``Σ_c token_bias_c + final_bias`` its
``collapse_bias``. The direct path is not the total effect that
:meth:`TensorLens.with_heads` measures: a head's contribution here is what it writes straight to the
residual stream the unembedding reads, not what later layers make of it.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_tensorlens._backend import final_hidden_hook, has_unembedding
from tl_tensorlens._checks import as_position, as_token_ids
from tl_tensorlens._hooks import feed, record
from tl_tensorlens.capture import FrozenState, capture
from tl_tensorlens.errors import ArgumentError, UnsupportedModelError
from tl_tensorlens.replay import ReplaySpec, frozen_hooks, verify_replay

#: Units of :meth:`ComponentAttribution.grouped`, named as in TL's ``direct_logit_attribution``.
DLA_UNITS: tuple[str, ...] = ("component", "head")


@dataclass(frozen=True)
class ComponentAttribution:
    """A labelled direct-logit-attribution table at one position.

    Attributes:
        labels: one per component: ``"embed"``, ``"pos_embed"`` (when the model has one), per layer
            ``"L{l}H{h}"`` for each head, ``"L{l}.attn_bias"`` and ``"L{l}.mlp"``; last
            ``"final_bias"`` (the final norm's bias and the unembedding bias, pushed through).
        values: each component's direct contribution ``[component]``; they sum to :attr:`readout`.
        by_token: ``[component, pos_in]``: each component's contribution split over the prompt's
            source tokens (zeros for ``final_bias``); ``by_token.sum(-1) + token_bias = values``.
        token_bias: ``[component]``: the part of each component that comes from no token (the biases
            of the layers before it, pushed through the frozen maps).
        readout: the model's logit (or logit difference) at :attr:`position`.
        position: the output position read.
        answer: the token id explained.
        incorrect: the baseline token id of a logit difference, or None.
    """

    labels: tuple[str, ...]
    values: Float[Tensor, " component"]
    by_token: Float[Tensor, "component pos_in"]
    token_bias: Float[Tensor, " component"]
    readout: float
    position: int
    answer: int
    incorrect: int | None

    def table(self) -> list[tuple[str, float]]:
        """``[(label, value), ...]`` in component order."""
        return [(label, float(v)) for label, v in zip(self.labels, self.values, strict=True)]

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` components of largest absolute contribution, largest first."""
        order = self.values.abs().argsort(descending=True)[:k]
        return [(self.labels[int(i)], float(self.values[int(i)])) for i in order]

    def grouped(self, unit: str = "component") -> tuple[list[str], Float[Tensor, " group"]]:
        """The table summed into TL ``direct_logit_attribution`` units (labels as TL writes them).

        ``"component"``: ``embed``, ``pos_embed``, ``{l}_attn_out`` (heads + output bias), ``{l}_mlp_out``;
        ``"head"``: each ``L{l}H{h}``. ``final_bias`` is left out, as TL leaves out ``b_U``.
        """
        if unit not in DLA_UNITS:
            raise ArgumentError("unit", unit, f"one of {DLA_UNITS}")
        labels: list[str] = []
        sums: list[Tensor] = []
        for label, v in zip(self.labels, self.values, strict=True):
            if label == "final_bias":
                continue
            if unit == "head":
                if label.startswith("L") and "H" in label and "." not in label:
                    labels.append(label)
                    sums.append(v)
                continue
            if label in ("embed", "pos_embed"):
                name = label
            else:
                layer, part = label[1:].split("H")[0].split(".")[0], label.split(".")[-1]
                name = f"{layer}_mlp_out" if part == "mlp" else f"{layer}_attn_out"
            if labels and labels[-1] == name:
                sums[-1] = sums[-1] + v
            else:
                labels.append(name)
                sums.append(v)
        return labels, torch.stack(sums)

    def __repr__(self) -> str:
        what = f"logit[{self.answer}]" + (f" - logit[{self.incorrect}]" if self.incorrect is not None else "")
        top = ", ".join(f"{label} {v:+.3g}" for label, v in self.top(3))
        return f"ComponentAttribution({what} at position {self.position} = {self.readout:.6g}; top: {top})"


def _direction(model: Any, answer: Any, incorrect: Any) -> tuple[int, int | None]:
    d_vocab = int(model.cfg.d_vocab)
    a = as_token_ids("answer", answer, d_vocab)
    if a.ndim != 0:
        raise ArgumentError("answer", answer, "one token id")
    if incorrect is None:
        return int(a), None
    b = as_token_ids("incorrect", incorrect, d_vocab)
    if b.ndim != 0 or int(b) == int(a):
        raise ArgumentError("incorrect", incorrect, "one token id, other than answer")
    return int(a), int(b)


def component_attribution(
    model: Any,
    tokens: Any,
    answer: int | Tensor,
    incorrect: int | Tensor | None = None,
    *,
    position: int = -1,
    state: FrozenState | None = None,
    by_token: bool = True,
    verify: bool = True,
) -> ComponentAttribution:
    """Direct logit attribution per head, MLP, embedding and bias, and its split over source tokens.

    Args:
        model: a decoder (HookedTransformer or TransformerBridge) whose blocks add attention and MLP
            outputs to the residual stream (pre-norm or parallel; post-norm blocks are refused).
        tokens: one prompt (token ids ``[pos]`` / ``[1, pos]``, or a string with a tokenizer); ignored
            when ``state`` is given.
        answer: the token whose logit is explained.
        incorrect: a second token: explain ``logit[answer] − logit[incorrect]`` instead.
        position: output position read (default the last).
        state: an existing capture of this model (skips the forward).
        by_token: also compute the token-level split (one backward pass per component).
        verify: check first that the frozen replay reproduces the logits (on by default).

    Returns:
        A :class:`ComponentAttribution`: ``values.sum() == readout`` and
        ``by_token.sum(-1) + token_bias == values``, exactly up to float rounding.

    Raises:
        ArgumentError: bad token ids or position.
        UnsupportedModelError: an encoder, or blocks whose outputs are not a plain sum of the
            attention heads, an output bias and the MLP (e.g. Gemma-2's post-norms).

    Example:
        >>> import torch
        >>> from transformer_lens.config import TransformerBridgeConfig
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> cfg = TransformerBridgeConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32,
        ...     d_vocab=20, n_ctx=8, act_fn="gelu_new", seed=0)
        >>> model = TransformerBridge.boot_native(cfg, dtype=torch.float64).eval()
        >>> dla = component_attribution(model, torch.tensor([1, 4, 2, 7]), answer=3, incorrect=5)
        >>> dla.labels[:4]
        ('embed', 'pos_embed', 'L0H0', 'L0H1')
        >>> bool(torch.isclose(dla.values.sum(), torch.tensor(dla.readout, dtype=torch.float64)))
        True
        >>> dla.by_token.shape
        torch.Size([11, 4])
    """
    if not has_unembedding(model):
        raise UnsupportedModelError({"model": "direct logit attribution needs a decoder with an unembedding"})
    if state is None:
        state = capture(model, tokens)
    n = state.n_pos
    i = as_position("position", position, n)
    a, b = _direction(model, answer, incorrect)
    if verify:
        verify_replay(model, state, outputs=("logits",))
    spec = ReplaySpec(output="logits").resolved(state)
    L = state.n_layers
    final = final_hidden_hook(model)
    names = [final, "unembed.hook_out"]
    for layer in range(L):
        names += [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]
    has_mlp = [layer in state.mlp_kind for layer in range(L)]
    names = [nm for nm in names if not (nm.endswith("hook_mlp_out") and not has_mlp[int(nm.split(".")[1])])]

    x0 = state.x0.detach()
    x = x0.clone()[None].requires_grad_(True)
    with torch.enable_grad():
        hooks = frozen_hooks(model, state, spec) + [feed("blocks.0.hook_resid_pre", x)]
        _, acts = record(
            model, state.tokens.to(x.device), names, fwd_hooks=hooks, stop_after="unembed.hook_out", detach=False
        )
        logits = acts["unembed.hook_out"][0]
        if state.logit_ratio is not None:
            logits = state.logit_ratio[0].to(logits) * logits
        readout = logits[i, a] - (logits[i, b] if b is not None else 0)
        resid = acts[final]
        (g,) = torch.autograd.grad(readout, resid, retain_graph=True)
        g = g.detach()

        # The input x0 = embed (+ pos_embed): its direct part reads only its own position, i.
        embed_parts = [nm for nm in ("hook_embed", "hook_pos_embed") if nm in state.activations]
        parts = [state.activations[nm][0].to(x0) for nm in embed_parts]
        if len(parts) < 2 or not torch.allclose(parts[0] + parts[1], x0, rtol=1e-6, atol=1e-6 * float(x0.abs().max())):
            embed_parts, parts = ["hook_embed"], [x0]
        labels: list[str] = [nm.removeprefix("hook_") for nm in embed_parts]
        n_embed = len(labels)
        comps: list[Tensor] = []  # every other component [1, pos, d_model], in the graph of x
        for layer in range(L):
            attn = model.blocks[layer].attn
            W_O = attn.W_O.to(x0)
            z = acts[f"blocks.{layer}.attn.hook_z"]
            heads = torch.einsum("bphd,hdm->bphm", z, W_O)
            for h in range(heads.shape[2]):
                labels.append(f"L{layer}H{h}")
                comps.append(heads[:, :, h])
            labels.append(f"L{layer}.attn_bias")
            comps.append(acts[f"blocks.{layer}.hook_attn_out"] - heads.sum(2))
            if has_mlp[layer]:
                labels.append(f"L{layer}.mlp")
                comps.append(acts[f"blocks.{layer}.hook_mlp_out"])

        total = x + sum(comps)
        assert isinstance(total, Tensor)
        err = (total - resid).abs().max() / resid.abs().max().clamp_min(1e-30)
        tol = 1e-9 if x0.dtype == torch.float64 else 1e-4
        if err > tol:
            raise UnsupportedModelError(
                {
                    "blocks": f"the final residual stream is not embed + Σ heads + attention bias + MLP "
                    f"(relative gap {float(err):.1e}; post-norm blocks, e.g. Gemma-2/3's "
                    "use_normalization_before_and_after, are not supported)"
                }
            )
        scalars = torch.stack([(g * c).sum() for c in comps])
        embed_values = torch.stack([(g[0] * p).sum() for p in parts])
        values = torch.cat([embed_values, scalars.detach()])
        final_bias = readout.detach() - values.sum()
        split = torch.zeros(len(values) + 1, n, dtype=x0.dtype, device=x0.device)
        split[:n_embed, i] = embed_values
        for k, label in enumerate(labels[n_embed:]):
            if not by_token and not label.endswith("attn_bias"):
                continue
            (gx,) = torch.autograd.grad(scalars[k], x, retain_graph=True, allow_unused=True)
            if gx is not None:
                split[n_embed + k] = (gx[0].detach() * x0).sum(-1)
        # An output bias depends on no input. Where it does, the block normalizes its attention
        # output (post-norms) and hook_attn_out is not the sum of the heads' z W_O.
        biases = [n_embed + k for k, label in enumerate(labels[n_embed:]) if label.endswith("attn_bias")]
        scale = float(values.abs().max().clamp_min(1e-30))
        if biases and float(split[biases].abs().max()) > tol * scale:
            raise UnsupportedModelError(
                {
                    "blocks": "the attention output is not Σ heads z W_O + a constant bias (post-norm blocks, "
                    "e.g. Gemma-2/3's use_normalization_before_and_after, are not supported)"
                }
            )
    labels.append("final_bias")
    values = torch.cat([values, final_bias[None]])
    token_bias = values - split.sum(-1)
    if not by_token:
        token_bias = torch.full_like(values, float("nan"))
        split = torch.full_like(split, float("nan"))
        split[:n_embed, i] = values[:n_embed]
        token_bias[:n_embed] = 0
    return ComponentAttribution(
        labels=tuple(labels),
        values=values,
        by_token=split,
        token_bias=token_bias,
        readout=float(readout.detach()),
        position=i,
        answer=a,
        incorrect=b,
    )


def format_attribution(
    dla: ComponentAttribution, *, top: int | None = None, tokens: Sequence[str] | None = None
) -> str:
    """A plain-text table of :func:`component_attribution` (largest first when ``top`` is given)."""
    rows = dla.top(top) if top is not None else dla.table()
    index = {label: k for k, label in enumerate(dla.labels)}
    lines = [f"{'component':>14}  {'contribution':>12}  top source token"]
    for label, v in rows:
        k = index[label]
        src = ""
        if label != "final_bias" and torch.isfinite(dla.by_token[k]).all():
            j = int(dla.by_token[k].abs().argmax())
            name = tokens[j] if tokens is not None else f"pos {j}"
            src = f"{name!s} ({float(dla.by_token[k, j]):+.3g})"
        lines.append(f"{label:>14}  {v:+12.4f}  {src}")
    lines.append(f"{'sum':>14}  {float(dla.values.sum()):+12.4f}  (readout {dla.readout:+.4f})")
    return "\n".join(lines)


__all__ = ["DLA_UNITS", "ComponentAttribution", "component_attribution", "format_attribution"]
