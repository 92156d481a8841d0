"""Tensor logit lens and activation patching on the linearized induction model.

1. **Tensor logit lens.** TransformerLens' logit lens reads the residual stream after each block
   through ``ln_final`` and the unembedding. Freezing the norm scale of each of those residuals
   makes the read-out affine, so the tensor of the first k blocks splits each layer's logit-lens
   logit over the input tokens *exactly* (the rows sum to TL's number).
2. **Patching the linearized model.** ``transformer_lens.patching`` runs unchanged inside
   ``linearized(model, clean_state)``; since that model is affine, every patching result is
   predicted exactly by the tensors (checked here).
3. **Frozen-component patching.** Take attention patterns, norm scales or MLP gates from the
   corrupted prompt's capture, keep the rest clean, read the tensor at the clean input: which
   class of frozen values carries the loss of the induction prediction?

Clean prompt: ``<bos> A A[:-1]`` (the last token's answer is decided by induction). Corrupted:
the first copy replaced by other tokens, so nothing earlier tells the model what comes next.

    python demos/logit_lens_and_patching.py --out out/patching
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch


def main(argv: Sequence[str] | None = None) -> int:
    """Run the three workflows on the induction model; prints tables, writes figures under ``--out``."""
    from tl_tensorlens import capture
    from tl_tensorlens.methods.logit_lens import tensor_logit_lens
    from tl_tensorlens.methods.patching import (
        LogitDiff,
        PatchingKind,
        frozen_component_patching,
        linearized_patching,
        predict_patching,
    )
    from tl_tensorlens.subjects import induction_batch, load_subject
    from tl_tensorlens.viz.plots import plot_component_patching, plot_logit_lens, plot_patching, token_labels

    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--segment", type=int, default=8, help="segment length L (prompt: 2L tokens)")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--out", default="out/patching")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    model = load_subject("induction", dtype=torch.float64).model
    L = args.segment
    full = induction_batch(1, 2 * L + 1, seed=args.seed).tokens
    clean = full[:, :-1]
    answer = int(full[0, -1])
    other = induction_batch(1, 2 * L + 1, seed=args.seed + 1).tokens[:, 1 : L + 1]
    corrupted = clean.clone()
    corrupted[0, 1 : L + 1] = other[0]
    labels = token_labels(model, clean[0])
    vocab = token_labels(model, torch.arange(model.cfg.d_vocab))
    print("clean:    ", " ".join(labels))
    print("corrupted:", " ".join(token_labels(model, corrupted[0])))
    print(f"answer at the last position (by induction): {vocab[answer]}")

    clean_state, corr_state = capture(model, clean), capture(model, corrupted)

    # 1. tensor logit lens next to TransformerLens' logit lens
    ll = tensor_logit_lens(model, clean_state, positions=[-1])
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
        tl_lens = model.unembed(cache.accumulated_resid(apply_ln=True)[:, 0])[:, -1]  # [layer, d_vocab]
    print("\n## Tensor logit lens at the last position")
    print("| blocks | TL logit-lens top-1 | its logit (TL) | rebuilt from the tensor | top input |")
    print("|---|---|---|---|---|")
    for k, layer in enumerate(ll.depths):
        t = int(ll.target[k, 0])
        top_in = int(ll.maps[k, 0].argmax())
        print(
            f"| {layer} | {vocab[int(tl_lens[k].argmax())]} | {float(tl_lens[k, t]):.4f} | "
            f"{float(ll.logits[k, 0]):.4f} | {labels[top_in]} (pos {top_in}) |"
        )
    print(f"max |tensor − TransformerLens| over layers: {ll.max_error:.1e}")
    plot_logit_lens(ll, labels, position=-1, vocab=vocab).savefig(out / "logit_lens.png", dpi=110)

    # 2. TL's patching on the linearized model, and the tensor's prediction of it
    metric = LogitDiff(position=-1, good=answer)
    print("\n## Activation patching on the linearized model (metric: logit of the answer)")
    kinds: tuple[tuple[PatchingKind, str, list[str] | None], ...] = (
        ("resid_pre", "position", labels),
        ("head_all_pos", "head", None),
    )
    for kind, xlabel, idx in kinds:
        tl = linearized_patching(model, clean_state, corrupted, metric, kind=kind)
        pred = predict_patching(model, clean_state, corrupted, metric, kind=kind)
        # transformer_lens.patching stores results in float32: agreement is to float32 rounding
        err = float((tl.double() - pred.values).abs().max())
        print(
            f"{kind}: clean {pred.clean:.3f}, corrupted (linearized) {pred.corrupted:.3f}; "
            f"max |TL − tensor prediction| = {err:.1e}"
        )
        if kind == "head_all_pos":
            best = divmod(int(tl.argmax()), tl.shape[1])
            print(f"  patching one head's output: best L{best[0]}H{best[1]} restores {float(tl.max()):.3f}")
        names = idx if idx is not None else [f"H{h}" for h in range(tl.shape[1])]
        plot_patching(
            tl, labels=names, xlabel=xlabel, reference=pred.values, title=f"{kind} patching, linearized model"
        ).savefig(out / f"patching_{kind}.png", dpi=110)

    # 3. frozen-component patching
    res = frozen_component_patching(model, clean_state, corr_state, metric)
    print("\n## Frozen-component patching (clean input, frozen values partly from the corrupted prompt)")
    print(res.table())
    per_layer = {
        layer: float(
            frozen_component_patching(
                model, clean_state, corr_state, metric, variants=[("attention",)], blocks=[layer]
            ).metric[0]
        )
        for layer in range(model.cfg.n_layers)
    }
    print("attention patterns of one layer only: " + ", ".join(f"L{k}: {v:.3f}" for k, v in per_layer.items()))
    plot_component_patching(res, labels).savefig(out / "component_patching.png", dpi=110)
    print(f"\nfigures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
