"""``tl-tensorlens list``: relevance methods and models."""

import argparse
from typing import Any

from tl_tensorlens.cli._common import DEFAULT_MODEL, DEFAULT_SUBJECT


def add_parser(sub: Any) -> None:
    li = sub.add_parser("list", help="relevance methods and models")
    li.add_argument("what", nargs="?", default="all", choices=["all", "methods", "models"])


def run(args: argparse.Namespace) -> int:
    if args.what in ("all", "methods"):
        from tl_tensorlens.methods import list_methods, method_info

        print("methods:")
        for m in list_methods():
            info = method_info(m)
            tag = "class-specific" if info.class_specific else info.family
            print(f"  {m:24s} [{tag}] {info.description}")
    if args.what in ("all", "models"):
        from tl_tensorlens.subjects import list_subjects

        print("models:")
        print(f"  {DEFAULT_MODEL:24s} = {DEFAULT_SUBJECT} (used when --model is omitted)")
        for s in list_subjects():
            print(f"  {s.name:24s} {s.description}")
        print("  <folder>                 a local Hugging Face checkpoint folder (config.json + weights)")
        print("  <hub name>               a TransformerLens / Hugging Face name (needs the hub)")
    return 0
