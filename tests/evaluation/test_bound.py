"""Prop. 1: the measured error of the tensor at x0 on x0 + ε never exceeds the derived bound."""

import warnings

import pytest
import torch

from tests.models import HAS_HOOKED, TOKENS, bridge_model, encoder_model, hooked_model
from tl_tensorlens import ArgumentError, UnsupportedModelError, capture
from tl_tensorlens.evaluation.bound import (
    ACTIVATION_SLOPE_BOUND,
    ApproximationReport,
    approximation_bound,
    approximation_error,
    check_bound_supported,
)

needs_hooked = pytest.mark.skipif(not HAS_HOOKED, reason="HookedTransformer/HookedEncoder exist only on TL 3.x")

#: The families the brief names, plus the other HookedTransformer features the bound claims to cover.
FAMILIES = (
    "gpt2",
    "neox_parallel_partial_rotary",
    "llama_gqa",
    "gemma2_softcaps_sandwich",
    "olmo2_post_norm",
    "attn_only_ln",
    "attn_only_none",
    "gemma3_qk_norm",
    "mistral_sliding_window",
    "bloom_alibi",
    "shortformer",
    "attention_sinks",
    "three_layers_gqa_bias",
    "norm_rmspre",
    "relu",
    "attn_result_split_qkv",
)
SCALES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
OUTPUTS = ("resid_post", "ln_final", "logits")


def _encoder():
    """A BERT HookedEncoder with every parameter drawn here.

    ``HookedEncoder(cfg)`` leaves some parameters (``mlm_head.W``, ``unembed.W_U``, norm gains) as
    ``torch.empty``: zeros on a clean heap, arbitrary finite garbage (1e300 was seen) on a reused one,
    which ``tests.models._init_finite`` cannot tell from real values. A zero gain makes the output
    constant, so every parameter is re-drawn from a fixed seed.
    """
    model = encoder_model()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if p.ndim == 1 and name.endswith(".w"):
                p.copy_((1 + 0.2 * z).to(p.dtype))
            elif p.ndim == 1:
                p.copy_((0.1 * z).to(p.dtype))
            else:
                p.copy_((0.8 / p.shape[-2] ** 0.5 * z).to(p.dtype))
    return model


def _model(name):
    return _encoder() if name == "bert" else hooked_model(name)


def _check(report: ApproximationReport) -> None:
    assert torch.isfinite(report.error).all()
    bad = (report.error > report.bound + report.rounding).nonzero()
    assert bad.numel() == 0, f"error above bound at (row, token) {bad.tolist()}: {report.table()}"
    assert (report.measured_change <= report.model_change + report.rounding).all()
    assert (report.measured_linear <= report.linear_part + report.rounding).all()
    assert report.holds


@needs_hooked
@pytest.mark.parametrize("name", FAMILIES + ("bert",))
@pytest.mark.parametrize("output", OUTPUTS)
def test_error_within_bound_random_eps(name, output):
    report = approximation_error(_model(name), TOKENS, scales=SCALES, n_random=3, seed=1, output=output)
    assert report.error.shape == (len(SCALES) * 3, TOKENS.shape[1])
    assert report.error.max() > 0
    _check(report)
    assert report.constant > 0 and torch.isfinite(torch.tensor(report.constant))
    if name != "attn_only_none":
        assert report.sigma_min, "the data-dependent norm terms are reported"


@needs_hooked
@pytest.mark.parametrize("name", ("gpt2", "llama_gqa", "gemma2_softcaps_sandwich", "olmo2_post_norm", "bert"))
def test_error_within_bound_adversarial_eps(name):
    """ε that cancels the input (LN scales collapse to sqrt(eps)), hits one token hard, or is huge."""
    model = _model(name)
    state = capture(model, TOKENS)
    x0 = state.x0
    one_token = torch.zeros_like(x0)
    one_token[3] = 5 * x0[3].norm() * torch.linspace(-1, 1, x0.shape[1], dtype=x0.dtype)
    eps = torch.stack([-x0, -0.999 * x0, one_token, 100 * x0, 1e-7 * x0])
    for output in OUTPUTS:
        _check(approximation_error(model, state, eps=eps, output=output))


