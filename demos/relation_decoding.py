"""Relation decoding (paper Sec. 4.2) in miniature: the mean tensor against LRE.

The project's relation model (a 4-layer GPT-2 that memorised invented facts, so the true object of
every prompt is known) answers few-shot prompts "examples + subject". For one relation, the
TensorLens **mean tensor** (Eq. 26: the tensor with biases averaged over n training prompts) is
applied to a held-out prompt's input and decoded through the unembedding; the LRE baseline
(Hernandez et al. 2024) averages per-example Jacobians of the subject state. Faithfulness = the
decoded top-1 equals the model's own top-1. The full study is ``tl-tensorlens relations`` /
``python -m tl_tensorlens.studies.relations``.

    python demos/relation_decoding.py --relations 2 --out out/relations
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch


def main(argv: Sequence[str] | None = None) -> int:
    """Run the small study; prints the table and writes the bar plot under ``--out``."""
    from tl_tensorlens.evaluation.relations import (
        PromptTokenizer,
        RelationStudyConfig,
        relation_from_dict,
        results_table,
        run_relation_study,
    )
    from tl_tensorlens.subjects import load_subject
    from tl_tensorlens.viz.plots import plot_relation_results

    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--relations", type=int, default=2, help="how many of the subject's relations")
    p.add_argument("--n-train", type=int, default=4)
    p.add_argument("--n-splits", type=int, default=2)
    p.add_argument("--max-test", type=int, default=8)
    p.add_argument("--out", default="out/relations")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    subject = load_subject("relations", dtype=torch.float64)
    specs = (subject.relations or [])[: args.relations]
    relations = [relation_from_dict(d, source=f"relations:{d['name']}") for d in specs]
    config = RelationStudyConfig(
        n_train=args.n_train, n_splits=args.n_splits, max_test=args.max_test, betas=(1.0, 2.25)
    )
    rows = run_relation_study(
        subject.model,
        relations,
        config,
        tokenizer=PromptTokenizer.from_model(subject.model),
        model_name="relations",
        out=out / "relations.jsonl",
        progress=False,
    )
    print(results_table(rows, metric="faithfulness", methods=config.methods()))
    plot_relation_results(rows, metric="faithfulness", methods=config.methods(), title="relation model").savefig(
        out / "relations.png", dpi=110
    )
    print(f"rows: {out / 'relations.jsonl'}; plot: {out / 'relations.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
