"""A perturbation study (paper Sec. 4.1) in miniature, on the induction model.

Each example is a repeated random segment cut at a repeat position, so the model's next-token
prediction is decided by induction. For each relevance method the harness masks the most relevant
input tokens (positive perturbation: the prediction should break fast) or the least relevant
(negative: it should survive) and records how often the prediction survives; AUC and AOPC summarise
the curves. The full study (MiniLM polarity + induction, the 8 baselines and ALTI, bootstrap CIs) is
``tl-tensorlens perturb`` / ``python -m tl_tensorlens.studies.perturbation``.

    python demos/perturbation_study.py --n 12 --out out/perturbation
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch


def main(argv: Sequence[str] | None = None) -> int:
    """Run the small study; prints the table and writes the curves under ``--out``."""
    from tl_tensorlens.evaluation.perturbation import (
        Example,
        NextTokenReadout,
        PerturbationConfig,
        format_table,
        run_perturbation,
        summarize,
    )
    from tl_tensorlens.subjects import induction_batch, load_subject
    from tl_tensorlens.subjects.induction import BOS_ID
    from tl_tensorlens.viz.plots import plot_perturbation_curves

    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--n", type=int, default=12, help="examples")
    p.add_argument("--methods", default="tensor_in_class,tensor_in_out,attn_rollout,globenc_rollout,random")
    p.add_argument("--out", default="out/perturbation")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    model = load_subject("induction").model
    seg = 10
    batch = induction_batch(args.n, 2 * seg + 1, seed=777)
    gen = torch.Generator().manual_seed(0)
    examples = []
    for i in range(args.n):
        cut = int(torch.randint(seg + 2, 2 * seg, (1,), generator=gen))
        examples.append(Example(f"ind{i}", batch.tokens[i, : cut + 1].clone()))
    unk = 3  # "<unk>" of the project's word tokenizer: the replacement of a masked token
    config = PerturbationConfig(fractions=(0.0, 0.1, 0.2, 0.3), mask_token_id=unk, special_token_ids=(BOS_ID,))
    rows_path = out / "rows.jsonl"  # resumable: rerunning skips finished examples
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = run_perturbation(model, examples, methods, NextTokenReadout(), config, rows_path, progress=False)
    summaries = summarize(rows, n_resamples=200)
    print(format_table(summaries))
    plot_perturbation_curves(summaries, title="induction model: perturbation curves").savefig(
        out / "perturbation_curves.png", dpi=110
    )
    print(f"rows: {rows_path}; curves: {out / 'perturbation_curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
