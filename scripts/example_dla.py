"""Direct logit attribution on a real model (SmolLM2-135M by default), with the token-level split,
and the same numbers from TL 4.3's ``direct_logit_attribution`` on a compatibility-mode copy.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python scripts/example_dla.py \\
        --prompt "The Eiffel Tower is in the city of" --answer " Paris" --incorrect " London"
"""

import argparse
import importlib.util
import time
import warnings

import torch

from tl_tensorlens.methods.dla import component_attribution, format_attribution
from tl_tensorlens.subjects import load_subject
from tl_tensorlens.viz.plots import token_labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--subject", default="smollm2")
    p.add_argument("--prompt", default="The Eiffel Tower is in the city of")
    p.add_argument("--answer", default=" Paris")
    p.add_argument("--incorrect", default=" London")
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = load_subject(args.subject, backend="bridge", dtype=torch.float32).model
    tokens = model.to_tokens(args.prompt)[0]
    labels = token_labels(model, tokens)
    a, b = model.to_single_token(args.answer), model.to_single_token(args.incorrect)
    t0 = time.perf_counter()
    dla = component_attribution(model, tokens, a, b)
    t_dla = time.perf_counter() - t0
    print(f"{args.subject} float32, {len(tokens)} tokens: {' | '.join(labels)}")
    print(f"logit[{args.answer!r}] - logit[{args.incorrect!r}] at the last position = {dla.readout:+.4f}")
    print(format_attribution(dla, top=args.top, tokens=labels))
    print(f"sum of all {len(dla.labels)} components - readout: {float(dla.values.sum()) - dla.readout:+.2e}")
    gap = (dla.by_token.sum(-1) + dla.token_bias - dla.values).abs().max()
    print(f"max |by_token.sum + token_bias - value|: {float(gap):.2e}")
    tok_total = dla.by_token.sum(0)
    print(
        "source-token totals (all components): "
        + ", ".join(f"{t!s} {float(v):+.3f}" for t, v in zip(labels, tok_total, strict=True))
    )
    heads = [(k, label) for k, label in enumerate(dla.labels) if "H" in label and "." not in label]
    k_best = max(heads, key=lambda kl: abs(float(dla.values[kl[0]])))[0]
    row = dla.by_token[k_best]
    print(
        f"{dla.labels[k_best]} by source token: "
        + ", ".join(f"{t!s} {float(v):+.3f}" for t, v in zip(labels, row, strict=True))
        + f"; bias part {float(dla.token_bias[k_best]):+.3f}"
    )
    if importlib.util.find_spec("transformer_lens.tools.analysis.direct_logit_attribution") is None:
        print(f"time: component_attribution {t_dla:.1f} s (this TransformerLens has no direct_logit_attribution tool)")
        return
    from transformer_lens.tools.analysis.direct_logit_attribution import direct_logit_attribution

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.enable_compatibility_mode(disable_warnings=True)
    ours = component_attribution(model, tokens, a, b, by_token=False)
    t0 = time.perf_counter()
    ref = direct_logit_attribution(model, tokens[None], answer_tokens=a, incorrect_tokens=b, unit="component")
    t_tl = time.perf_counter() - t0
    names, vals = ours.grouped("component")
    tl = ref.attribution.reshape(len(ref.labels), -1)[:, 0].double()
    idx = [ref.labels.index(n) for n in names]
    print(
        f"compatibility mode: readout {ours.readout:+.4f}; vs TL direct_logit_attribution (unit='component', "
        f"{len(names)} rows): max |diff| {float((tl[idx] - vals).abs().max()):.2e}, TL total {float(tl.sum()):+.4f} "
        f"= readout - b_U diff {ours.readout - float(model.b_U[a] - model.b_U[b]):+.4f}"
    )
    ref_h = direct_logit_attribution(model, tokens[None], answer_tokens=a, incorrect_tokens=b, unit="head")
    hn, hv = ours.grouped("head")
    th = ref_h.attribution.reshape(len(ref_h.labels), -1)[:, 0].double()
    print(
        f"  unit='head' ({len(hn)} heads): max |diff| {float((th[[ref_h.labels.index(n) for n in hn]] - hv).abs().max()):.2e}"
    )
    print(f"time: component_attribution with token split {t_dla:.1f} s; TL direct_logit_attribution {t_tl:.1f} s")


if __name__ == "__main__":
    main()
