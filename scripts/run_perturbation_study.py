"""Perturbation study (paper Sec. 4.1) from a source checkout; writes docs/perturbation.md.

A thin wrapper over :mod:`tl_tensorlens.studies.perturbation` that passes this repository's paths:
rows in ``.cache/perturbation`` (resumable), the report in ``docs/perturbation.md``, the data in
``../shared/data`` (unless ``TL_TENSORLENS_DATA`` is set). The package itself knows no checkout.

Usage:
    python scripts/run_perturbation_study.py --n-sentences 500 --n-norm 100
"""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runs from the checkout even when the package is not installed
    sys.path.insert(0, str(REPO))

from tl_tensorlens.studies.perturbation import main  # noqa: E402


def _with_default(argv: list[str], flag: str, value: str) -> list[str]:
    return argv if any(a == flag or a.startswith(flag + "=") for a in argv) else [*argv, flag, value]


if __name__ == "__main__":
    os.environ.setdefault("TL_TENSORLENS_DATA", str(REPO.parent / "shared" / "data"))
    argv = _with_default(sys.argv[1:], "--work-dir", str(REPO / ".cache" / "perturbation"))
    argv = _with_default(argv, "--docs", str(REPO / "docs" / "perturbation.md"))
    sys.exit(main(argv, prog="python scripts/run_perturbation_study.py"))
