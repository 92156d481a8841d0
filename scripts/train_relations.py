"""Train the relation subject and write it as a Hugging Face checkpoint folder.

python scripts/train_relations.py --out tl_tensorlens/subjects/checkpoints/relations
"""

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from tl_tensorlens.subjects._training import save_checkpoint
from tl_tensorlens.subjects.relation_model import (
    RelationConfig,
    relation_card,
    relation_specs,
    train_relations,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Train with the committed recipe (or a smaller one); save model, facts, card, metrics."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--steps", type=int, default=RelationConfig.steps)
    parser.add_argument("--seed", type=int, default=RelationConfig.seed)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # determinism, and the machine is shared
    result = train_relations(RelationConfig(steps=args.steps, seed=args.seed))
    specs = relation_specs(result.facts)
    extra = {f"relations/{spec['name'].replace(' ', '_')}.json": spec for spec in specs}
    save_checkpoint(
        args.out,
        result.model,
        result.tokenizer,
        metrics={**result.metrics, "curve": result.log.curve},
        card=relation_card(result),
        extra_json=extra,
    )
    print(json.dumps(result.metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
