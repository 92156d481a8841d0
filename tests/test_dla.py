"""Per-component direct logit attribution (methods/dla.py): exact sums, the token split against the
lens' In+Class collapse, and agreement with TL 4.3's direct_logit_attribution where both define
the same quantity (a compatibility-mode bridge)."""

import importlib.util

import pytest
import torch

from tests.models import HAS_HOOKED, TOKENS, bridge_model, hooked_model
from tl_tensorlens import TensorLens
from tl_tensorlens.errors import ArgumentError, UnsupportedModelError
from tl_tensorlens.methods.dla import component_attribution, format_attribution

HAS_TL_DLA = importlib.util.find_spec("transformer_lens.tools.analysis.direct_logit_attribution") is not None


def _model(kind: str):
    if kind.startswith("hooked:"):
        if not HAS_HOOKED:
            pytest.skip("HookedTransformer needs TransformerLens 3.x")
        return hooked_model(kind.removeprefix("hooked:"))
    return bridge_model(kind)


@pytest.mark.parametrize("kind", ["gpt2", "llama_gqa", "neox", "hooked:gpt2", "hooked:gptj", "hooked:gemma1"])
@pytest.mark.parametrize("incorrect", [None, 11])
def test_sums_exactly_and_token_split_is_the_in_class_collapse(kind, incorrect):
    model = _model(kind)
    pos = 6
    dla = component_attribution(model, TOKENS[0], answer=7, incorrect=incorrect, position=pos)
    lens = TensorLens.from_model(model, TOKENS[0], output="logits", verify=False)
    logits = lens.model_output()[pos]
    readout = logits[7] - (logits[11] if incorrect is not None else 0)
    assert dla.readout == pytest.approx(float(readout), abs=1e-6)  # RMS models compute their norm in float32
    assert float(dla.values.sum()) == pytest.approx(dla.readout, abs=1e-12)
    torch.testing.assert_close(dla.by_token.sum(-1) + dla.token_bias, dla.values, rtol=0, atol=1e-12)
    u = torch.zeros(lens.d_out, dtype=torch.float64)
    u[7] = 1.0
    if incorrect is not None:
        u[incorrect] = -1.0
    row = lens.collapse("in_class", direction=u, positions=[pos])[0]
    torch.testing.assert_close(dla.by_token.sum(0), row, rtol=0, atol=1e-12)
    assert float(dla.token_bias.sum()) == pytest.approx(
        float(lens.collapse_bias("in_class", direction=u)[pos]), abs=1e-12
    )
    # causal: nothing comes from tokens after the read position; every head of every layer has a row
    assert dla.by_token[:, pos + 1 :].abs().max() == 0
    n_heads = model.cfg.n_heads
    assert sum(1 for label in dla.labels if "H" in label and "." not in label) == model.cfg.n_layers * n_heads
    assert "sum" in format_attribution(dla, top=3)


@pytest.mark.skipif(
    not HAS_TL_DLA,
    reason="this TransformerLens has no tools.analysis.direct_logit_attribution (TL 3.9 and 4.3 ship it)",
)
@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_matches_transformer_lens_direct_logit_attribution(family):
    """On a bridge in compatibility mode (TL's tool requires it) both compute g · comp_c with the
    frozen final-norm scale: TL's components are our grouped rows, its heads our head rows, and its
    total is the readout minus b_U."""
    from transformer_lens.tools.analysis.direct_logit_attribution import direct_logit_attribution

    from tests.test_tl4_bridges import compat

    model = compat(bridge_model(family))
    dla = component_attribution(model, TOKENS[0], answer=7, incorrect=11)
    tol = 1e-6 if family == "llama_gqa" else 1e-12  # TL reads the model's float32 RMSNorm scale
    for unit in ("component", "head"):
        ref = direct_logit_attribution(model, TOKENS, answer_tokens=7, incorrect_tokens=11, unit=unit)
        values = ref.attribution.reshape(len(ref.labels), -1)[:, 0].to(torch.float64)
        labels, ours = dla.grouped(unit)
        idx = [ref.labels.index(label) for label in labels]
        torch.testing.assert_close(values[idx], ours, rtol=0, atol=tol)
        if unit == "component":
            assert labels == ref.labels
            b_u = model.b_U[7] - model.b_U[11]
            assert float(values.sum()) == pytest.approx(dla.readout - float(b_u), abs=tol)


def test_refusals():
    model = bridge_model("gpt2")
    with pytest.raises(ArgumentError, match="answer"):
        component_attribution(model, TOKENS[0], answer=10_000)
    with pytest.raises(ArgumentError, match="incorrect"):
        component_attribution(model, TOKENS[0], answer=3, incorrect=3)
    with pytest.raises(ArgumentError, match="position"):
        component_attribution(model, TOKENS[0], answer=3, position=99)
    with pytest.raises(UnsupportedModelError, match="post-norm|decoder"):
        component_attribution(bridge_model("gemma2"), TOKENS[0], answer=3)
    with pytest.raises(UnsupportedModelError, match="decoder"):
        component_attribution(bridge_model("bert"), TOKENS[0], answer=3)
