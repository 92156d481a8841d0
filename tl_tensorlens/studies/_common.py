"""What the studies share: argument types that refuse bad values in one line, and the Markdown block
a study rewrites in its report (atomically; a block torn by a crash is repaired)."""

import argparse
import os
import re
from pathlib import Path


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: expected an integer >= 1")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: expected an integer >= 0")
    return value


def fractions(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated fractions, increasing, within [0, 1]."""
    try:
        values = tuple(float(f) for f in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers such as 0,0.1,0.2") from None
    if not values or any(b <= a for a, b in zip(values, values[1:], strict=False)) or values[0] < 0 or values[-1] > 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected increasing fractions within [0, 1]")
    return values


def replace_block(path: Path, start: str, end: str, body: str, *, title: str = "") -> None:
    """Put ``body`` between the markers ``start`` and ``end`` of the Markdown file ``path``.

    The rest of the file is kept. A block whose end marker is missing (a write interrupted by a
    crash, or a hand edit) is repaired: everything from the start marker on is replaced. The file is
    written to a temporary name and renamed, so a kill never leaves half a report.
    """
    text = path.read_text(encoding="utf-8") if path.exists() else (f"# {title}\n\n" if title else "")
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text.split(start, 1)[1]:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, count=1, flags=re.S)
    elif start in text:
        text = text.split(start, 1)[0] + block + "\n"
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + block + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
