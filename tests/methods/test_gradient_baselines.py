"""Gradient baselines (Input×Gradient, Integrated Gradients, AttnLRP, CP-LRP) against independent
references: autograd Jacobians, an affine toy with hand-derived answers, the frozen tensor, captum, and
lxt's own rule code on Hugging Face models. All in float64.

Runs on TransformerLens 3.9 (HookedTransformer, HookedEncoder, TransformerBridge) and 4.3 (Bridge only).
"""

import importlib
import importlib.util
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.models import (
    HAS_HOOKED,
    HAS_NATIVE,
    NO_HOOKED,
    TOKENS,
    bridge_model,
    encoder_model,
    hf_model,
    hooked_model,
    hooked_model_cfg,
    native_model,
    on_hooked,
)
from tl_tensorlens import TensorLens, capture, live
from tl_tensorlens._backend import force_eager, is_post_ln
from tl_tensorlens.errors import TensorLensError, UnsupportedModelError
from tl_tensorlens.evaluation.perturbation import (
    ClassifierReadout,
    Example,
    NextTokenReadout,
    PerturbationConfig,
    run_perturbation,
)
from tl_tensorlens.methods import get_method, list_methods
from tl_tensorlens.methods.gradients import (
    GRADIENT_METHODS,
    CompletenessWarning,
    explained_scalar,
    input_x_gradient,
    integrated_gradients,
    lrp,
    quadrature,
    reference_input,
)

needs_hooked = pytest.mark.skipif(not HAS_HOOKED, reason=NO_HOOKED)

# Every backend the methods promise; "ht_*" / "encoder" exist on TL 3.x only.
HOOKED_SUBJECTS = ["ht_gpt2", "ht_llama_gqa", "encoder"]
BRIDGE_SUBJECTS = ["br_gpt2", "br_llama_gqa", "br_bert"]
# "nt_*": the same tiny decoders on TransformerBridge.boot_native (TL-shaped weights, both lines).
NATIVE_SUBJECTS = ["nt_gpt2", "nt_llama_gqa"] if HAS_NATIVE else []
SUBJECTS = on_hooked(*HOOKED_SUBJECTS) + BRIDGE_SUBJECTS + NATIVE_SUBJECTS

_CACHE: dict[str, Any] = {}


def _model(name: str) -> Any:
    if name not in _CACHE:
        if name == "encoder":
            _CACHE[name] = encoder_model()
        elif name.startswith("ht_"):
            _CACHE[name] = hooked_model(name[3:])
        elif name.startswith("nt_"):
            _CACHE[name] = native_model(name[3:])
        else:
            _CACHE[name] = bridge_model(name[3:])
    return _CACHE[name]


def _setup(name: str) -> tuple[Any, Any, int, Any]:
    """Model, capture, explained row and target with the perturbation harness's semantics."""
    model = _model(name)
    state = capture(model, TOKENS)
    if is_post_ln(model):
        gen = torch.Generator().manual_seed(3)
        return model, state, 0, torch.randn(model.cfg.d_model, generator=gen, dtype=torch.float64)
    return model, state, state.n_pos - 1, 7


def _f(model: Any, state: Any, x: torch.Tensor, position: int, target: Any) -> torch.Tensor:
    es = explained_scalar(model, state, position, target)
    return es(live(model, state, x if x.ndim == 3 else x[None], output=es.output))


def _rtol(name: str) -> float:
    """HF's RMSNorm computes its scale in float32 even in float64 models: on LLaMA/Gemma bridges the
    live model is float32-accurate, while the lens replays (and a scale edit runs) the bridge's float64
    norm path (docs/method.md §4)."""
    return 1e-6 if name in ("br_llama_gqa", "br_gemma3", "nt_llama_gqa") else 1e-9


def _in_class(model: Any, state: Any, position: int, target: Any) -> torch.Tensor:
    return get_method("tensor_in_class")(model, state, position=position, target=target)[position]


def _hook_count(model: Any) -> int:
    n = 0
    for mod in model.modules():
        n += len(mod._forward_hooks) + len(mod._forward_pre_hooks) + len(mod._backward_hooks)
        n += len(getattr(mod, "fwd_hooks", []) or []) + len(getattr(mod, "bwd_hooks", []) or [])
    return n


