"""Perturbation study (paper Sec. 4.1) from a source checkout; writes docs/perturbation.md.

A thin wrapper over :mod:`tl_tensorlens.studies.perturbation` whose defaults point into this
repository: rows in ``.cache/perturbation`` (resumable), the report in ``docs/perturbation.md``.

Usage:
    python scripts/run_perturbation_study.py --n-sentences 500 --n-norm 100
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runs from the checkout even when the package is not installed
    sys.path.insert(0, str(REPO))

from tl_tensorlens.studies.perturbation import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(repo=REPO))
