"""The ``tl-tensorlens`` command (also ``python -m tl_tensorlens``), one module per command.

* ``explain`` (:mod:`~tl_tensorlens.cli.explain`): a model and a prompt -> a report folder;
* ``attribute`` (:mod:`~tl_tensorlens.cli.attribute`): a prompt file and methods -> a JSONL of maps,
  resumable, shardable with ``torchrun``;
* ``perturb``, ``relations`` (:mod:`~tl_tensorlens.cli.studies`): the paper's studies, resumable;
* ``list`` (:mod:`~tl_tensorlens.cli.listing`): relevance methods and models.

Every user mistake (bad argument, unknown model or method, prompt longer than the context, a model the
replay cannot reproduce) exits with status 2 and one line on stderr, no traceback; files are written
only under ``--out``.
"""

import os
import sys
from collections.abc import Sequence
from typing import Any

from tl_tensorlens import __version__
from tl_tensorlens.cli import attribute, explain, listing, studies
from tl_tensorlens.cli._common import DEFAULT_PROMPT, PROG, Parser, load_model
from tl_tensorlens.errors import CliError, TensorLensError

COMMANDS = ("explain", "attribute", "perturb", "relations", "list")


def _parser() -> Parser:
    p = Parser(
        prog=PROG,
        description="TensorLens for TransformerLens: explain a prompt through the model's exact linear operator.",
    )
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub: Any = p.add_subparsers(dest="command", parser_class=Parser, metavar="{" + ",".join(COMMANDS) + "}")
    explain.add_parser(sub)
    attribute.add_parser(sub)
    studies.add_parsers(sub)
    listing.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 user error).

    Example:
        >>> main(["list", "models"])  # doctest: +ELLIPSIS
        models:
        ...
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as e:  # --help / --version printed and asked to exit
            return int(e.code or 0) if not isinstance(e.code, str) else 2
        if args.command is None:
            raise CliError(f"{PROG}: choose a command: {', '.join(COMMANDS)} (see --help)")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if args.command == "explain":
            return explain.run(args)
        if args.command == "attribute":
            return attribute.run(args)
        if args.command in ("perturb", "relations"):
            return studies.run(args)
        return listing.run(args)
    except TensorLensError as e:
        msg = " ".join(str(e).split())
        print(msg if msg.startswith(PROG) else f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def console_main() -> None:
    """Entry point of the ``tl-tensorlens`` console script."""
    sys.exit(main())


__all__ = ["CliError", "DEFAULT_PROMPT", "console_main", "load_model", "main"]