# --------------------------------------------------------------------------------------------
# Registry, the explained scalar, errors
# --------------------------------------------------------------------------------------------
def test_registered_with_the_registry_signature():
    assert set(GRADIENT_METHODS) <= set(list_methods())
    assert GRADIENT_METHODS == ("input_x_gradient", "input_x_gradient_l2", "integrated_gradients", "attnlrp", "cp_lrp")


@pytest.mark.parametrize("name", SUBJECTS)
def test_explained_scalar_is_what_in_class_and_the_readouts_explain(name):
    model, state, pos, target = _setup(name)
    f0 = float(_f(model, state, state.x0, pos, target).detach())
    rtol = _rtol(name)
    # In+Class: row sum + bias part = the same scalar.
    out = "resid_post" if is_post_ln(model) else "ln_final"
    lens = TensorLens.from_state(model, state, output=out)
    if isinstance(target, torch.Tensor):
        row, bias = (
            lens.collapse("in_class", direction=target, positions=[pos]),
            lens.collapse_bias("in_class", direction=target),
        )
    else:
        row, bias = (
            lens.collapse("in_class", token=target, positions=[pos]),
            lens.collapse_bias("in_class", token=target),
        )
    assert float(row.sum() + bias[pos]) == pytest.approx(f0, rel=rtol, abs=1e-12)
    # The perturbation readouts: the decoder's logit, the encoder head's class score (minus its bias).
    if isinstance(target, torch.Tensor):
        W = torch.stack([target, -target], 1)
        readout = ClassifierReadout(W, torch.tensor([0.3, -0.3], dtype=torch.float64))
        assert torch.equal(readout.target(0), target)
        h = readout(model, TOKENS).hidden[0]
        assert float(h @ target) == pytest.approx(f0, rel=rtol, abs=1e-12)
    else:
        assert NextTokenReadout().target(target) == target
        assert float(state.logits[0, pos, target]) == pytest.approx(f0, rel=rtol, abs=1e-12)


@pytest.mark.parametrize("name", ["br_gpt2", *on_hooked("encoder")])
def test_bad_arguments_are_library_errors(name):
    model, state, pos, target = _setup(name)
    for method in GRADIENT_METHODS:
        fn = get_method(method)
        with pytest.raises(TensorLensError, match="class-specific"):
            fn(model, state, position=pos)
        with pytest.raises(TensorLensError, match="outside a sequence"):
            fn(model, state, position=state.n_pos, target=target)
        with pytest.raises(TensorLensError, match="FrozenState"):
            fn(model, state.activations, position=pos, target=target)
    with pytest.raises(TensorLensError, match="target direction"):
        input_x_gradient(model, state, position=pos, target=torch.zeros(3, dtype=torch.float64))
    if is_post_ln(model):
        with pytest.raises(TensorLensError, match="token target needs a decoder"):
            input_x_gradient(model, state, position=pos, target=5)
    else:
        with pytest.raises(TensorLensError, match="outside the vocabulary"):
            input_x_gradient(model, state, position=pos, target=10**6)
    with pytest.raises(TensorLensError, match="quadrature method"):
        integrated_gradients(model, state, position=pos, target=target, method="simpson")
    with pytest.raises(TensorLensError, match="LRP rule"):
        lrp(model, state, rule="lrp_eps", position=pos, target=target)
    with torch.inference_mode(), pytest.raises(TensorLensError, match="inference_mode"):
        input_x_gradient(model, state, position=pos, target=target)


@needs_hooked
def test_lrp_refuses_solu_by_name():
    model = hooked_model("solu")
    state = capture(model, TOKENS)
    with pytest.raises(UnsupportedModelError, match="SoLU"):
        lrp(model, state, rule="attnlrp", position=3, target=2)


# --------------------------------------------------------------------------------------------
# Input×Gradient
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SUBJECTS)
def test_input_x_gradient_is_x_dot_the_autograd_jacobian(name):
    model, state, pos, target = _setup(name)
    x0 = state.x0.detach()
    n = state.n_pos
    # Independent reference: the full Jacobian of every row's scalar, by torch.autograd.functional.
    jac = torch.autograd.functional.jacobian(
        lambda x: torch.cat([_f(model, state, x, i, target) for i in range(n)]), x0
    )  # [n_out, pos, d]
    ref = (x0 * jac).sum(-1)
    full = input_x_gradient(model, state, target=target)
    torch.testing.assert_close(full, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        get_method("input_x_gradient_l2")(model, state, target=target), (x0 * jac).norm(dim=-1), rtol=1e-10, atol=1e-12
    )
    # Row-only output: that row, the others NaN.
    one = input_x_gradient(model, state, position=pos, target=target)
    torch.testing.assert_close(one[pos], ref[pos], rtol=1e-10, atol=1e-12)
    assert torch.isnan(one[[i for i in range(n) if i != pos]]).all()
    # A memory budget of one item runs one item per chunk: same numbers.
    torch.testing.assert_close(input_x_gradient(model, state, target=target, memory_budget=1), full, rtol=1e-12, atol=0)


