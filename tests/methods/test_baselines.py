"""Baselines: hand-worked known answers, exact bookkeeping identities, every family, registry."""

import math
import warnings

import pytest
import torch

from tests.models import (
    BRIDGE_FAMILIES,
    HAS_HOOKED,
    NO_HOOKED,
    TOKENS,
    bridge_model,
    decoder_model,
    decoder_model_cfg,
    encoder_model,
    family_params,
)
from tl_tensorlens.errors import TensorLensError
from tl_tensorlens.methods import (
    ALL_BASELINES,
    BASELINES,
    TENSOR_METHODS,
    get_method,
    layer_maps,
    layer_mean,
    list_methods,
    register_method,
    rollout,
    unregister_method,
)
from tl_tensorlens.methods.attention import _res_pieces, _weighted_pieces, alti_pieces

needs_hooked = pytest.mark.skipif(not HAS_HOOKED, reason=NO_HOOKED)

F64 = dict(dtype=torch.float64)


def _cache(model, tokens=TOKENS):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return {k: v for k, v in cache.items()}


# --------------------------------------------------------------------------------------------
# Hand-built case 1: 2-layer attention-only pre-LN decoder, no norms, one head, d_model = 2,
# W_O = I, hand-set patterns, values and residuals (the baselines read nothing else).
#   layer 0: A = [[1, 0], [.5, .5]],   v_0 = [1, 0], v_1 = [0, 2],  x_0 = [1, 1], x_1 = [0, 1]
#   layer 1: A = [[1, 0], [.25, .75]], v_0 = [3, 0], v_1 = [0, 4],  x_0 = [2, 0], x_1 = [0, 0]
# --------------------------------------------------------------------------------------------
def _hand_decoder(backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = decoder_model_cfg(
            backend,
            d_model=2,
            n_heads=1,
            d_head=2,
            d_vocab=4,
            n_ctx=4,
            attn_only=True,
            normalization_type=None,
            act_fn="relu",
        )
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W_O.copy_(torch.eye(2, **F64)[None])
    t = lambda x: torch.tensor(x, **F64)[None]  # noqa: E731
    acts = {
        "blocks.0.attn.hook_pattern": t([[[1, 0], [0.5, 0.5]]]),
        "blocks.1.attn.hook_pattern": t([[[1, 0], [0.25, 0.75]]]),
        "blocks.0.attn.hook_v": t([[[1, 0]], [[0, 2]]]),
        "blocks.1.attn.hook_v": t([[[3, 0]], [[0, 4]]]),
        "blocks.0.hook_resid_pre": t([[1, 1], [0, 1]]),
        "blocks.1.hook_resid_pre": t([[2, 0], [0, 0]]),
    }
    return model, acts


HAND_DECODER_EXPECTED = {
    # Â_l = 0.5 A_l + 0.5 I: Â_0 = [[1,0],[.25,.75]], Â_1 = [[1,0],[.125,.875]]; R = Â_1 Â_0.
    "attn_rollout": [[1, 0], [0.125 + 0.875 * 0.25, 0.875 * 0.75]],
    "attn_mean": [[1, 0], [0.375, 0.625]],
    # ‖α f‖: layer 0 rows [1, 0], [.5, 1] -> [1/3, 2/3]; layer 1 rows [3, 0], [.75, 3] -> [.2, .8].
    "w_attn_mean": [[1, 0], [(1 / 3 + 0.2) / 2, (2 / 3 + 0.8) / 2]],
    # with 0.5 I: Â_0 = [[1,0],[1/6,5/6]], Â_1 = [[1,0],[.1,.9]].
    "w_attn_rollout": [[1, 0], [0.1 + 0.9 / 6, 0.9 * 5 / 6]],
    # + residual on the diagonal: layer 0 rows ‖[2,1]‖=√5, 0 | ‖[.5,0]‖=.5, ‖[0,2]‖=2 -> [.2, .8];
    # layer 1 rows 5, 0 | .75, 3 -> [.2, .8]. No norms in this model; rollout without identity.
    "w_attn_res_ln_rollout": [[1, 0], [0.2 + 0.8 * 0.2, 0.8 * 0.8]],
    "w_attn_res_ln_mean": [[1, 0], [0.2, 0.8]],
    "globenc_rollout": [[1, 0], [0.36, 0.64]],
    "globenc_mean": [[1, 0], [0.2, 0.8]],
}


@pytest.mark.parametrize("method", BASELINES)
def test_hand_built_decoder_known_answer(decoder, method):
    model, acts = _hand_decoder(decoder.backend)
    got = get_method(method)(model, acts)
    torch.testing.assert_close(got, torch.tensor(HAND_DECODER_EXPECTED[method], **F64), rtol=0, atol=1e-12)


def test_hand_built_decoder_raw_layer_maps(decoder):
    model, acts = _hand_decoder(decoder.backend)
    torch.testing.assert_close(layer_maps(model, acts, "w_attn")[0], torch.tensor([[1, 0], [0.5, 1]], **F64))
    torch.testing.assert_close(
        layer_maps(model, acts, "w_attn_res_ln")[0], torch.tensor([[math.sqrt(5), 0], [0.5, 2]], **F64)
    )


def test_hand_built_decoder_alti(decoder):
    # Same activations, and b_O = [-1, 1] in layer 1 so the resultant differs from the pieces' sum.
    # Layer 0 (b_O = 0), ALTI = max(0, ‖y‖₁ - ‖y - p‖₁) with p_ij = α_ij v_j + δ_ij x_i:
    #   row 0: p = [2, 1], 0; y = [2, 1] -> [3, 0].
    #   row 1: p = [.5, 0], [0, 2]; y = [.5, 2], ‖y‖₁ = 2.5 -> [2.5 - 2, 2.5 - .5] = [.5, 2].
    # Layer 1: row 0: p = [5, 0], 0; y = [4, 1] -> [5 - 2, 5 - 5] = [3, 0].
    #   row 1: p = [.75, 0], [0, 3]; y = [-.25, 4], ‖y‖₁ = 4.25; distances 5 and 1.25 -> [0, 3]
    #   (the first is clamped at 0: that piece points away from the output).
    # Rollout without identity: [[1, 0], [0, 1]] @ [[1, 0], [.2, .8]].
    model, acts = _hand_decoder(decoder.backend)
    with torch.no_grad():
        model.blocks[0].attn.b_O.zero_()
        model.blocks[1].attn.b_O.copy_(torch.tensor([-1.0, 1.0], **F64))
    maps = layer_maps(model, acts, "alti")
    torch.testing.assert_close(maps[0], torch.tensor([[3, 0], [0.5, 2]], **F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(maps[1], torch.tensor([[3, 0], [0, 3]], **F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        get_method("alti_rollout")(model, acts), torch.tensor([[1, 0], [0.2, 0.8]], **F64), rtol=0, atol=1e-12
    )


# --------------------------------------------------------------------------------------------
# Hand-built case 2: 1-layer BERT post-LN block, one head, d_model = 2, W_O = I,
# ln1.w = [1, 3], ln2.w = [1, 1]. A = [[.5, .5], [.25, .75]], v_0 = [1, 0], v_1 = [0, 2],
# x_0 = [2, 0], x_1 = [0, .5]; ln1 scales s1 = [2, 1], ln2 scales s2 = [.5, 4].
# Pieces p_ij = α_ij v_j + δ_ij x_i: row 0: [2.5, 0], [0, 1]; row 1: [.25, 0], [0, 2].
# In d = 2, centering maps [a, b] to c·[1, -1] with c = (a - b)/2; ln1 gain -> c·[1, -3] / s1,
# norm |c|·√10 / s1: row 0: .625√10, .25√10; row 1: .125√10, √10.
# GlbEnc: re-centre c'[1, -3] (c' = c/s1) -> 2c'[1, -1], / s2 -> 2√2 |c'| / s2:
# row 0: 2.5√2, √2; row 1: .0625√2, .5√2.
# --------------------------------------------------------------------------------------------
def _hand_encoder():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = encoder_model(n_layers=1, d_model=2, n_heads=1, d_head=2, d_mlp=4, d_vocab=8, n_ctx=4)
    with torch.no_grad():
        model.blocks[0].attn.W_O.copy_(torch.eye(2, **F64)[None])
        model.blocks[0].ln1.w.copy_(torch.tensor([1.0, 3.0], **F64))
        model.blocks[0].ln2.w.copy_(torch.tensor([1.0, 1.0], **F64))
    t = lambda x: torch.tensor(x, **F64)[None]  # noqa: E731
    acts = {
        "blocks.0.attn.hook_pattern": t([[[0.5, 0.5], [0.25, 0.75]]]),
        "blocks.0.attn.hook_v": t([[[1, 0]], [[0, 2]]]),
        "blocks.0.hook_resid_pre": t([[2, 0], [0, 0.5]]),
        "blocks.0.ln1.hook_scale": t([[2.0], [1.0]]),
        "blocks.0.ln2.hook_scale": t([[0.5], [4.0]]),
    }
    return model, acts


@needs_hooked
def test_hand_built_encoder_known_answer():
    model, acts = _hand_encoder()
    r10, r2 = math.sqrt(10), math.sqrt(2)
    torch.testing.assert_close(layer_maps(model, acts, "w_attn")[0], torch.tensor([[0.5, 1], [0.25, 1.5]], **F64))
    torch.testing.assert_close(
        layer_maps(model, acts, "w_attn_res_ln")[0],
        torch.tensor([[0.625 * r10, 0.25 * r10], [0.125 * r10, r10]], **F64),
    )
    torch.testing.assert_close(
        layer_maps(model, acts, "globenc")[0], torch.tensor([[2.5 * r2, r2], [0.0625 * r2, 0.5 * r2]], **F64)
    )
    # One layer, residual included: rollout and mean are the row-normalized map.
    expected = torch.tensor([[5 / 7, 2 / 7], [1 / 9, 8 / 9]], **F64)
    for name in ("w_attn_res_ln_rollout", "w_attn_res_ln_mean", "globenc_rollout", "globenc_mean"):
        torch.testing.assert_close(get_method(name)(model, acts), expected)
    torch.testing.assert_close(get_method("attn_mean")(model, acts), torch.tensor([[0.5, 0.5], [0.25, 0.75]], **F64))


@needs_hooked
def test_hand_built_encoder_alti():
    # ln1 pieces (above): row 0: [.625, -1.875], [-.25, .75]; row 1: [.125, -.375], [-1, 3].
    # b_O = 0, β = [.5, 0]: y_0 = [.875, -1.125] (‖y‖₁ = 2), y_1 = [-.375, 2.625] (‖y‖₁ = 3).
    # Distances: row 0: 1, 3 -> [1, 0]; row 1: 3.5, 1 -> [0, 2].
    model, acts = _hand_encoder()
    with torch.no_grad():
        model.blocks[0].attn.b_O.zero_()
        model.blocks[0].ln1.b.copy_(torch.tensor([0.5, 0.0], **F64))
    torch.testing.assert_close(layer_maps(model, acts, "alti")[0], torch.tensor([[1, 0], [0, 2]], **F64))
    torch.testing.assert_close(get_method("alti_rollout")(model, acts), torch.eye(2, **F64))


def test_rollout_and_mean_by_hand():
    a = torch.tensor([[[2.0, 2.0], [0.0, 4.0]], [[1.0, 3.0], [1.0, 1.0]]], **F64)
    # row-normalized: L0 = [[.5,.5],[0,1]], L1 = [[.25,.75],[.5,.5]]
    torch.testing.assert_close(rollout(a, add_identity=False), torch.tensor([[0.125, 0.875], [0.25, 0.75]], **F64))
    torch.testing.assert_close(layer_mean(a), torch.tensor([[0.375, 0.625], [0.25, 0.75]], **F64))
    # zero rows stay zero instead of NaN
    assert torch.isfinite(rollout(torch.zeros(2, 3, 3, **F64), add_identity=False)).all()
    with pytest.raises((TensorLensError, TypeError)):  # jaxtyping's TypeCheckError under pytest
        rollout(torch.zeros(3, 3))


# --------------------------------------------------------------------------------------------
# Exact bookkeeping on random models: the decomposed pieces sum to the model's own sums.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "backend, family", family_params(["gpt2", "llama_gqa", "three_layers_gqa_bias", "gemma2_softcaps_sandwich"])
)
def test_pieces_sum_to_the_residual(backend, family):
    model = decoder_model(backend, family)
    acts = _cache(model)
    for layer in range(model.cfg.n_layers):
        b_o = model.blocks[layer].attn.b_O.detach()
        z = _weighted_pieces(model, acts, layer).sum(1)
        if "sandwich" not in family:  # Σ_j Σ_h α f(x_j) = attn_out - b_O (GQA grouping included)
            torch.testing.assert_close(z, acts[f"blocks.{layer}.hook_attn_out"][0] - b_o, rtol=0, atol=1e-12)
        p = _res_pieces(model, acts, layer).sum(1)
        if "sandwich" in family:
            # ln1_post is applied piece-wise; its bias-free part of b_O is left out.
            from tl_tensorlens.methods.attention import norm_linear_part

            b_part = norm_linear_part(
                model, acts, f"blocks.{layer}.ln1_post", b_o.expand(1, TOKENS.shape[1], -1).transpose(0, 1)
            )[:, 0]
            torch.testing.assert_close(p + b_part, acts[f"blocks.{layer}.hook_resid_mid"][0], rtol=0, atol=1e-12)
        else:
            torch.testing.assert_close(p + b_o, acts[f"blocks.{layer}.hook_resid_mid"][0], rtol=0, atol=1e-12)
        # ALTI's resultant (pieces + bias terms) is the real resid_mid, sandwich norm included.
        _, whole = alti_pieces(model, acts, layer)
        torch.testing.assert_close(whole, acts[f"blocks.{layer}.hook_resid_mid"][0], rtol=0, atol=1e-12)


@needs_hooked  # a BERT Bridge's ln1/resid_mid hooks do not sit where HookedEncoder's do
def test_encoder_ln_pieces_sum_to_the_normalized_residual():
    from tl_tensorlens.methods.attention import norm_linear_part

    model = encoder_model()
    acts = _cache(model)
    for layer in range(model.cfg.n_layers):
        ln1 = model.blocks[layer].ln1
        pieces = norm_linear_part(model, acts, f"blocks.{layer}.ln1", _res_pieces(model, acts, layer))
        b_o = model.blocks[layer].attn.b_O.detach()
        n = TOKENS.shape[1]
        b_part = norm_linear_part(model, acts, f"blocks.{layer}.ln1", b_o.expand(n, 1, -1).clone())[:, 0]
        expected = ln1(acts[f"blocks.{layer}.hook_resid_mid"])[0]
        torch.testing.assert_close(pieces.sum(1) + b_part + ln1.b, expected, rtol=0, atol=1e-10)


@needs_hooked  # as above
def test_alti_resultant_is_the_real_ln1_output_on_the_encoder():
    model = encoder_model()
    acts = _cache(model)
    for layer in range(model.cfg.n_layers):
        _, whole = alti_pieces(model, acts, layer)
        expected = model.blocks[layer].ln1(acts[f"blocks.{layer}.hook_resid_mid"])[0]
        torch.testing.assert_close(whole, expected, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------------
# Every family
# --------------------------------------------------------------------------------------------
def _check_map(r, n, causal):
    assert r.shape == (n, n)
    assert torch.isfinite(r).all() and (r >= -1e-12).all()
    torch.testing.assert_close(r.sum(-1), torch.ones(n, dtype=r.dtype), rtol=0, atol=1e-9)
    if causal:
        assert torch.all(torch.triu(r, 1).abs() < 1e-12)


@pytest.mark.parametrize("backend, family", family_params())
def test_every_baseline_runs_on_every_decoder_family(backend, family):
    model = decoder_model(backend, family)
    acts = _cache(model)
    if family.startswith("olmo2"):
        with pytest.raises(TensorLensError, match="Olmo2"):
            get_method("globenc_rollout")(model, acts)
        return
    for name in ALL_BASELINES:
        _check_map(get_method(name)(model, acts), TOKENS.shape[1], causal=True)


def test_every_baseline_runs_on_the_encoder(encoder):
    model = encoder()
    acts = _cache(model)
    for name in ALL_BASELINES:
        _check_map(get_method(name)(model, acts), TOKENS.shape[1], causal=False)


@pytest.mark.slow
@pytest.mark.parametrize("family", BRIDGE_FAMILIES)
def test_every_baseline_runs_on_bridges(family):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = bridge_model(family)
        acts = _cache(model)
    for name in ALL_BASELINES:
        _check_map(get_method(name)(model, acts), TOKENS.shape[1], causal=family != "bert")


# --------------------------------------------------------------------------------------------
# Registry and tensor methods
# --------------------------------------------------------------------------------------------
def test_registry():
    names = list_methods()
    assert set(ALL_BASELINES) | set(TENSOR_METHODS) | {"random"} <= set(names)
    assert len(BASELINES) == 8

    def ones(model, state, *, position=None, target=None):
        return torch.ones(2, 2)

    register_method("ones_for_test", ones)
    try:
        assert get_method("ones_for_test") is ones
        with pytest.raises(TensorLensError, match="already registered"):
            register_method("ones_for_test", ones)
    finally:
        unregister_method("ones_for_test")
    with pytest.raises(TensorLensError, match="method='ones_for_test'.*registered method"):
        get_method("ones_for_test")


def test_random_method_is_seeded_by_the_input(decoder):
    model = decoder("gpt2")
    a, b = _cache(model), _cache(model, TOKENS.flip(-1))
    ra = get_method("random")(model, a)
    torch.testing.assert_close(ra, get_method("random")(model, a))
    assert not torch.allclose(ra, get_method("random")(model, b))


def test_tensor_methods_match_the_core_collapses(decoder):
    from tl_tensorlens import TensorLens, capture

    model = decoder("gpt2")
    state = capture(model, TOKENS)
    lens = TensorLens.from_state(model, state, output="ln_final")
    n = TOKENS.shape[1]
    torch.testing.assert_close(get_method("tensor_in_out")(model, state), lens.collapse("in_out"))
    row = get_method("tensor_norm")(model, state, position=n - 1)
    torch.testing.assert_close(row[n - 1], lens.collapse("norm", positions=[n - 1])[0])
    assert torch.isnan(row[: n - 1]).all()  # rows not asked for are NaN, never silently zero
    cls = get_method("tensor_in_class")(model, state, position=n - 1, target=7)
    torch.testing.assert_close(cls[n - 1], lens.collapse("in_class", token=7, positions=[n - 1])[0])
    u = torch.randn(model.cfg.d_model, **F64)
    by_dir = get_method("tensor_in_class")(model, state, position=n - 1, target=u)
    torch.testing.assert_close(by_dir[n - 1], lens.collapse("in_class", direction=u, positions=[n - 1])[0])
    with pytest.raises(TensorLensError, match="target"):
        get_method("tensor_in_class")(model, state, position=n - 1)


@pytest.mark.parametrize("backend, family", family_params(["neox_parallel_partial_rotary", "gpt2"]))
def test_parallel_blocks_follow_what_the_model_computes(backend, family):
    """``cfg.parallel_attn_mlp`` is True on both neox builds, but boot_native's NativeBlock ignores it
    and runs attention then MLP: the res+LN baseline must read ln2 there, as in any sequential block."""
    from tl_tensorlens._backend import runs_parallel_blocks
    from tl_tensorlens.methods.attention import _res_ln_norm_name

    model = decoder_model(backend, family)
    parallel = family.startswith("neox") and backend == "hooked"
    assert model.cfg.parallel_attn_mlp == family.startswith("neox")
    assert runs_parallel_blocks(model) is parallel
    # The model itself: in a parallel block ln2 (LayerNorm here) reads resid_pre, in a sequential one
    # resid_mid; ln2's normalized output times its scale is its centred input.
    acts = _cache(model)
    centred = acts["blocks.0.ln2.hook_normalized"] * acts["blocks.0.ln2.hook_scale"]
    for name, reads in (("blocks.0.hook_resid_pre", parallel), ("blocks.0.hook_resid_mid", not parallel)):
        if name in acts:
            x = acts[name]
            assert torch.allclose(centred, x - x.mean(-1, keepdim=True), atol=1e-10) is reads, name
    assert _res_ln_norm_name(model, 0) == (None if parallel else "blocks.0.ln2")
