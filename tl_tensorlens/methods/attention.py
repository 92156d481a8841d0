"""Attention-aggregation baselines (paper Sec. 4.1): per-layer token maps and their cross-layer aggregation.

**Intra-layer maps**: one N×N matrix per layer, rows = dest (pos_out), cols = src.

Four aggregations of one attention layer, from the least to the most complete:

* ``"attn"``: the head-mean attention pattern ``(1/H) Σ_h A^h``.
* ``"w_attn"``: Kobayashi et al. 2020 ("Attention is not only a weight", Eq. 5-6):
  ``‖Σ_h α^h_ij f^h(x_j)‖`` with ``f^h(x) = (x W_V^h + b_V^h) W_O^h``: per-head value vectors
  mapped by the head's output projection, weighted, summed over heads, then the norm (b_O left out).
* ``"w_attn_res_ln"``: Kobayashi et al. 2021 ("Incorporating residual and normalization layers",
  Eq. 7-8): the residual ``x_i`` is added to the diagonal piece and the norm reading the sum is
  applied piece-wise with its real (frozen) scale: ``‖γ ⊙ (p_ij - m(p_ij)) / s_i‖``,
  ``p_ij = Σ_h α^h_ij f^h(x_j) + δ_ij x_i``.
* ``"globenc"``: Modarressi et al. 2022 (GlobEnc, Sec. 3): also the second norm of the layer,
  applied to the ResLN pieces with the scale of the real layer output; the FFN is skipped
  (it is nonlinear), the same skip as the authors' code.
* ``"alti"``: Ferrando et al. 2022 (ALTI, "Measuring the Mixing of Contextual Information in the
  Transformer"; checked against the authors' ``src/contributions.py`` and ``normalize_contributions``
  with ``scaling="min_sum"``): the ResLN pieces ``T_i(x_j)`` and their resultant ``y_i = Σ_j T_i(x_j)
  + (bias terms)`` (for BERT the real ``ln1`` output, b_O and β included); the contribution of j
  to i is ``max(0, ‖y_i‖₁ - ‖y_i - T_i(x_j)‖₁)``: how much closer to the output a piece is than
  the zero vector, in the Manhattan distance. Rows are normalized by the cross-layer step.

Adaptation to the families TransformerLens supports (the papers only treat BERT post-LN):

* **Post-LN encoders (BERT, HookedEncoder)**: exactly the authors' formulas: ResLN uses ``ln1``
  (after attention + residual), GlbEnc then ``ln2`` (after FFN + residual), each with its frozen
  ``hook_scale``.
* **Pre-LN decoders**: the attention-side norm ``ln1`` *precedes* attention and acts on each token
  alone, so it is already inside ``f^h`` (TL's ``hook_v`` is computed from ``ln1``'s output) and
  needs no decomposition. The residual path carries ``x_i`` un-normalized. "ResLN" applies the
  first norm that reads ``x + attn``: ``ln2`` in a sequential block, the next block's ``ln1`` (or
  ``ln_final``) in an attention-only model; in a **parallel** block (GPT-NeoX/GPT-J) no norm reads
  ``x + attn`` alone, so ResLN is the un-normalized ``‖p_ij‖``. "GlbEnc" applies, to the
  un-normalized pieces, the norm that reads the block's output (next block's ``ln1``,
  ``ln_final`` after the last block; ``ln2``'s output only feeds the skipped FFN).
  Gemma-2/3 sandwich norms: ``ln1_post`` (per destination token, linear once frozen) is applied to
  the attention pieces before the residual is added, so the pieces still sum to ``resid_mid``.
  ALTI's resultant is then ``resid_mid = x_i + attn_out_i`` (b_O, and Gemma's ``ln1_post``, as
  bias terms), the same choice as Ferrando & Voita 2024 ("Information flow routes") for decoders;
  in a parallel block it is ``x_i + attn_out_i`` with the MLP left out.
* **Gated MLPs**: irrelevant here; every baseline skips the MLP (GlbEnc and ALTI included, as in
  their papers).
* **GQA**: ``hook_v`` has ``n_key_value_heads`` heads; query head ``h`` uses kv group
  ``h // (n_heads // n_key_value_heads)`` (TL's ``repeat_interleave``).

**Cross-layer aggregation**: attention rollout (Abnar & Zuidema 2020: the product of the
row-normalized per-layer maps, with ``0.5·I`` for the residual where the map does not hold it) and
the mean over layers of the row-normalized maps.
"""