def _affine_toy(backend: str) -> Any:
    """One attention-only block, no norms, W_Q = W_K = 0: the patterns are constants, so the model is
    affine in its input and every method has a closed form."""
    if backend == "hooked":
        model = hooked_model_cfg(n_layers=1, attn_only=True, normalization_type=None)
    else:
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge

        cfg = TransformerBridgeConfig(
            n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=23, n_ctx=16, normalization_type=None, attn_only=True
        )
        torch.manual_seed(0)
        model = TransformerBridge.boot_native(cfg, dtype=torch.float64).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("W_Q", "W_K")) or (".q." in pname or ".k." in pname) and pname.endswith("weight"):
                p.zero_()
    return model


@pytest.mark.parametrize("backend", [*on_hooked("hooked"), "native_bridge"])
def test_affine_toy_every_method_has_its_closed_form(backend):
    model = _affine_toy(backend)
    tokens = torch.tensor([[1, 4, 2, 7, 3, 9]])
    state = capture(model, tokens)
    pos, tok = state.n_pos - 1, 5
    x0 = state.x0.detach()
    u = model.W_U.detach()[:, tok]
    inc = _in_class(model, state, pos, tok)
    # f is affine: Input×Gradient = In+Class = CP-LRP, and IG from 0 = Input×Gradient for any m.
    torch.testing.assert_close(
        input_x_gradient(model, state, position=pos, target=tok)[pos], inc, rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(
        lrp(model, state, rule="cp_lrp", position=pos, target=tok)[pos], inc, rtol=1e-12, atol=1e-14
    )
    for m in (1, 3):
        ig = integrated_gradients(model, state, position=pos, target=tok, steps=m)[pos]
        torch.testing.assert_close(ig, inc, rtol=1e-12, atol=1e-14)
    f0 = float(_f(model, state, x0, pos, tok).detach())
    f_zero = float(_f(model, state, torch.zeros_like(x0), pos, tok).detach())
    assert float(inc.sum()) == pytest.approx(f0 - f_zero, rel=1e-12)
    # AttnLRP: the value path gets half the gradient and Q, K carry none (W_Q = W_K = 0), so the
    # attention term is halved and the residual term x_pos·u stays: R = ½ (In+Class + direct).
    direct = torch.zeros_like(inc)
    direct[pos] = x0[pos] @ u
    attn = lrp(model, state, rule="attnlrp", position=pos, target=tok)[pos]
    torch.testing.assert_close(attn, 0.5 * (inc + direct), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(attn, inc)  # the toy does exercise the value rule


# --------------------------------------------------------------------------------------------
# Integrated Gradients
# --------------------------------------------------------------------------------------------
def test_quadrature_rules_integrate_what_they_should():
    for method, exact_degree in (("gausslegendre", 2 * 6 - 1), ("riemann_middle", 1), ("riemann_trapezoid", 1)):
        a, w = quadrature(6, method)
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-15)
        for k in range(exact_degree + 1):
            assert float((w * a**k).sum()) == pytest.approx(1 / (k + 1), abs=1e-14), (method, k)


def test_captum_trapezoid_weights_sum_to_one_minus_one_over_m():
    """The docs' claim that captum's riemann_trapezoid is biased: its weights sum to 1 - 1/m."""
    approx = pytest.importorskip("captum.attr._utils.approximation_methods")
    step_sizes, alphas = approx.approximation_parameters("riemann_trapezoid")
    for m in (4, 32):
        assert sum(step_sizes(m)) == pytest.approx(1 - 1 / m, abs=1e-15)
        assert alphas(m)[0] == 0.0 and alphas(m)[-1] == 1.0


IG_SUBJECTS = on_hooked("ht_gpt2", "encoder") + ["br_llama_gqa", "br_bert"]


@pytest.mark.parametrize("name", IG_SUBJECTS)
def test_integrated_gradients_completeness_converges(name):
    model, state, pos, target = _setup(name)
    # A reference-token baseline (token 3, BOS/[CLS] id 0 kept): a smooth path for every family.
    x_ref = reference_input(model, state, 3, keep_tokens=(0,))
    assert torch.equal(x_ref[0], state.x0[0]) and not torch.allclose(x_ref[1:], state.x0[1:])
    gap = float((_f(model, state, state.x0, pos, target) - _f(model, state, x_ref, pos, target)).detach())
    errors = []
    for m in (2, 4, 8, 32):
        ig = integrated_gradients(
            model,
            state,
            position=pos,
            target=target,
            steps=m,
            baseline_token=3,
            keep_tokens=(0,),
            completeness_rtol=None,
        )
        errors.append(abs(float(ig[pos].sum()) - gap))
    assert errors[0] > errors[1] > errors[2], errors
    # Gauss-Legendre reaches rounding by m = 32 (float32 rounding of HF's RMSNorm on LLaMA bridges).
    assert errors[3] < _rtol(name) * max(abs(gap), 1.0), errors
    # The same baseline passed as a tensor gives the same map.
    by_tensor = integrated_gradients(model, state, position=pos, target=target, steps=8, baseline=x_ref)
    torch.testing.assert_close(
        by_tensor,
        integrated_gradients(model, state, position=pos, target=target, steps=8, baseline_token=3, keep_tokens=(0,)),
        equal_nan=True,
    )


@pytest.mark.parametrize("name", [*on_hooked("ht_gpt2"), "br_llama_gqa"])
def test_zero_baseline_on_a_pre_norm_decoder_warns_with_few_steps(name):
    model, state, pos, target = _setup(name)
    with pytest.warns(CompletenessWarning, match="reference-token baseline"):
        integrated_gradients(model, state, position=pos, target=target, steps=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompletenessWarning)
        integrated_gradients(model, state, position=pos, target=target, steps=32, baseline_token=3, keep_tokens=(0,))


@pytest.mark.parametrize("name", SUBJECTS)
def test_integrated_gradients_all_rows_and_one_row(name):
    model, state, pos, target = _setup(name)
    kw = dict(target=target, steps=4, baseline_token=3, keep_tokens=(0,), completeness_rtol=None)
    full = integrated_gradients(model, state, **kw)
    one = integrated_gradients(model, state, position=pos, **kw)
    assert not torch.isnan(full).any()
    torch.testing.assert_close(one[pos], full[pos], rtol=1e-12, atol=1e-14)
    assert torch.isnan(one[[i for i in range(state.n_pos) if i != pos]]).all()
    torch.testing.assert_close(integrated_gradients(model, state, memory_budget=1, **kw), full, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", SUBJECTS)
def test_agrees_with_captum(name):
    captum = pytest.importorskip("captum.attr")
    model, state, pos, target = _setup(name)
    x0 = state.x0.detach()[None]

    def forward(x):
        return _f(model, state, x, pos, target)

    ixg = captum.InputXGradient(forward).attribute(x0.clone().requires_grad_(True))[0].sum(-1)
    torch.testing.assert_close(
        input_x_gradient(model, state, position=pos, target=target)[pos], ixg, rtol=1e-10, atol=1e-12
    )
    x_ref = reference_input(model, state, 3, keep_tokens=(0,))[None]
    for method in ("gausslegendre", "riemann_middle"):
        ref = (
            captum.IntegratedGradients(forward)
            .attribute(x0, baselines=x_ref, n_steps=8, method=method, internal_batch_size=8)[0]
            .sum(-1)
        )
        mine = integrated_gradients(
            model, state, position=pos, target=target, steps=8, method=method, baseline=x_ref[0], completeness_rtol=None
        )[pos]
        # captum casts its quadrature weights to float32 (torch.tensor(step_sizes).float()), so even
        # in float64 it carries their rounding: ~6e-8 relative.
        torch.testing.assert_close(mine, ref, rtol=0, atol=2e-7 * float(ref.abs().max()))


# --------------------------------------------------------------------------------------------
# CP-LRP and AttnLRP
# --------------------------------------------------------------------------------------------
# (nt_llama_gqa left out: boot_native's float32 RMS scale puts CP-LRP 3.6e-7 (relative) off the
# float64 In+Class row, above the 1e-7 this test holds the HF LLaMA bridge to)
LRP_SUBJECTS = [s for s in SUBJECTS if s != "nt_llama_gqa"] + ["br_gemma3", *on_hooked("ht_gemma3_qk_norm")]


@pytest.mark.parametrize("name", LRP_SUBJECTS)
def test_cp_lrp_is_the_in_class_row_and_conserves(name):
    model, state, pos, target = _setup(name)
    inc = _in_class(model, state, pos, target)
    cp = get_method("cp_lrp")(model, state, position=pos, target=target)
    rtol = _rtol(name) / 10
    torch.testing.assert_close(cp[pos], inc, rtol=rtol, atol=rtol * float(inc.abs().max()))
    assert torch.isnan(cp[[i for i in range(state.n_pos) if i != pos]]).all()
    # AttnLRP is a different method: it sends relevance through the softmax too.
    attn = get_method("attnlrp")(model, state, position=pos, target=target)[pos]
    assert torch.isfinite(attn).all() and not torch.allclose(attn, inc, rtol=1e-3, atol=1e-6)


@pytest.fixture(scope="module")
def lxt_efficient():
    """lxt 2.1's own rule and patch modules, without ``lxt.efficient.__init__``.

    That ``__init__`` imports every model map, and ``lxt/efficient/models/bert.py`` imports
    ``transformers.modeling_attn_mask_utils`` (gone in transformers 5), so the package cannot be
    imported here; stub packages let the llama/gpt2/gemma3 maps and their rules load. Every module
    this adds to ``sys.modules`` is removed afterwards.
    """
    spec = importlib.util.find_spec("lxt")
    if spec is None or spec.origin is None:
        pytest.skip("lxt is not installed")
    base = Path(spec.origin).parent / "efficient"
    before = dict(sys.modules)
    try:
        for name, path in (("lxt.efficient", base), ("lxt.efficient.models", base / "models")):
            stub = types.ModuleType(name)
            stub.__path__ = [str(path)]
            sys.modules[name] = stub
        parts = {m: importlib.import_module(f"lxt.efficient.models.{m}") for m in ("llama", "gpt2", "gemma3")}
        parts["patches"] = importlib.import_module("lxt.efficient.patches")
        yield parts
    finally:
        for name in set(sys.modules) - set(before):
            del sys.modules[name]
        sys.modules.update({k: v for k, v in before.items() if k.startswith("lxt")})


def _lxt_relevance(lxt: dict[str, Any], family: str, rule: str, position: int, token: int) -> torch.Tensor:
    """lxt's patches on a plain Hugging Face model: relevance of the block-0 input, restored after."""
    module = lxt[{"llama_gqa": "llama", "gpt2": "gpt2", "gemma3": "gemma3"}[family]]
    patch_map = module.attnLRP if rule == "attnlrp" else module.cp_LRP
    wrap = lxt["patches"].wrap_attention_forward if rule == "attnlrp" else lxt["patches"].cp_wrap_attention_forward
    hf = hf_model(family)
    force_eager(hf)
    saved: list[tuple[Any, dict[str, Any]]] = []
    try:
        for target, patch in patch_map.items():
            if isinstance(target, type):
                saved.append((target, dict(vars(target))))
                assert patch(target)
            else:
                # lxt's patch_attention swaps ALL_ATTENTION_FUNCTIONS for a dict, which transformers 5
                # calls .get_interface on; wrap the eager function (what eager attention calls) instead.
                saved.append((target, {"eager_attention_forward": target.eager_attention_forward}))
                target.eager_attention_forward = wrap(target.eager_attention_forward)
        store: dict[str, torch.Tensor] = {}

        def leaf(mod: Any, inp: Any, out: torch.Tensor) -> torch.Tensor:
            store["x"] = out.detach().requires_grad_(True)
            return store["x"]

        embed_out = hf.transformer.drop if family == "gpt2" else hf.model.embed_tokens
        handle = embed_out.register_forward_hook(leaf)
        try:
            logits = hf(TOKENS).logits
        finally:
            handle.remove()
        (g,) = torch.autograd.grad(logits[0, position, token], store["x"])
        return (store["x"] * g).sum(-1)[0].detach()
    finally:
        for target, attrs in saved:
            for key, value in attrs.items():
                setattr(target, key, value)
            if isinstance(target, type):
                for key in set(vars(target)) - set(attrs):
                    delattr(target, key)
        for target, attrs in saved:
            if isinstance(target, type):
                assert dict(vars(target)) == attrs, f"{target.__name__} was not restored"


LXT_CASES = [
    ("br_llama_gqa", 1e-6),  # lxt's RMSNorm patch computes the scale in float32
    ("br_gemma3", 1e-6),
    ("br_gpt2", 1e-8),  # lxt's identity rule divides by (x + 1e-10)
    *on_hooked(pytest.param("ht_gpt2_from_hf", 1e-8)),
]


def _hooked_gpt2_from_hf() -> Any:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    hf = hf_model("gpt2")
    c: Any = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head, d_mlp=4 * c.n_embd,
        d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn="gelu_new", normalization_type="LN",
        eps=c.layer_norm_epsilon, dtype=torch.float64, default_prepend_bos=False,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    model.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    model.eval()
    torch.testing.assert_close(model(TOKENS), hf(TOKENS).logits, rtol=1e-12, atol=1e-12)
    return model


@pytest.mark.parametrize("rule", ["attnlrp", "cp_lrp"])
@pytest.mark.parametrize(("name", "tol"), LXT_CASES)
def test_lrp_matches_lxt_on_hugging_face_models(lxt_efficient, name, tol, rule):
    family = "gpt2" if name == "ht_gpt2_from_hf" else name[3:]
    model = _hooked_gpt2_from_hf() if name == "ht_gpt2_from_hf" else _model(name)
    state = capture(model, TOKENS)
    pos, tok = state.n_pos - 1, 7
    ref = _lxt_relevance(lxt_efficient, family, rule, pos, tok)
    mine = lrp(model, state, rule=rule, position=pos, target=tok)[pos]
    torch.testing.assert_close(mine, ref, rtol=0, atol=tol * float(ref.abs().max()))


# --------------------------------------------------------------------------------------------
# Nothing survives a call
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [*on_hooked("ht_llama_gqa"), "br_llama_gqa", "br_bert"])
@pytest.mark.filterwarnings("ignore::tl_tensorlens.methods.gradients.CompletenessWarning")
def test_no_hook_or_rule_survives_success_or_error(name, monkeypatch):
    model, state, pos, target = _setup(name)
    before = _hook_count(model)
    plain = input_x_gradient(model, state, position=pos, target=target)
    for method in GRADIENT_METHODS:
        get_method(method)(model, state, position=pos, target=target)
        assert _hook_count(model) == before, method
    # After the LRP rules ran, plain gradients are plain again.
    torch.testing.assert_close(input_x_gradient(model, state, position=pos, target=target), plain, equal_nan=True)

    from tl_tensorlens.methods import gradients as _gradients

    def boom(self, out):
        raise RuntimeError("boom")

    monkeypatch.setattr(_gradients.ExplainedScalar, "__call__", boom)
    for method in GRADIENT_METHODS:
        with pytest.raises(RuntimeError, match="boom"):
            get_method(method)(model, state, position=pos, target=target)
        assert _hook_count(model) == before, method
    monkeypatch.undo()
    torch.testing.assert_close(input_x_gradient(model, state, position=pos, target=target), plain, equal_nan=True)


# --------------------------------------------------------------------------------------------
# In the perturbation harness
# --------------------------------------------------------------------------------------------
def test_perturbation_harness_runs_every_gradient_method(tmp_path):
    model = _model("br_gpt2")
    gen = torch.Generator().manual_seed(0)
    examples = [
        Example(f"e{i}", torch.cat([torch.tensor([0]), torch.randint(4, 53, (7,), generator=gen)])) for i in range(2)
    ]
    conf = PerturbationConfig(fractions=(0.0, 0.2), masking="replace", mask_token_id=3, special_token_ids=(0,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompletenessWarning)  # the zero-baseline default on a pre-norm decoder
        rows = run_perturbation(
            model, examples, list(GRADIENT_METHODS), NextTokenReadout(), conf, tmp_path / "rows.jsonl", progress=False
        )
    assert {r["method"] for r in rows} == set(GRADIENT_METHODS)
    assert len(rows) == 2 * len(GRADIENT_METHODS) * 2 * 2


def test_benchmark_script_runs_on_one_tiny_prompt():
    spec = importlib.util.spec_from_file_location(
        "bench_gradients", Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gradients.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    subject = bench.Subject("br_gpt2", _model("br_gpt2"), [TOKENS], 3, (0,))
    result = bench.run_prompt(subject, TOKENS, [4, 8], ["gausslegendre"])
    summary = bench.summarize("br_gpt2", [result])
    assert summary["methods"]["cp_lrp"]["rho"] == pytest.approx(1.0)
    assert "| cp_lrp | 1.000 | 1.00 |" in bench.format_summary(summary)
