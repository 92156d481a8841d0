"""Quick start: explain a prompt with the embedded default model (the README's main job).

Runs ``tl-tensorlens explain`` in-process on the committed induction model (a 2-layer GPT-2
trained to copy repeated segments; no network needed) and writes the report folder: PNGs,
``index.html`` and ``maps.json``. Open ``index.html`` in a browser.

    python demos/quickstart.py                 # -> out/quickstart
    python demos/quickstart.py --out /tmp/r --prompt "<bos> t01 t02 t03 t01 t02"
"""

import argparse
import sys
from collections.abc import Sequence

from tl_tensorlens.cli import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the demo's arguments and run the explain job; returns the exit status."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", default="out/quickstart", help="report folder")
    p.add_argument("--prompt", default=None, help="prompt for the induction model (default: a repeated segment)")
    p.add_argument("--quick", action="store_true", help="skip the per-head grid (tests)")
    args = p.parse_args(argv)
    cli = ["explain", "--out", args.out]
    if args.prompt:
        cli += ["--prompt", args.prompt]
    if args.quick:
        cli += ["--no-heads", "--methods", "tensor_in_out,tensor_in_class,attn_rollout"]
    return cli_main(cli)


if __name__ == "__main__":
    sys.exit(main())
