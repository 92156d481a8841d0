"""Build the WikiText subject: train the word-level GPT-2 and write its checkpoint folder.

python scripts/train_wikitext.py                 # into $TL_TENSORLENS_CACHE/subjects/wikitext
python scripts/train_wikitext.py --out some/folder --steps 200
"""

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace

from tl_tensorlens.subjects.wikitext import WikiTextConfig, build_wikitext_subject, wikitext_cache_dir


def main(argv: Sequence[str] | None = None) -> int:
    """Train with the documented recipe (or a smaller one) and save model, card and metrics."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", default=None, help=f"checkpoint folder (default: {wikitext_cache_dir()})")
    parser.add_argument("--data", default=None, help="the WikiText-2 raw text file (default: the shared data folder)")
    parser.add_argument("--steps", type=int, default=WikiTextConfig.steps)
    parser.add_argument("--d-model", type=int, default=WikiTextConfig.d_model)
    parser.add_argument("--vocab-size", type=int, default=WikiTextConfig.vocab_size)
    parser.add_argument("--n-ctx", type=int, default=WikiTextConfig.n_ctx)
    parser.add_argument("--eval-windows", type=int, default=WikiTextConfig.eval_windows)
    parser.add_argument("--seed", type=int, default=WikiTextConfig.seed)
    args = parser.parse_args(argv)
    config = replace(
        WikiTextConfig(),
        steps=args.steps,
        d_model=args.d_model,
        vocab_size=args.vocab_size,
        n_ctx=args.n_ctx,
        eval_windows=args.eval_windows,
        eval_every=min(WikiTextConfig.eval_every, args.steps),
        seed=args.seed,
    )
    folder = build_wikitext_subject(args.out, config, path=args.data)
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    print(json.dumps({k: v for k, v in metrics.items() if k != "curve"}, indent=1))
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
