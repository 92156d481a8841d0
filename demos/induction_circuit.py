"""The induction circuit seen through the tensor.

The committed induction model (2-layer GPT-2) predicts the second copy of a repeated random
segment by induction: at position p of the copy it attends back to the token *after* the earlier
occurrence of the current token and copies it. The ground truth of which input decides each
prediction is therefore known (``InductionBatch.src_pos``).

This demo builds the TensorLens tensor for held-out sequences and checks, at every repeat
position, which input the class-specific (logit) collapse for the model's own prediction ranks
first; it does the same for attention rollout (the standard attention-aggregation baseline) and
draws the per-head tensors (``A_h ⊗ W_OVᵀ``): layer 0 holds a previous-token head, layer 1 the
induction heads.

    python demos/induction_circuit.py --n 8 --out out/induction
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; prints the hit rates and writes two figures under ``--out``."""
    from tl_tensorlens import TensorLens, capture
    from tl_tensorlens.methods import get_method
    from tl_tensorlens.subjects import induction_batch, load_subject
    from tl_tensorlens.viz.plots import plot_map_grid, plot_method_comparison, token_labels

    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--n", type=int, default=8, help="held-out sequences")
    p.add_argument("--seq-len", type=int, default=17, help="odd: <bos> + two copies")
    p.add_argument("--out", default="out/induction")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    model = load_subject("induction", dtype=torch.float64).model
    batch = induction_batch(args.n, args.seq_len, seed=2024)
    rollout = get_method("attn_rollout")
    hits = {"tensor_in_class": 0, "attn_rollout": 0}
    total = 0
    for b in range(args.n):
        tokens = batch.tokens[b : b + 1]
        state = capture(model, tokens)
        lens = TensorLens.from_state(model, state, output="ln_final")
        rows = batch.is_repeat[b].nonzero()[:, 0].tolist()
        assert state.logits is not None  # a decoder returns logits
        pred = state.logits[0].argmax(-1)
        maps = {
            "tensor_in_class": lens.collapse("in_class", token=pred, positions=rows),
            "attn_rollout": rollout(model, state)[rows],
        }
        for name, M in maps.items():
            # exclude the current token itself (position i): the question is which *earlier* token is copied
            for r, i in enumerate(rows):
                hits[name] += int(int(M[r, :i].argmax()) == int(batch.src_pos[b, i]))
        total += len(rows)
        if b == 0:
            labels = token_labels(model, tokens[0])
            full_maps = {
                "tensor_in_class (model's prediction)": lens.collapse("in_class", token=pred),
                "tensor_in_out": lens.collapse("in_out"),
                "attn_rollout": rollout(model, state),
            }
            plot_method_comparison(full_maps, labels, title="induction: the tensor points at the copied token").savefig(
                out / "induction_maps.png", dpi=110
            )
            heads = [lens.head(layer, h).norm_collapse() for layer in range(2) for h in range(model.cfg.n_heads)]
            titles = [f"L{layer}H{h}" for layer in range(2) for h in range(model.cfg.n_heads)]
            plot_map_grid(
                heads, labels, titles=titles, ncols=model.cfg.n_heads, title="per-head tensors |A_h|·‖W_V W_O‖_F"
            ).savefig(out / "induction_heads.png", dpi=110)
    print(
        f"{total} repeat positions in {args.n} held-out sequences: share where the top-ranked earlier input is "
        "the token the model copies (ground truth)"
    )
    for name, h in hits.items():
        print(f"  {name:14s} {h / total:.2f}")
    print(f"figures: {out / 'induction_maps.png'}, {out / 'induction_heads.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
