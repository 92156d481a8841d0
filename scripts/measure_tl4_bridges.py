"""Measure the lens on TL 4.x-style bridges: ``boot_native(cfg)`` and ``enable_compatibility_mode()``.

Prints, per bridge kind, the float64 replay check, the full-tensor rebuild error and the
collapse + bias = logits error, then what compatibility mode changes (raw vs compat bridge of the
same weights). Run from the repository root:

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python scripts/measure_tl4_bridges.py
"""

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.models import TOKENS, bridge_model  # noqa: E402
from tl_tensorlens import TensorLens  # noqa: E402
from tl_tensorlens._backend import tl_version  # noqa: E402
from tl_tensorlens.replay import verify_replay  # noqa: E402


def native(dtype: torch.dtype = torch.float64):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=53, n_ctx=24, act_fn="gelu_new", seed=0
    )
    return TransformerBridge.boot_native(cfg, dtype=dtype).eval()


def compat(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.enable_compatibility_mode(disable_warnings=True)
    return model


def exactness(name: str, model) -> None:
    tokens = TOKENS[0]
    checks = verify_replay(model, tokens, outputs=("ln_final", "logits"))
    lens = TensorLens.from_model(model, tokens, output="ln_final")
    T = lens.full()
    rebuilt = torch.einsum("idjk,jk->id", T, lens.input) + lens.bias
    full_err = (rebuilt - lens.output).abs().max().item()
    model_err = (lens.output - lens.model_output()).abs().max().item()
    lg = TensorLens.from_model(model, tokens, output="logits")
    tok = 7
    col = lg.collapse("in_class", token=tok).sum(-1) + lg.collapse_bias("in_class", token=tok)
    logit_err = (col - lg.output[:, tok]).abs().max().item()
    worst = max(max(c.reproduction_error, c.affine_error) for c in checks)
    ok = "yes" if all(c.ok for c in checks) else "NO"
    print(f"| {name} | {ok} | {worst:.1e} | {full_err:.1e} | {model_err:.1e} | {logit_err:.1e} |")


def changes(name: str, raw, comp) -> None:
    """What compatibility mode changes, on the same weights."""
    tokens = TOKENS[0]
    rows = []
    for out in ("resid_post", "ln_final", "logits"):
        a = TensorLens.from_model(raw, tokens, output=out)
        b = TensorLens.from_model(comp, tokens, output=out)
        y_a, y_b = a.model_output(), b.model_output()
        rows.append((f"output {out}", (y_a - y_b).abs().max().item()))
        if out == "logits":
            rows.append(
                (
                    "logits minus their per-position mean",
                    ((y_a - y_a.mean(-1, keepdim=True)) - (y_b - y_b.mean(-1, keepdim=True))).abs().max().item(),
                )
            )
            u = torch.zeros(a.d_out, dtype=torch.float64)
            u[7], u[11] = 1, -1
            rows.append(
                (
                    "in_class collapse, logit difference 7 - 11",
                    (a.collapse("in_class", direction=u) - b.collapse("in_class", direction=u)).abs().max().item(),
                )
            )
            rows.append(
                (
                    "in_class collapse, logit of 7",
                    (a.collapse("in_class", token=7) - b.collapse("in_class", token=7)).abs().max().item(),
                )
            )
        rows.append((f"norm collapse at {out}", (a.collapse("norm") - b.collapse("norm")).abs().max().item()))
    rows.append(("input x0 (embedding)", (a.input - b.input).abs().max().item()))
    rows.append(
        (
            "attention patterns (all layers)",
            max((a.state.pattern(k) - b.state.pattern(k)).abs().max().item() for k in range(a.state.n_layers)),
        )
    )
    for what, v in rows:
        print(f"| {name} | {what} | {v:.1e} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(f"TransformerLens {'.'.join(map(str, tl_version()))}")
    print(
        "| bridge | verify_replay (ln_final, logits) | worst relative error | T x + c vs replay, max abs "
        "| replay vs model, max abs | collapse + bias vs logit, max abs |"
    )
    exactness("boot_native (float64)", native())
    exactness("boot_native + compatibility mode", compat(native()))
    exactness("HF gpt2 + compatibility mode", compat(bridge_model("gpt2")))
    exactness("HF llama_gqa + compatibility mode", compat(bridge_model("llama_gqa")))
    print()
    print("| bridge | quantity | max abs change, raw vs compat |")
    changes("boot_native", native(), compat(native()))
    changes("HF gpt2 (LN)", bridge_model("gpt2"), compat(bridge_model("gpt2")))
    changes("HF llama_gqa (RMS)", bridge_model("llama_gqa"), compat(bridge_model("llama_gqa")))
