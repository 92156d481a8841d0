"""Relation operators (methods.relations): the mean tensor (Eq. 26), the LRE baseline, read_model."""

from typing import cast

import pytest
import torch

from tl_tensorlens._backend import has_hooked_transformer
from tl_tensorlens.errors import ArgumentError, TensorLensError
from tl_tensorlens.methods.relations import (
    LinearRelationEmbedding,
    LinearRelationJVP,
    MeanTensor,
    MeanTensorReplay,
    lre_example,
    read_model,
    unembed,
)

needs_hooked = pytest.mark.skipif(not has_hooked_transformer(), reason="HookedTransformer needs TransformerLens < 4")


def tiny_model(decoder, seed: int = 0, d_vocab: int = 50):
    """A tiny LN decoder from the ``decoder`` fixture (HookedTransformer on TL 3.x, boot_native on both)."""
    return decoder(None, d_vocab=d_vocab, n_ctx=32, normalization_type="LN", seed=seed)


# --------------------------------------------------------------------------- operators
def test_lre_recovers_linear_toy_map():
    torch.manual_seed(0)
    A = torch.randn(5, 4, dtype=torch.float64)
    c = torch.randn(5, dtype=torch.float64)
    states = torch.randn(6, 4, dtype=torch.float64)
    lre = LinearRelationEmbedding.from_function(lambda s: A @ s + c, states)
    torch.testing.assert_close(lre.weight, A, rtol=0, atol=1e-12)
    torch.testing.assert_close(lre.bias, c, rtol=0, atol=1e-12)
    s_new = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(lre.apply(s_new), s_new @ A.T + c)
    torch.testing.assert_close(lre.with_beta(2.0).apply(s_new), 2.0 * s_new @ A.T + c)