from collections.abc import Mapping
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from tl_tensorlens._backend import is_bridge, is_post_ln, runs_parallel_blocks
from tl_tensorlens.errors import TensorLensError


# --------------------------------------------------------------------------------------------- reading a capture
def activations_of(state: Any) -> Mapping[str, Tensor]:
    """The activation dict of a capture.

    Accepts a ``FrozenState`` (reads ``state.activations``), a plain dict or a TransformerLens
    ``ActivationCache`` of one forward with batch dimension 1.
    """
    acts = getattr(state, "activations", state)
    if not hasattr(acts, "__getitem__") or not hasattr(acts, "keys"):
        raise TensorLensError(f"expected a FrozenState or a dict of activations, got {type(state).__name__}")
    return acts


def read(acts: Mapping[str, Tensor], name: str) -> Tensor:
    """``acts[name]`` without the batch dimension; a library error names a missing hook."""
    try:
        value = acts[name]
    except KeyError:
        raise TensorLensError(
            f"the capture has no activation {name!r}; baselines need the full run_with_cache of one forward (batch 1)"
        ) from None
    if value.shape[0] != 1:
        raise TensorLensError(f"{name} has batch size {value.shape[0]}; baselines need batch 1")
    return value[0]


def n_layers_of(model: Any) -> int:
    return int(model.cfg.n_layers)


def row_normalize(m: Float[Tensor, "... pos_out pos_in"]) -> Float[Tensor, "... pos_out pos_in"]:
    """Divide each row by its sum; rows that sum to 0 stay 0 (never NaN)."""
    total = m.sum(-1, keepdim=True)
    # A zero row (e.g. a position no method gives any mass) must not become NaN and poison rollout.
    return torch.where(total != 0, m / torch.where(total != 0, total, torch.ones_like(total)), m)


def submodule_or_none(model: Any, name: str | None) -> Any:
    """``model.get_submodule(name)``, or None where the model has no such module."""
    if not name:
        return None
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def norm_linear_part(
    model: Any,
    acts: Mapping[str, Tensor],
    name: str,
    pieces: Float[Tensor, "pos_out pos_in d_model"],
) -> Float[Tensor, "pos_out pos_in d_model"]:
    """Apply the frozen linear part of norm module ``name`` to each piece of a decomposed sum.

    A norm reading a sum ``y_i = Σ_j p_ij`` is linear in each piece once its per-token scale is
    frozen (Kobayashi et al. 2021, Eq. 7-8): ``LN(y_i) - β = Σ_j γ ⊙ (p_ij - mean(p_ij)) / s_i``
    with ``s_i = sqrt(var(y_i) + eps)`` the scale of the real sum (TL's ``hook_scale``). RMS norms
    skip the centering; ``*Pre`` norms have no gain; a missing norm (``normalization_type=None``)
    is the identity. The bias β is left out, as in the authors' code.

    Args:
        model: the TransformerLens model (for the norm module and its gain ``w``).
        acts: activations of one forward.
        name: dotted module name, e.g. ``"blocks.0.ln2"`` or ``"ln_final"``.
        pieces: ``p_ij`` indexed [pos_out(i), pos_in(j), d_model].
    """
    module = submodule_or_none(model, name)
    if module is None:
        return pieces
    kind = type(module).__name__
    if kind in ("Identity",):
        return pieces
    if is_bridge(model):
        # Bridge norm modules are generic wrappers: the config says which norm it is (a bridge with
        # normalization_type=None keeps pass-through norm wrappers, with no hook_scale: the identity).
        if getattr(model.cfg, "normalization_type", "LN") is None:
            return pieces
        kind = {"LN": "LayerNorm", "LNPre": "LayerNormPre", "RMS": "RMSNorm", "RMSPre": "RMSNormPre"}.get(
            str(getattr(model.cfg, "normalization_type", "LN")), "LayerNorm"
        )
    scale_name = f"{name}.hook_scale"
    if scale_name not in acts:
        raise TensorLensError(f"norm {name!r} ({kind}) has no {scale_name!r} in the capture; cannot freeze its scale")
    scale = read(acts, scale_name)
    if scale.dim() == 3:
        # use_split_qkv_input: ln1 fires per head with identical copies; keep one.
        scale = scale[:, 0, :]
    out = pieces
    if "RMS" not in kind:
        out = out - out.mean(-1, keepdim=True)
    out = out / scale.to(out.dtype)[:, None, :]
    w = getattr(module, "w", None)
    if isinstance(w, Tensor) and kind not in ("LayerNormPre", "RMSNormPre"):
        w = w.detach().to(out.dtype)
        if is_bridge(model) and getattr(model.cfg, "rmsnorm_uses_offset", False):
            # Gemma's HF RMSNorm multiplies by (1 + weight); HookedTransformer folds the 1 in.
            w = 1 + w
        out = out * w
    return out


