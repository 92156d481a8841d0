"""Relation decoding study (paper Sec. 4.2) from a source checkout.

A thin wrapper over :mod:`tl_tensorlens.studies.relations` (same arguments; see its docstring for
examples) that points ``TL_TENSORLENS_DATA`` at ``../shared/data`` unless it is set; ``--update-doc``
records the command as this script.

Usage:
    python scripts/run_relations_study.py --model subject:relations --relations subject \\
        --results results/relations_subject.jsonl --update-doc docs/relations.md
"""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runs from the checkout even when the package is not installed
    sys.path.insert(0, str(REPO))

from tl_tensorlens.studies.relations import main  # noqa: E402

if __name__ == "__main__":
    os.environ.setdefault("TL_TENSORLENS_DATA", str(REPO.parent / "shared" / "data"))
    sys.exit(main(prog="python scripts/run_relations_study.py"))
