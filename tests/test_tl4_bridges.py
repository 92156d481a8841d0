"""The lens on TL 4.x-style bridges: ``TransformerBridge.boot_native(cfg)`` and bridges in
``enable_compatibility_mode()`` (both APIs exist on TL 3.9 and 4.3; skipped where they do not).

Numbers and the command that measures them: docs/tl4.md (scripts/measure_tl4_bridges.py).
"""

import warnings
from typing import Any

import pytest
import torch

from tests.models import TOKENS, bridge_model
from tl_tensorlens import TensorLens
from tl_tensorlens.replay import verify_replay

TransformerBridge = pytest.importorskip("transformer_lens.model_bridge").TransformerBridge
needs_native = pytest.mark.skipif(
    not hasattr(TransformerBridge, "boot_native"), reason="this TransformerLens has no TransformerBridge.boot_native"
)
needs_compat = pytest.mark.skipif(
    not hasattr(TransformerBridge, "enable_compatibility_mode"),
    reason="this TransformerLens has no TransformerBridge.enable_compatibility_mode",
)


def native(**overrides: Any) -> Any:
    from transformer_lens.config import TransformerBridgeConfig

    kw = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=53, n_ctx=24, act_fn="gelu_new", seed=0)
    return TransformerBridge.boot_native(TransformerBridgeConfig(**{**kw, **overrides}), dtype=torch.float64).eval()


def compat(model: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.enable_compatibility_mode(disable_warnings=True)
    assert model.compatibility_mode
    return model


def build(kind: str) -> Any:
    if kind == "native":
        return native()
    if kind == "native_rms":
        return native(normalization_type="RMS")
    if kind == "native+compat":
        return compat(native())
    return compat(bridge_model(kind.removesuffix("+compat")))


KINDS = [
    pytest.param("native", marks=needs_native),
    pytest.param("native_rms", marks=needs_native),
    pytest.param("native+compat", marks=[needs_native, needs_compat]),
    pytest.param("gpt2+compat", marks=needs_compat),
    pytest.param("llama_gqa+compat", marks=needs_compat),
]


@pytest.mark.parametrize("kind", KINDS)
def test_exact_on_tl4_bridges(kind: str) -> None:
    """float64 replay check passes; the full tensor rebuilds the output; collapse + bias = logits."""
    model = build(kind)
    tokens = TOKENS[0]
    checks = verify_replay(model, tokens, outputs=("ln_final", "logits"))
    assert all(c.ok for c in checks), [c.describe() for c in checks]
    lens = TensorLens.from_model(model, tokens, output="ln_final")
    assert lens.input.dtype == torch.float64
    T = lens.full()
    rebuilt = torch.einsum("idjk,jk->id", T, lens.input) + lens.bias
    torch.testing.assert_close(rebuilt, lens.output, rtol=0, atol=1e-12)
    # The model's own output: exact for LayerNorm; RMSNorm bridges compute their norm through float32.
    model_tol = 1e-6 if model.cfg.normalization_type in ("RMS", "RMSPre") else 1e-12
    torch.testing.assert_close(lens.output, lens.model_output(), rtol=0, atol=model_tol)
    logits = TensorLens.from_model(model, tokens, output="logits", verify=False)
    for tok in (3, 7):
        col = logits.collapse("in_class", token=tok).sum(-1) + logits.collapse_bias("in_class", token=tok)
        torch.testing.assert_close(col, logits.output[:, tok], rtol=0, atol=1e-12)
        torch.testing.assert_close(col, logits.model_output()[:, tok], rtol=0, atol=model_tol)


@pytest.mark.parametrize("family", [pytest.param("native", marks=needs_native), "gpt2"])
@needs_compat
def test_compatibility_mode_changes_and_keeps(family: str) -> None:
    """LayerNorm models: compatibility mode centres the residual stream and the unembedding (the
    residual-stream tensors and single-logit collapses change) but keeps the attention patterns,
    the logits up to a per-position constant and the In+Class collapse of a logit difference."""
    raw = native() if family == "native" else bridge_model("gpt2")
    comp = compat(native() if family == "native" else bridge_model("gpt2"))
    tokens = TOKENS[0]
    a = TensorLens.from_model(raw, tokens, output="logits")
    b = TensorLens.from_model(comp, tokens, output="logits")
    for layer in range(a.state.n_layers):
        torch.testing.assert_close(a.state.pattern(layer), b.state.pattern(layer), rtol=0, atol=1e-6)
    ya, yb = a.output, b.output
    torch.testing.assert_close(ya - ya.mean(-1, keepdim=True), yb - yb.mean(-1, keepdim=True), rtol=0, atol=1e-6)
    assert (ya - yb).abs().max() > 1e-4  # center_unembed moved the logits themselves
    u = torch.zeros(a.d_out, dtype=torch.float64)
    u[7], u[11] = 1.0, -1.0
    torch.testing.assert_close(
        a.collapse("in_class", direction=u), b.collapse("in_class", direction=u), rtol=0, atol=1e-6
    )
    # centre_writing_weights: the embedding and the residual stream are centred, so they change
    assert (a.input - b.input).abs().max() > 1e-4
    torch.testing.assert_close(b.input.mean(-1), torch.zeros(b.n_pos, dtype=torch.float64), rtol=0, atol=1e-6)
    ra = TensorLens.from_model(raw, tokens, output="resid_post", verify=False)
    rb = TensorLens.from_model(comp, tokens, output="resid_post", verify=False)
    assert (ra.collapse("norm") - rb.collapse("norm")).abs().max() > 1e-4
