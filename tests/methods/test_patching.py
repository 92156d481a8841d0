"""Patching on the linearized model and frozen-component patching are exact."""

import warnings

import pytest
import torch

from tests.models import DECODER_BACKENDS, TOKENS, bridge_model, hooked_model, native_model, on_hooked
from tl_tensorlens import ArgumentError, TensorLens, TensorLensError, capture, linearized
from tl_tensorlens.methods.patching import (
    COMPONENTS,
    LogitDiff,
    component_of,
    corrupted_input,
    frozen_class_counts,
    frozen_component_patching,
    linearized_patching,
    mix_frozen,
    predict_patching,
)

CORRUPTED = TOKENS.clone()
CORRUPTED[0, 1:5] = torch.tensor([9, 10, 11, 12])

_MODELS: dict[str, object] = {}


def _model(name: str):
    if name not in _MODELS:
        backend, family = name.split(":")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build = {"hooked": hooked_model, "native": native_model, "bridge": bridge_model}[backend]
            _MODELS[name] = build(family)
    return _MODELS[name]


#: "hooked:" exists on TL 3.x only (generated only there), "native:" is boot_native, "bridge:" an HF bridge.
# (native:llama_gqa is left out: boot_native RMSNorm computes in float32, so TL's own logit lens there is
# float32-accurate, 1.3e-7 off the exact rows)
ARCHS = [*on_hooked("hooked:gpt2", "hooked:llama_gqa"), "native:gpt2", "native:gptj", "bridge:gpt2", "bridge:neox"]
DECODERS = [f"{b}:gpt2" for b in DECODER_BACKENDS]


def _manual_resid_patch(model, state, layer, pos):
    """Float64 reference: patch one resid_pre entry by hand inside the linearized context."""
    clean = state.activations[f"blocks.{layer}.hook_resid_pre"]

    def hook(act, hook):
        act = act.clone()
        act[:, pos] = clean[:, pos]
        return act

    with torch.no_grad(), linearized(model, state):
        return model.run_with_hooks(CORRUPTED, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", hook)])


def _manual_head_patch(model, state, layer, head):
    clean = state.activations[f"blocks.{layer}.attn.hook_z"]

    def hook(z, hook):
        z = z.clone()
        z[:, :, head] = clean[:, :, head]
        return z

    with torch.no_grad(), linearized(model, state):
        return model.run_with_hooks(CORRUPTED, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook)])


@pytest.mark.parametrize("name", [*DECODERS, "bridge:gpt2"])
def test_transformer_lens_patching_matches_tensor_prediction(name):
    model = _model(name)
    state = capture(model, TOKENS)
    metric = LogitDiff(position=-1, good=3, bad=4)
    for kind in ("resid_pre", "head_all_pos"):
        tl = linearized_patching(model, state, CORRUPTED, metric, kind=kind)
        pred = predict_patching(model, state, CORRUPTED, metric, kind=kind)
        assert tl.shape == pred.values.shape
        # transformer_lens.patching stores its results in float32: agreement to float32 rounding
        scale = float(pred.values.abs().max()) + 1.0
        assert float((tl.double() - pred.values).abs().max()) <= 8 * torch.finfo(torch.float32).eps * scale
    # float64 references, patched by hand in the same linearized model: exact
    pred = predict_patching(model, state, CORRUPTED, metric, kind="resid_pre")
    for layer, pos in ((0, 2), (1, 4), (1, 9)):
        assert (
            abs(float(metric(_manual_resid_patch(model, state, layer, pos))) - float(pred.values[layer, pos])) <= 1e-10
        )
    heads = predict_patching(model, state, CORRUPTED, metric, kind="head_all_pos")
    for layer, head in ((0, 1), (1, 3)):
        assert (
            abs(float(metric(_manual_head_patch(model, state, layer, head))) - float(heads.values[layer, head]))
            <= 1e-10
        )
    # the unpatched corrupted run of the linearized model, and the clean logits
    with torch.no_grad(), linearized(model, state):
        corr = model(CORRUPTED)
    assert abs(float(metric(corr)) - pred.corrupted) <= 1e-10
    assert abs(float(metric(state.logits)) - pred.clean) <= 1e-10


