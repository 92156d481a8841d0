"""Train the MiniLM sentence-polarity head and write it as a small safetensors file.

python scripts/train_polarity.py --out tl_tensorlens/subjects/checkpoints
"""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from tl_tensorlens.subjects.polarity import PolarityConfig, save_polarity_head, train_polarity


def main(argv: Sequence[str] | None = None) -> int:
    """Compute frozen [CLS] features, fit the head, save it and ``polarity_metrics.json``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for polarity_head.safetensors")
    parser.add_argument("--seed", type=int, default=PolarityConfig.seed)
    parser.add_argument("--n-train", type=int, default=None, help="subsample (tests)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # determinism, and the machine is shared
    head = train_polarity(PolarityConfig(seed=args.seed, n_train=args.n_train))
    out = Path(args.out)
    save_polarity_head(head, out / "polarity_head.safetensors")
    (out / "polarity_metrics.json").write_text(json.dumps(head.metrics, indent=1) + "\n")
    print(json.dumps(head.metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
