"""``tl-tensorlens perturb`` and ``tl-tensorlens relations``: the paper's studies, resumable, every file
under ``--out`` (arguments after ``--`` go to :mod:`tl_tensorlens.studies.perturbation` /
:mod:`tl_tensorlens.studies.relations` unchanged)."""

import argparse
import contextlib
import io
from typing import Any

from tl_tensorlens.cli._common import existing_folder_or_new
from tl_tensorlens.errors import CliError

STUDIES = (
    ("perturb", "perturbation study (Sec. 4.1)", "perturbation"),
    ("relations", "relation-decoding study (Sec. 4.2)", "relations"),
)


def add_parsers(sub: Any) -> None:
    for name, what, module in STUDIES:
        s = sub.add_parser(
            name,
            help=f"the {what}; extra arguments go to the study",
            description=f"Run the {what}. Arguments after '--' are passed to "
            f"'python -m tl_tensorlens.studies.{module}' unchanged.",
        )
        s.add_argument("--out", required=True, help="folder for the study's results (resumable)")
        s.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
        s.add_argument("study_args", nargs=argparse.REMAINDER, help="arguments for the study (after '--')")


_QUICK = {
    "perturb": ["--subjects", "induction", "--n-decoder", "4", "--n-bootstrap", "20", "--no-progress"],
    "relations": [
        "--model",
        "subject:relations",
        "--relations",
        "subject",
        "--n-train",
        "3",
        "--n-splits",
        "1",
        "--max-test",
        "4",
        "--betas",
        "1.0",
        "--no-progress",
    ],
}
# Flags through which the studies would write outside --out; the command sets them itself.
_OWNED = {
    "perturb": ("--work-dir", "--docs"),
    "relations": ("--results", "--table", "--plot", "--update-doc"),
}


def run(args: argparse.Namespace) -> int:
    from tl_tensorlens.studies import perturbation, relations

    extra = list(args.study_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    owned = [f for f in _OWNED[args.command] if any(a == f or a.startswith(f + "=") for a in extra)]
    if owned:
        raise CliError(f"{args.command}: {', '.join(owned)} is set by --out here; remove it")
    out = existing_folder_or_new(args.out)
    if args.command == "perturb":
        fixed = ["--work-dir", str(out), "--docs", str(out / "perturbation.md")]
        study = perturbation
    else:
        fixed = [
            "--results",
            str(out / "relations.jsonl"),
            "--table",
            str(out / "relations.md"),
            "--plot",
            str(out / "relations.png"),
        ]
        study = relations
    argv = (_QUICK[args.command] if args.quick else []) + extra + fixed
    _validate_study_args(study.build_parser(), argv, args.command)
    out.mkdir(parents=True, exist_ok=True)
    try:
        code = study.main(argv)
    except SystemExit as e:  # the study stopped itself with a message (e.g. inconsistent options)
        if isinstance(e.code, str):
            raise CliError(f"{args.command}: {e.code}") from None
        code = e.code
    return int(code or 0)


def _validate_study_args(parser: argparse.ArgumentParser, argv: list[str], command: str) -> None:
    """Parse the study's arguments first, turning its argparse usage dump into one line."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            parser.parse_args(argv)
    except SystemExit as e:
        if e.code:
            lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
            reason = lines[-1].split("error:", 1)[-1].strip() if lines else "invalid arguments"
            raise CliError(f"{command}: {reason}") from None