@pytest.mark.parametrize("name", DECODERS)
def test_patching_bad_inputs(name):
    model = _model(name)
    state = capture(model, TOKENS)
    with pytest.raises(ArgumentError, match="same length"):
        linearized_patching(model, state, CORRUPTED[:, :5], LogitDiff(-1, 1))
    # a bad kind is refused by the library (or, under pytest, already by the runtime type checker)
    with pytest.raises((ArgumentError, TypeError)):
        linearized_patching(model, state, CORRUPTED, LogitDiff(-1, 1), kind="nope")  # type: ignore[arg-type]
    with pytest.raises((ArgumentError, TypeError)):
        predict_patching(model, state, CORRUPTED, LogitDiff(-1, 1), kind="nope")  # type: ignore[arg-type]
    assert corrupted_input(model, state, CORRUPTED).shape == state.x0.shape


@pytest.mark.parametrize("name", [*on_hooked("hooked:llama_gqa"), "native:llama_gqa", "bridge:gpt2"])
def test_mix_frozen_reproduces_clean_and_corrupted_tensors(name):
    model = _model(name)
    clean, corr = capture(model, TOKENS), capture(model, CORRUPTED)
    counts = frozen_class_counts(clean)
    assert counts["attention"] == clean.n_layers and counts["norm"] > 0 and counts["mlp"] == clean.n_layers

    def T(state):
        return TensorLens.from_state(model, state, output="ln_final").slice(-1)

    t_clean, t_corr = T(clean), T(corr)
    assert float((t_clean - t_corr).abs().max()) > 1e-3  # the prompts really differ
    assert torch.equal(T(mix_frozen(clean, corr, ())), t_clean)
    # every frozen value belongs to a class: taking all classes gives the corrupted tensor exactly
    assert torch.equal(T(mix_frozen(clean, corr, COMPONENTS)), t_corr)
    assert torch.equal(T(mix_frozen(corr, clean, COMPONENTS)), t_clean)
    # one class only changes that class's values
    mixed = mix_frozen(clean, corr, ("attention",), blocks=[1])
    for k, v in mixed.frozen.items():
        expect = corr.frozen[k] if k == "blocks.1.attn.hook_pattern" else clean.frozen[k]
        assert v is expect, k


@pytest.mark.parametrize("name", DECODERS)
def test_frozen_component_patching_rows(name):
    model = _model(name)
    metric = LogitDiff(position=-1, good=3)
    res = frozen_component_patching(model, TOKENS, CORRUPTED, metric)
    clean, corr = capture(model, TOKENS), capture(model, CORRUPTED)
    assert res.labels[0] == "clean" and res.labels[-1] == "corrupted prompt"
    assert abs(float(res.metric[0]) - float(metric(clean.logits))) <= 1e-10
    assert abs(float(res.metric[-1]) - float(metric(corr.logits))) <= 1e-10
    # the logit collapse rows sum (with the bias) to the metric
    lens = TensorLens.from_state(model, clean, output="ln_final")
    assert abs(float(res.maps[0].sum() + lens.collapse_bias("in_class", token=3)[-1]) - float(res.metric[0])) <= 1e-10
    assert "| clean |" in res.table()
    with pytest.raises(TensorLensError, match="unknown component"):
        mix_frozen(clean, corr, ("routing",))
    with pytest.raises(TensorLensError, match="captures differ"):
        mix_frozen(clean, capture(model, TOKENS[:, :5]), ("attention",))
    with pytest.raises(TensorLensError, match="no known component"):
        component_of("blocks.0.attn.hook_q")


def test_frozen_component_patching_on_induction():
    """What it reveals on the trained induction model: the induction prediction is carried by
    layer-1 attention routing (and partly by norm scales), not by MLP gating."""
    from tl_tensorlens.subjects import induction_batch, load_subject

    model = load_subject("induction", dtype=torch.float64).model
    full = induction_batch(1, 17, seed=3).tokens
    clean = full[:, :-1]
    corrupted = clean.clone()
    corrupted[0, 1:9] = induction_batch(1, 17, seed=4).tokens[0, 1:9]
    metric = LogitDiff(position=-1, good=int(full[0, -1]))
    res = frozen_component_patching(model, clean, corrupted, metric)
    share = {
        lab: (float(v) - float(res.metric[0])) / (float(res.metric[-1]) - float(res.metric[0]))
        for lab, v in zip(res.labels, res.metric, strict=False)
    }
    assert float(res.metric[0]) > float(res.metric[-1]) + 5  # induction works on the clean prompt only
    assert share["corrupted attention"] > 0.3
    assert abs(share["corrupted mlp"]) < 0.1
    layer1 = frozen_component_patching(model, clean, corrupted, metric, variants=[("attention",)], blocks=[1])
    layer0 = frozen_component_patching(model, clean, corrupted, metric, variants=[("attention",)], blocks=[0])
    assert float(layer1.metric[0]) < float(layer0.metric[0])