@needs_hooked
@pytest.mark.parametrize("name", ("gpt2", "neox_parallel_partial_rotary", "llama_gqa", "olmo2_post_norm", "bert"))
def test_error_vanishes_with_eps(name):
    """First order: shrinking ε 100x shrinks the error ~100x (T(x0) is not the Jacobian of F, so not 1e4x)."""
    report = approximation_error(_model(name), TOKENS, scales=(1e-2, 1e-4, 1e-6), n_random=2, seed=2)
    err = report.error_max.reshape(3, 2)
    assert (err[1] < 0.05 * err[0]).all() and (err[2] < 0.05 * err[1]).all(), err
    assert (err[1] > 1e-4 * err[0]).all(), "the error is first order in ε, not second"
    # The bound is first order too: bound / radius -> report.constant as the radius -> 0 (from above,
    # up to its caps, which only bind at large radii).
    model = _model(name)
    state = capture(model, TOKENS)
    radius = float(state.x0.norm(dim=-1).mean())
    ratios = []
    for r in (1e-8 * radius, 1e-10 * radius, 1e-12 * radius):
        live, lin = approximation_bound(model, state, torch.full((1, state.n_pos), r, dtype=torch.float64))
        ratios.append(float((live + lin).amax()) / r)
    assert ratios[0] >= ratios[1] * (1 - 1e-9) >= ratios[2] * (1 - 1e-6)
    assert ratios[2] == pytest.approx(report.constant, rel=1e-3)


@needs_hooked
def test_bound_float32_model():
    report = approximation_error(hooked_model("gpt2", dtype=torch.float32), TOKENS, scales=(1e-2, 1.0), n_random=2)
    assert report.error.dtype == torch.float64
    _check(report)


@needs_hooked
def test_report_repr_table_and_shapes():
    model = hooked_model("gpt2")
    state = capture(model, TOKENS)
    report = approximation_error(model, state, eps=1e-3 * state.x0)
    assert report.error.shape == (1, TOKENS.shape[1])
    assert "holds=True" in repr(report)
    assert len(report.table().splitlines()) == 2
    assert torch.allclose(report.scales, torch.tensor([1e-3], dtype=torch.float64))
    assert (report.tightness >= 1).all()
    with pytest.raises(ArgumentError, match="eps=.*n_eps, pos, d_model"):
        approximation_error(model, state, eps=torch.zeros(3, 4))


@needs_hooked
@pytest.mark.parametrize("name, field", [("solu", "act_fn"), ("relu2", "act_fn")])
def test_refuses_uncovered_activations(name, field):
    model = hooked_model(name)
    with pytest.raises(UnsupportedModelError) as info:
        approximation_error(model, TOKENS)
    assert field in info.value.fields


def test_refuses_bridge():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = bridge_model("gpt2")
    with pytest.raises(UnsupportedModelError) as info:
        check_bound_supported(model)
    assert "backend" in info.value.fields
    assert "TransformerBridge" in str(info.value)


def test_slope_bounds_hold():
    """The tabulated sup|act'| are upper bounds (checked on a grid finer than the one that made them)."""
    import torch.nn.functional as F

    x = torch.linspace(-40, 40, 800_001, dtype=torch.float64, requires_grad=True)
    acts = {
        "gelu": F.gelu,
        "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "silu": F.silu,
        "relu": F.relu,
        "tanh": torch.tanh,
        "mish": F.mish,
    }
    for name, f in acts.items():
        (g,) = torch.autograd.grad(f(x).sum(), x)
        assert float(g.abs().max()) <= ACTIVATION_SLOPE_BOUND[name], name
