"""Train the induction subject and write it as a Hugging Face checkpoint folder.

python scripts/train_induction.py --out tl_tensorlens/subjects/checkpoints/induction
"""

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from tl_tensorlens.subjects._training import save_checkpoint
from tl_tensorlens.subjects.induction import InductionConfig, induction_card, train_induction


def main(argv: Sequence[str] | None = None) -> int:
    """Train with the committed recipe (or a smaller one) and save model, card and metrics."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--steps", type=int, default=InductionConfig.steps)
    parser.add_argument("--d-model", type=int, default=InductionConfig.d_model)
    parser.add_argument("--seed", type=int, default=InductionConfig.seed)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # determinism, and the machine is shared
    config = InductionConfig(steps=args.steps, d_model=args.d_model, seed=args.seed)
    result = train_induction(config)
    metrics = {**result.metrics, "curve": result.log.curve}
    save_checkpoint(args.out, result.model, result.tokenizer, metrics=metrics, card=induction_card(result))
    print(json.dumps(result.metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
