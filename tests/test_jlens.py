"""The frozen per-prompt transport (methods/jlens.py) against its definition and TL 4.3's JacobianLens."""

import importlib.util
import warnings

import pytest
import torch

from tests.models import TOKENS, bridge_model
from tl_tensorlens import TensorLens, capture
from tl_tensorlens.errors import ArgumentError
from tl_tensorlens.methods.jlens import compare_jlens, lens_readout, transport_matrix
from tl_tensorlens.replay import live

HAS_JLENS = importlib.util.find_spec("transformer_lens.tools.analysis.jacobian_lens") is not None
SKIP = 2


def _definition(T: torch.Tensor, valid: list[int]) -> torch.Tensor:
    """mean_{t in V} sum_{t' in V, t' >= t} T[t', :, t, :] from the materialized tensor."""
    rows = [sum(T[tp, :, t, :] for tp in valid if tp >= t) for t in valid]
    return torch.stack(rows).mean(0)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_transport_matrix_is_its_definition(family):
    model = bridge_model(family)
    state = capture(model, TOKENS[0])
    n, L = state.n_pos, state.n_layers
    valid = list(range(SKIP, n - 1))
    T = TensorLens.from_state(model, state, layers=(1, L), output="resid_post").full()
    M = transport_matrix(model, state, 0, skip_first_positions=SKIP, chunk=7)
    torch.testing.assert_close(M, _definition(T, valid), rtol=0, atol=1e-12)
    # the true Jacobian of the live model, from autograd of the whole map
    h = state.resid_pre(1)
    J = torch.autograd.functional.jacobian(lambda x: live(model, state, x[None], layers=(1, L))[0], h)
    M_true = transport_matrix(model, state, 0, skip_first_positions=SKIP, jacobian="true")
    torch.testing.assert_close(M_true, _definition(J, valid), rtol=0, atol=1e-6 if family == "llama_gqa" else 1e-12)
    # frozen and true Jacobians differ: the true one also differentiates the norm scales and routing
    assert (M - M_true).norm() / M_true.norm() > 1e-3
    # the readout of the final block's own output is the model's logits
    torch.testing.assert_close(
        lens_readout(model, state.block_output(L - 1)),
        state.logits[0],
        rtol=0,
        atol=1e-5,
    )


def test_bad_arguments():
    model = bridge_model("gpt2")
    state = capture(model, TOKENS[0])
    with pytest.raises(ArgumentError, match="layer"):
        transport_matrix(model, state, state.n_layers - 1)
    with pytest.raises(ArgumentError, match="skip_first_positions"):
        transport_matrix(model, state, 0, skip_first_positions=state.n_pos)


@pytest.mark.skipif(
    not HAS_JLENS, reason="this TransformerLens has no tools.analysis.jacobian_lens (TL 3.9 and 4.3 ship it)"
)
def test_against_transformer_lens_jacobian_lens():
    """Fit TL's J-lens on the induction subject's prompts; our true-Jacobian estimator reproduces it,
    the frozen summary differs from it, and the exact transport reproduces the model."""
    from transformer_lens.tools.analysis.jacobian_lens import JacobianLens

    from tl_tensorlens.subjects import load_subject

    model = load_subject("induction", backend="bridge", dtype=torch.float32).model
    prompts = [
        "<bos> t83 t94 t12 t35 t43 t80 t27 t83 t94 t12 t35 t43 t80",
        "<bos> t1 t2 t3 t4 t5 t6 t7 t1 t2 t3 t4 t5",
        "<bos> t50 t61 t72 t13 t24 t35 t50 t61 t72 t13",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = JacobianLens.fit(model, prompts, corpus="test", skip_first_positions=SKIP, show_progress=False)
    rows = compare_jlens(model, prompts, fitted, skip_first_positions=SKIP, with_true=True)
    assert [r.layer for r in rows] == fitted.source_layers
    for r in rows:
        assert r.true_rel_diff is not None and r.true_rel_diff < 1e-5
        assert r.matrix_rel_diff > 1e-3
        assert r.top1_exact == 1.0 and r.exact_max_logit_error < 1e-3
        assert 0 < r.other_positions_share < 1