def test_lre_on_attention_free_linear_model_recovers_map(decoder):
    """A model that is linear in the subject state: LRE's W must equal that linear map exactly."""
    model = decoder(
        None,
        n_layers=1,
        d_model=8,
        n_heads=2,
        d_head=4,
        d_vocab=13,
        n_ctx=8,
        attn_only=True,
        normalization_type=None,
        seed=1,
    )
    tokens = torch.tensor([[1, 2, 3, 4], [2, 5, 3, 1]])
    # With W_O = 0 the attention adds the constant b_O and there is no norm, so at the last
    # position (the subject's) F(s) = s + b_O: W = I, b = b_O.
    with torch.no_grad():
        model.blocks[0].attn.W_O.zero_()
    lre = LinearRelationEmbedding.fit(model, tokens, 3, layer=0)
    torch.testing.assert_close(lre.weight, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(lre.bias, model.blocks[0].attn.b_O.detach(), rtol=0, atol=1e-12)


def test_lre_example_matches_finite_differences(decoder):
    model = tiny_model(decoder)
    tokens = torch.tensor([[3, 7, 1, 9, 4, 2]])
    W, b, s = lre_example(model, tokens, 3, layer=1)

    def f(h):
        def feed(act, hook):
            act = act.clone()
            act[:, 3] = h
            return act

        seen = {}

        def grab(act, hook):
            seen["resid"] = act

        last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"  # (the Bridge has no stop_at_layer)
        with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", feed), (last, grab)]):
            model(tokens)
        return model.ln_final(seen["resid"])[0, -1]

    torch.testing.assert_close(W, torch.autograd.functional.jacobian(f, s), rtol=0, atol=1e-10)
    torch.testing.assert_close(W @ s + b, f(s).detach(), rtol=0, atol=1e-12)


def test_mean_tensor_single_example_reproduces_model_output(decoder):
    model = tiny_model(decoder)
    tokens = torch.tensor([[5, 11, 3, 8, 2, 30, 7]])
    mean = MeanTensor.fit(model, tokens)
    read = read_model(model, tokens, subject_pos=4)
    y = mean.apply(read.x0)
    torch.testing.assert_close(y, read.final, rtol=0, atol=1e-10)
    with torch.no_grad():
        logits = model(tokens)[:, -1]
    torch.testing.assert_close(unembed(model, y), logits, rtol=0, atol=1e-10)
    assert "MeanTensor(d_out=32, pos=7, d_model=32, n_examples=1" in repr(mean)


def test_mean_tensor_identical_examples_and_linearity(decoder):
    model = tiny_model(decoder)
    one = torch.tensor([[5, 11, 3, 8, 2]])
    single = MeanTensor.fit(model, one)
    triple = MeanTensor.fit(model, one.repeat(3, 1))
    assert triple.n_examples == 3
    torch.testing.assert_close(triple.weight, single.weight, rtol=0, atol=1e-12)
    torch.testing.assert_close(triple.bias, single.bias, rtol=0, atol=1e-12)
    # The mean of two different prompts is the mean of their own operators.
    two = torch.tensor([[5, 11, 3, 8, 2], [9, 1, 3, 4, 2]])
    pair = MeanTensor.fit(model, two)
    other = MeanTensor.fit(model, two[1:])
    torch.testing.assert_close(pair.weight, (single.weight + other.weight) / 2, rtol=0, atol=1e-12)
    with pytest.raises(Exception, match="not aligned"):
        pair.apply(torch.zeros(4, 32, dtype=torch.float64))


def test_read_model_matches_cache(decoder):
    model = tiny_model(decoder)
    tokens = torch.tensor([[5, 11, 3, 8, 2], [9, 1, 3, 4, 2], [1, 2, 3, 4, 5]])
    read = read_model(model, tokens, 2, layers=(0, 1), batch_size=2)
    out, cache = model.run_with_cache(tokens)
    logits = cast(torch.Tensor, out)
    torch.testing.assert_close(read.logits, logits[:, -1], rtol=0, atol=1e-12)
    torch.testing.assert_close(read.x0, cache["blocks.0.hook_resid_pre"], rtol=0, atol=0)
    # Batch size 2 vs 3 changes float reduction order: equal to rounding, not bitwise.
    torch.testing.assert_close(read.subject[1], cache["blocks.1.hook_resid_pre"][:, 2], rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["gpt2", "neox"])
def test_bridge_mean_tensor_and_lre_reproduce_model(family):
    """On a TransformerBridge (TL 3.9 and 4.x) both operators reproduce a single example's output."""
    from tests.models import TOKENS, bridge_model

    model = bridge_model(family)
    tokens = TOKENS[:, :7]
    read = read_model(model, tokens, 3, layers=(0, 1))
    with torch.no_grad():
        logits = cast(torch.Tensor, model(tokens))[:, -1]
    torch.testing.assert_close(read.logits, logits, rtol=0, atol=1e-10)
    mean = MeanTensor.fit(model, tokens)
    torch.testing.assert_close(unembed(model, mean.apply(read.x0)), logits, rtol=0, atol=1e-10)
    lre = LinearRelationEmbedding.fit(model, tokens, 3, layer=1)
    torch.testing.assert_close(unembed(model, lre.apply(read.subject[1])), logits, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- the replay / JVP routes
TRAIN = torch.tensor([[5, 11, 3, 8, 2, 30, 7], [9, 1, 3, 4, 2, 17, 7], [1, 2, 3, 4, 5, 6, 7]])
TEST = torch.tensor([[4, 12, 3, 9, 2, 21, 7], [8, 8, 3, 1, 2, 40, 7], [2, 2, 2, 2, 2, 2, 2], [33, 1, 3, 5, 2, 9, 7]])


@pytest.mark.parametrize("family", [None, "llama_gqa"])
def test_mean_tensor_replay_equals_dense_mean_tensor(decoder, family):
    """Applying the mean tensor by n frozen replays is T̄ x + c̄ (and T̄ x) of the dense operator."""
    model = decoder(family, d_vocab=50, n_ctx=32, seed=3)
    lazy = MeanTensorReplay.fit(model, TRAIN, batch_size=3)  # 4 test inputs: two replay batches
    dense = MeanTensor.fit(model, TRAIN)
    x = read_model(model, TEST, 3).x0
    scale = dense.apply(x).abs().max()
    torch.testing.assert_close(lazy.apply(x), dense.apply(x), rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(lazy.apply(x, bias=False), dense.apply(x, bias=False), rtol=0, atol=1e-12 * scale)
    back = lazy.materialize()
    torch.testing.assert_close(back.weight, dense.weight, rtol=0, atol=1e-13 * dense.weight.abs().max())
    torch.testing.assert_close(back.bias, dense.bias, rtol=0, atol=1e-13 * scale)
    torch.testing.assert_close(lazy.bias, dense.bias, rtol=0, atol=1e-13 * scale)
    # leading batch axes are kept; a training prompt fed to itself reproduces the mean of outputs there
    assert lazy.apply(x.reshape(2, 2, *x.shape[1:])).shape == (2, 2, x.shape[-1])
    assert lazy.n_examples == 3 and "MeanTensorReplay(pos=7" in repr(lazy)
    with pytest.raises(TensorLensError, match="not aligned"):
        lazy.apply(x[:, :5])
    with pytest.raises(ArgumentError, match="tokens"):
        MeanTensorReplay.fit(model, TRAIN[:0])


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("family", [None, "llama_gqa"])
def test_lre_jvp_equals_dense_lre(decoder, family, layer):
    """The JVP route applies β W̄ s + b̄ of the dense LRE (Jacobians of the real model) without building W̄."""
    model = decoder(family, d_vocab=50, n_ctx=32, seed=4)
    # The LRE differentiates the real model: a Bridge's RMSNorm computes in float32 inside a float64
    # model, so forward- and reverse-mode derivatives agree to float32 rounding there.
    tol = 1e-6 if family is not None and decoder.backend != "hooked" else 1e-12
    lazy = LinearRelationJVP.fit(model, TRAIN, 3, layer=layer, batch_size=3)
    dense = LinearRelationEmbedding.fit(model, TRAIN, 3, layer=layer)
    s = read_model(model, TEST, 3, layers=(layer,)).subject[layer]
    torch.testing.assert_close(lazy.bias, dense.bias, rtol=0, atol=tol * dense.bias.abs().max())
    ws = lazy.weight_apply(s)
    torch.testing.assert_close(ws, s @ dense.weight.T, rtol=0, atol=tol * ws.abs().max())
    for beta in (1.0, 2.25):
        want = dense.with_beta(beta).apply(s)
        torch.testing.assert_close(lazy.with_beta(beta).apply(s), want, rtol=0, atol=tol * want.abs().max())
        torch.testing.assert_close(lazy.with_beta(beta).apply(s, weight=ws), want, rtol=0, atol=tol * want.abs().max())
    # at a training prompt's own subject state and β = 1 the LRE of one example is the model there
    one = LinearRelationJVP.fit(model, TRAIN[:1], 3, layer=layer)
    read = read_model(model, TRAIN[:1], 3, layers=(layer,))
    torch.testing.assert_close(one.apply(read.subject[layer]), read.final, rtol=0, atol=tol * read.final.abs().max())
    with pytest.raises(ArgumentError, match="subject_pos"):
        LinearRelationJVP.fit(model, TRAIN, [3, 3], layer=layer)