# --------------------------------------------------------------------------------------------- intra-layer maps
IntraLayer = Literal["attn", "w_attn", "w_attn_res_ln", "globenc", "alti"]
INTRA_LAYER: tuple[str, ...] = ("attn", "w_attn", "w_attn_res_ln", "globenc", "alti")


def _value_vectors(model: Any, acts: Mapping[str, Tensor], layer: int) -> Float[Tensor, "pos head d_model"]:
    """``f^h(x_j) = v^h_j W_O^h`` for every source token and query head (b_V is inside hook_v)."""
    v = read(acts, f"blocks.{layer}.attn.hook_v")  # [pos, kv_head, d_head]
    n_heads = int(model.cfg.n_heads)
    if v.shape[1] != n_heads:
        if n_heads % v.shape[1]:
            raise TensorLensError(
                f"blocks.{layer}.attn.hook_v has {v.shape[1]} kv heads, which does not divide n_heads={n_heads}"
            )
        v = v.repeat_interleave(n_heads // v.shape[1], dim=1)
    w_o = model.blocks[layer].attn.W_O
    d_head = v.shape[-1]
    w_o = w_o.reshape(n_heads, d_head, -1).to(v.dtype)
    return torch.einsum("jhe,hed->jhd", v, w_o)


def _weighted_pieces(model: Any, acts: Mapping[str, Tensor], layer: int) -> Float[Tensor, "pos_out pos_in d_model"]:
    """``z_ij = Σ_h α^h_ij f^h(x_j)`` (summed over heads before any norm, as Kobayashi 2020)."""
    pattern = read(acts, f"blocks.{layer}.attn.hook_pattern")  # [head, dest, src]
    fx = _value_vectors(model, acts, layer)
    return torch.einsum("hij,jhd->ijd", pattern.to(fx.dtype), fx)


def _add_residual(
    pieces: Float[Tensor, "pos_out pos_in d_model"], x: Float[Tensor, "pos d_model"]
) -> Float[Tensor, "pos_out pos_in d_model"]:
    idx = torch.arange(x.shape[0], device=x.device)
    out = pieces.clone()
    out[idx, idx] = out[idx, idx] + x.to(out.dtype)
    return out


def _block_output_norm(model: Any, layer: int) -> str | None:
    """Name of the norm that reads block ``layer``'s output in a pre-LN model, if any."""
    if layer + 1 < n_layers_of(model):
        return f"blocks.{layer + 1}.ln1"
    return "ln_final" if submodule_or_none(model, "ln_final") is not None else None


def _res_pieces(model: Any, acts: Mapping[str, Tensor], layer: int) -> Float[Tensor, "pos_out pos_in d_model"]:
    """Pieces of ``x_i + attn_i`` (b_O left out): ``Σ_h α f(x_j) (+ ln1_post) + δ_ij x_i``."""
    z = _weighted_pieces(model, acts, layer)
    if submodule_or_none(model, f"blocks.{layer}.ln1_post") is not None:
        z = norm_linear_part(model, acts, f"blocks.{layer}.ln1_post", z)
    x = read(acts, f"blocks.{layer}.hook_resid_pre")
    return _add_residual(z, x)


def alti_pieces(
    model: Any, acts: Mapping[str, Tensor], layer: int
) -> tuple[Float[Tensor, "pos_out pos_in d_model"], Float[Tensor, "pos_out d_model"]]:
    """ALTI's transformed vectors ``T_i(x_j)`` and their resultant ``y_i`` for one layer.

    ``y_i = Σ_j T_i(x_j) + bias_i`` is the real output of the sublayer ALTI analyses: for BERT
    post-LN the ``ln1`` output (``bias_i = L_i(b_O) + β``, as ``resultant`` in the authors' code),
    for pre-LN decoders ``resid_mid`` (``bias_i = b_O``, through ``ln1_post`` where the model has
    one). The bias takes part in the resultant but is no token's contribution.
    """
    pieces = _res_pieces(model, acts, layer)
    n, d = pieces.shape[0], pieces.shape[-1]
    b_o = getattr(model.blocks[layer].attn, "b_O", None)
    bias = torch.zeros(n, 1, d, dtype=pieces.dtype, device=pieces.device)
    if isinstance(b_o, Tensor):
        bias = bias + b_o.detach().to(pieces.dtype).reshape(1, 1, d)
    if submodule_or_none(model, f"blocks.{layer}.ln1_post") is not None:
        bias = norm_linear_part(model, acts, f"blocks.{layer}.ln1_post", bias)
    if is_post_ln(model):
        pieces = norm_linear_part(model, acts, f"blocks.{layer}.ln1", pieces)
        bias = norm_linear_part(model, acts, f"blocks.{layer}.ln1", bias)
        beta = getattr(submodule_or_none(model, f"blocks.{layer}.ln1"), "b", None)
        if isinstance(beta, Tensor):
            bias = bias + beta.detach().to(pieces.dtype)
    return pieces, pieces.sum(1) + bias[:, 0]


def alti_map(
    pieces: Float[Tensor, "pos_out pos_in d_model"], whole: Float[Tensor, "pos_out d_model"]
) -> Float[Tensor, "pos_out pos_in"]:
    """ALTI contributions ``max(0, ‖y_i‖₁ - ‖y_i - T_i(x_j)‖₁)`` (Ferrando et al. 2022), not yet
    row-normalized. A zero piece (a masked, future token) gets exactly 0.

    Where the bias terms dominate ``y_i`` so that every piece is farther from it than the zero
    vector, the row would be all zeros (NaN after the authors' normalization) and would erase
    everything downstream in the rollout. Such a row puts its mass on the diagonal instead: the
    residual stream is the one path that always carries token i. Random-init models with large
    biases hit this; trained models rarely do.

    Example:
        >>> pieces = torch.tensor([[[3.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]]])
        >>> alti_map(pieces, torch.tensor([[3.0, 1.0], [-5.0, 0.0]]))  # ‖y‖₁ = 4; distances 1, 3
        tensor([[3., 1.],
                [0., 1.]])
    """
    whole_norm = whole.abs().sum(-1, keepdim=True)
    distance = (whole[:, None, :] - pieces).abs().sum(-1)
    contrib = (whole_norm - distance).clamp(min=0)
    empty = contrib.sum(-1) == 0
    if bool(empty.any()) and contrib.shape[0] == contrib.shape[1]:
        idx = torch.nonzero(empty).flatten()
        contrib[idx, idx] = 1.0
    return contrib


def _res_ln_norm_name(model: Any, layer: int) -> str | None:
    """The first norm that reads ``x + attn`` in a pre-LN model (module docstring, per family)."""
    cfg = model.cfg
    if runs_parallel_blocks(model):
        return None
    if getattr(cfg, "attn_only", False) or submodule_or_none(model, f"blocks.{layer}.ln2") is None:
        return _block_output_norm(model, layer)
    return f"blocks.{layer}.ln2"


def _check_supported(model: Any) -> None:
    arch = getattr(model.cfg, "original_architecture", None) or ""
    if arch.startswith("Olmo2"):
        raise TensorLensError(
            "norm-based baselines assume pre-LN or BERT post-LN blocks; OLMo-2 puts its norms "
            "after each sublayer (original_architecture=Olmo2ForCausalLM) and is not handled"
        )


@torch.no_grad()
def layer_maps(model: Any, state: Any, kind: IntraLayer) -> Float[Tensor, "layer pos_out pos_in"]:
    """One intra-layer token map per layer, from a single capture.

    Args:
        model: HookedTransformer, HookedEncoder (or a Bridge with TL hook names and weights).
        state: a ``FrozenState`` or the ``run_with_cache`` dict of one forward (batch 1).
        kind: ``"attn"``, ``"w_attn"``, ``"w_attn_res_ln"``, ``"globenc"`` or ``"alti"`` (module
            docstring).

    Returns:
        ``[n_layers, pos_out(dest), pos_in(src)]``, nonnegative, not row-normalized.

    Example:
        >>> import torch
        >>> from transformer_lens.config import TransformerBridgeConfig
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> cfg = TransformerBridgeConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32,
        ...     d_vocab=20, n_ctx=8, act_fn="gelu", normalization_type="LN", seed=0)
        >>> model = TransformerBridge.boot_native(cfg).eval()
        >>> _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
        >>> layer_maps(model, dict(cache), "w_attn").shape
        torch.Size([2, 3, 3])
    """
    if kind not in INTRA_LAYER:
        raise TensorLensError(f"unknown intra-layer aggregation {kind!r}; known: {INTRA_LAYER}")
    _check_supported(model)
    acts = activations_of(state)
    maps = []
    for layer in range(n_layers_of(model)):
        if kind == "attn":
            maps.append(read(acts, f"blocks.{layer}.attn.hook_pattern").mean(0))
            continue
        if kind == "w_attn":
            maps.append(_weighted_pieces(model, acts, layer).norm(dim=-1))
            continue
        if kind == "alti":
            maps.append(alti_map(*alti_pieces(model, acts, layer)))
            continue
        pieces = _res_pieces(model, acts, layer)
        if is_post_ln(model):
            pieces = norm_linear_part(model, acts, f"blocks.{layer}.ln1", pieces)
            if kind == "globenc":
                pieces = norm_linear_part(model, acts, f"blocks.{layer}.ln2", pieces)
        elif kind == "w_attn_res_ln":
            pieces = norm_linear_part(model, acts, _res_ln_norm_name(model, layer) or "", pieces)
        else:
            # Pre-LN: ln2's output only feeds the MLP (skipped), so the residual pieces reach the
            # block output un-normalized; the norm that reads that output is the "second" norm.
            pieces = norm_linear_part(model, acts, _block_output_norm(model, layer) or "", pieces)
        maps.append(pieces.norm(dim=-1))
    return torch.stack(maps)


# --------------------------------------------------------------------------------------------- cross-layer aggregation
def rollout(
    maps: Float[Tensor, "layer pos_out pos_in"], *, add_identity: bool = True
) -> Float[Tensor, "pos_out pos_in"]:
    """Attention rollout (Abnar & Zuidema 2020, Eq. 1): ``R = Â_{L-1} ⋯ Â_1 Â_0``.

    Each layer's map is row-normalized; with ``add_identity`` it becomes ``0.5·Â + 0.5·I`` (the
    authors' way to account for the residual connection, rows still sum to 1). Maps that already
    contain the residual (W-AttnResLN, GlbEnc, ALTI) are rolled out without the identity, as
    Modarressi et al. 2022 and Ferrando et al. 2022 do: adding it again would count the residual
    twice.

    Example:
        >>> a = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
        >>> rollout(a)
        tensor([[1.0000, 0.0000],
                [0.2500, 0.7500]])
    """
    if maps.dim() != 3 or maps.shape[-1] != maps.shape[-2]:
        raise TensorLensError(f"rollout needs maps [layer, pos, pos], got {tuple(maps.shape)}")
    eye = torch.eye(maps.shape[-1], dtype=maps.dtype, device=maps.device)
    joint = eye
    for layer_map in maps:
        step = row_normalize(layer_map)
        if add_identity:
            step = 0.5 * step + 0.5 * eye
        joint = step @ joint
    return joint


def layer_mean(maps: Float[Tensor, "layer pos_out pos_in"]) -> Float[Tensor, "pos_out pos_in"]:
    """Mean over layers of the row-normalized maps (each layer weighs the same, whatever the
    scale of its norms; for ``attn`` the rows already sum to 1).

    Example:
        >>> layer_mean(torch.tensor([[[2.0, 2.0]], [[0.0, 1.0]]]))
        tensor([[0.2500, 0.7500]])
    """
    if maps.dim() != 3:
        raise TensorLensError(f"layer_mean needs maps [layer, pos, pos], got {tuple(maps.shape)}")
    return row_normalize(maps).mean(0)


# ---------------------------------------------------------------------------------------------- the baselines
#: The eight baselines of the paper (Sec. 4.1): intra-layer × cross-layer.
BASELINES: tuple[str, ...] = (
    "attn_rollout",
    "w_attn_rollout",
    "w_attn_res_ln_rollout",
    "globenc_rollout",
    "attn_mean",
    "w_attn_mean",
    "w_attn_res_ln_mean",
    "globenc_mean",
)
#: ALTI (Ferrando et al. 2022): not among the paper's eight, registered beside them.
ALTI = "alti_rollout"
#: Every attention-aggregation baseline: the paper's eight, then ALTI.
ALL_BASELINES: tuple[str, ...] = (*BASELINES, ALTI)
_DESCRIPTIONS = {
    "attn": "head-mean attention pattern",
    "w_attn": "value-weighted norms (Kobayashi et al. 2020)",
    "w_attn_res_ln": "+ residual and norm (Kobayashi et al. 2021)",
    "globenc": "+ second norm (Modarressi et al. 2022, GlobEnc)",
    "alti": "L1 contributions to the ResLN output (Ferrando et al. 2022, ALTI)",
}


def baseline_method(name: str) -> Any:
    """The registry function of baseline ``name`` (``"<intra>_<cross>"``, e.g. ``"globenc_rollout"``).

    The baselines are class-agnostic: ``position`` and ``target`` are ignored and every row is
    computed (one pass over the captured activations, no backward).
    """
    intra, cross = name.rsplit("_", 1)
    if intra not in INTRA_LAYER or cross not in ("rollout", "mean"):
        raise TensorLensError(f"unknown baseline {name!r}; known: {ALL_BASELINES}")
    # Maps that already hold the residual must not get Abnar's 0.5·I added on top.
    has_residual = intra in ("w_attn_res_ln", "globenc", "alti")

    def method(
        model: Any, state: Any, *, position: int | None = None, target: Any = None
    ) -> Float[Tensor, "pos_out pos_in"]:
        maps = layer_maps(model, state, intra)  # type: ignore[arg-type]
        if cross == "rollout":
            return rollout(maps, add_identity=not has_residual)
        return layer_mean(maps)

    method.__name__ = name
    method.__doc__ = f"Baseline {intra} × {cross}: {_DESCRIPTIONS[intra]} (see tl_tensorlens.methods.attention)."
    return method


def baseline_description(name: str) -> str:
    """One line describing baseline ``name``."""
    intra, cross = name.rsplit("_", 1)
    return f"{_DESCRIPTIONS[intra]}, {cross}"
