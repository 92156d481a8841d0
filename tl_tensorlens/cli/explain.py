"""``tl-tensorlens explain``: a model and a prompt -> a report folder (PNGs, ``index.html``, ``maps.json``).

See :func:`tl_tensorlens.viz.report.explain`. The model is ``default`` (the committed induction
checkpoint, no network needed), a named subject, a local Hugging Face checkpoint folder, or a hub name
(needs the hub). The replay is verified on the prompt first; a model it cannot reproduce exits 2.
Without matplotlib (the ``plot`` extra) it says so before loading the model and writes
``index.html`` and ``maps.json`` without pictures.
"""

import argparse
import sys
from typing import Any

from tl_tensorlens.cli._common import (
    DEFAULT_MODEL,
    DEFAULT_SUBJECT,
    DTYPES,
    existing_folder_or_new,
    load_model,
    parse_ids,
    prompt_tokens,
)
from tl_tensorlens.errors import CliError


def add_parser(sub: Any) -> None:
    e = sub.add_parser("explain", help="a model and a prompt -> report folder (PNGs, HTML, JSON)")
    e.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="'default' (the committed induction model), a subject name, a checkpoint folder, or a hub name",
    )
    e.add_argument("--prompt", default=None, help="text prompt (default: a repeated segment for the induction model)")
    e.add_argument("--tokens", default=None, help="token ids instead of text, e.g. '0 5 17 8'")
    e.add_argument("--out", required=True, help="report folder (created)")
    e.add_argument(
        "--methods",
        default=None,
        help="comma list (see 'tl-tensorlens list methods'); default: tensor maps + three baselines",
    )
    e.add_argument(
        "--position", type=int, default=-1, help="output position the strip and logit lens read (default: last)"
    )
    e.add_argument(
        "--answer",
        default=None,
        help="decoders: an expected answer, e.g. ' Paris': the report gives its rank and probability",
    )
    e.add_argument("--backend", default="auto", choices=["auto", "hooked", "bridge"])
    e.add_argument("--dtype", default="float32", choices=DTYPES)
    e.add_argument("--no-layers", action="store_true", help="skip the per-block maps")
    e.add_argument("--no-heads", action="store_true", help="skip the per-head maps")
    e.add_argument("--no-interactive", action="store_true", help="skip interactive.html (circuitsvis)")
    e.add_argument(
        "--sink",
        default="auto",
        choices=["auto", "first", "include"],
        help="positions drawn apart from the colour scales: 'auto' (default: the first position and every "
        "detected attention sink), 'first', or 'include' (one scale for all); their values stay in maps.json",
    )
    e.add_argument(
        "--top-heads", type=int, default=12, help="heads in the ranked head view (by contribution to the prediction)"
    )
    e.add_argument(
        "--no-verify", action="store_true", help="skip the replay check (the report then says the maps are unverified)"
    )


def run(args: argparse.Namespace) -> int:
    from tl_tensorlens.viz.report import DEFAULT_METHODS, NO_PICTURES_NOTE, explain, resolve_methods

    raw = list(DEFAULT_METHODS) if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = resolve_methods(raw)  # before the (slow) model load
    out = existing_folder_or_new(args.out)
    if args.prompt is not None and args.tokens is not None:
        raise CliError("give --prompt or --tokens, not both")
    if args.prompt is not None and not args.prompt.strip():
        raise CliError("--prompt is empty")
    if args.answer is not None and not args.answer:
        raise CliError("--answer is empty")
    ids = None if args.tokens is None else parse_ids(args.tokens)  # before the (slow) model load
    from tl_tensorlens.viz.plots import has_matplotlib

    pictures = has_matplotlib()  # before the (slow) model load: without it, HTML and JSON only
    if not pictures:
        print(f"note: {NO_PICTURES_NOTE}; writing index.html and maps.json only", file=sys.stderr)
    if args.top_heads < 1:
        raise CliError(f"--top-heads must be at least 1, got {args.top_heads}")
    model, label = load_model(args.model, backend=args.backend, dtype=args.dtype)
    tokens = prompt_tokens(model, args.prompt, ids, args.model in (DEFAULT_MODEL, DEFAULT_SUBJECT))
    n = int(tokens.shape[-1])
    if not -n <= args.position < n:
        raise CliError(f"--position {args.position} out of range for a prompt of {n} tokens")
    rep = explain(
        model,
        tokens,
        out,
        methods=methods,
        position=args.position,
        model_name=label,
        per_layer=not args.no_layers,
        per_head=not args.no_heads,
        interactive=False if args.no_interactive else None,
        verify=not args.no_verify,
        pictures=pictures,
        answer=args.answer,
        sink=args.sink,
        top_heads=args.top_heads,
    )
    print(
        f"{label}: {n} tokens; position {rep.position} ('{rep.tokens[rep.position]}')"
        + (f" predicts '{rep.prediction}'" if rep.prediction else "")
    )
    if args.answer is not None:
        import json

        summary = json.loads((out / "maps.json").read_text()).get("prediction_summary") or {}
        for r in summary.get("answer_ranks", []):
            print(f"answer {r['token']!r}: rank {r['rank']}, prob {100 * r['prob']:.2f}%")
    if rep.sinks:
        print(
            f"drawn apart from the colour scales (--sink {args.sink}): "
            + ", ".join(f"{j} ('{rep.tokens[j]}')" for j in rep.sinks)
        )
    if rep.top_heads:
        print(
            "top heads by contribution to the prediction: "
            + ", ".join(f"L{layer}H{h} {c:+.3g}" for layer, h, c in rep.top_heads[:5])
        )
    for note in rep.notes:
        print(f"note: {note}")
    print(f"wrote {len(rep.files)} files to {out}: {', '.join(rep.files)}")
    return 0
