"""The tensor logit lens is exact: its rows plus bias are TransformerLens' own logit lens."""

import pytest
import torch

from tests.methods.test_patching import ARCHS, DECODERS, _model
from tests.models import ENCODER_BACKENDS, TOKENS, any_encoder
from tl_tensorlens import ArgumentError, TensorLens, capture
from tl_tensorlens.methods.logit_lens import tensor_logit_lens


@pytest.mark.parametrize("name", ARCHS)
def test_tensor_logit_lens_exact(name):
    model = _model(name)
    state = capture(model, TOKENS)
    ll = tensor_logit_lens(model, state)
    L = state.n_layers
    assert ll.depths == tuple(range(L + 1))
    # rows + bias = TransformerLens' own logit lens (accumulated_resid with apply_ln, then unembed)
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
        tl = model.unembed(cache.accumulated_resid(apply_ln=True)[:, 0])
    ref = tl.gather(-1, ll.target[..., None])[..., 0]
    assert float((ll.logits - ref).abs().max()) <= 1e-10
    assert ll.max_error <= 1e-10
    assert torch.equal(ll.tl_top, tl.argmax(-1))
    # last layer = the logit collapse of the full lens through ln_final
    full = TensorLens.from_state(model, state, output="ln_final")
    target = ll.target[-1]
    assert float((ll.maps[-1] - full.collapse("in_class", token=target)).abs().max()) <= 1e-10
    assert float((ll.bias[-1] - full.collapse_bias("in_class", token=target)).abs().max()) <= 1e-10
    # no block applied: the identity, so only the diagonal is non-zero
    assert torch.equal(ll.maps[0], torch.diag_embed(torch.diagonal(ll.maps[0])))


@pytest.mark.parametrize("name", DECODERS)
def test_tensor_logit_lens_options_and_errors(name):
    model = _model(name)
    state = capture(model, TOKENS)
    ll = tensor_logit_lens(model, state, token=7, depths=[1, 2], positions=[-1, 3])
    assert ll.maps.shape == (2, 2, TOKENS.shape[1])
    assert ll.positions == (TOKENS.shape[1] - 1, 3)
    assert bool((ll.target == 7).all())
    assert ll.max_error <= 1e-10
    assert ll.row(-1).shape == (2, TOKENS.shape[1])
    assert "TensorLogitLens" in repr(ll)
    with pytest.raises(ArgumentError, match="computed positions"):
        ll.row(0)
    with pytest.raises(ArgumentError, match="depths=5"):
        tensor_logit_lens(model, state, depths=[5])
    with pytest.raises(ArgumentError, match="positions=99"):
        tensor_logit_lens(model, state, positions=[99])
    with pytest.raises(ArgumentError, match="decoder"):
        tensor_logit_lens(any_encoder(ENCODER_BACKENDS[0]), TOKENS)
