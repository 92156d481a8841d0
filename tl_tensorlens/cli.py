"""The ``tl-tensorlens`` command (also ``python -m tl_tensorlens``).

Subcommands:

* ``explain``: a model and a prompt -> a report folder (PNGs, ``index.html``, ``maps.json``);
  see :func:`tl_tensorlens.report.explain`. The model is ``default`` (the committed induction
  checkpoint, no network needed), a named subject (``induction``, ``relations``, ``minilm``), a
  local Hugging Face checkpoint folder, or a hub name (needs the hub).
* ``perturb``: the perturbation study (paper Sec. 4.1), resumable; forwards to
  :mod:`tl_tensorlens.studies.perturbation` with its work folder under ``--out``.
* ``relations``: the relation-decoding study (Sec. 4.2), resumable; forwards to
  :mod:`tl_tensorlens.studies.relations` with its results under ``--out``.
* ``list``: relevance methods and models.

Every user mistake (bad argument, unknown model or method, prompt longer than the context) exits
with status 2 and one line on stderr, no traceback; files are written only under ``--out``.
"""

import argparse
import contextlib
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from tl_tensorlens.errors import TensorLensError

PROG = "tl-tensorlens"
DEFAULT_MODEL = "default"
#: The subject ``default`` stands for: a 2-layer GPT-2 trained on induction (committed checkpoint).
DEFAULT_SUBJECT = "induction"
#: The default prompt: ``<bos> A A[:-1]`` for a 7-token segment A of the induction vocabulary, so the
#: last position's answer (t27) is decided by induction.
DEFAULT_PROMPT = "<bos> t83 t94 t12 t35 t43 t80 t27 t83 t94 t12 t35 t43 t80"
_DTYPES = ("float32", "float64")


class CliError(TensorLensError):
    """A user mistake on the command line (printed as one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so every error is one line."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{self.prog}: {message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="TensorLens for TransformerLens: explain a prompt through the model's exact linear operator.",
    )
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="{explain,perturb,relations,list}")

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
        help="comma list (see 'tl-tensorlens list methods'); default: tensor maps + two baselines",
    )
    e.add_argument(
        "--position", type=int, default=-1, help="output position the strip and logit lens read (default: last)"
    )
    e.add_argument("--backend", default="auto", choices=["auto", "hooked", "bridge"])
    e.add_argument("--dtype", default="float32", choices=_DTYPES)
    e.add_argument("--no-layers", action="store_true", help="skip the per-block maps")
    e.add_argument("--no-heads", action="store_true", help="skip the per-head maps")
    e.add_argument("--no-interactive", action="store_true", help="skip interactive.html (circuitsvis)")

    for name, what, module in (
        ("perturb", "perturbation study (Sec. 4.1)", "perturbation"),
        ("relations", "relation-decoding study (Sec. 4.2)", "relations"),
    ):
        s = sub.add_parser(
            name,
            help=f"the {what}; extra arguments go to the study",
            description=f"Run the {what}. Arguments after '--' are passed to "
            f"'python -m tl_tensorlens.studies.{module}' unchanged.",
        )
        s.add_argument("--out", required=True, help="folder for the study's results (resumable)")
        s.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
        s.add_argument("study_args", nargs=argparse.REMAINDER, help="arguments for the study (after '--')")

    li = sub.add_parser("list", help="relevance methods and models")
    li.add_argument("what", nargs="?", default="all", choices=["all", "methods", "models"])
    return p


# ------------------------------------------------------------------------------------------ models


def _dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "float64": torch.float64}[name]


def _subject_names() -> list[str]:
    from tl_tensorlens.subjects import list_subjects

    return [s.name for s in list_subjects()]


def load_model(name: str, *, backend: str = "auto", dtype: str = "float32") -> tuple[Any, str]:
    """Resolve ``--model``: ``default``, a subject name, a checkpoint folder, or a hub name.

    Returns:
        ``(model, label)``.

    Raises:
        CliError: the name is none of these.
    """
    from tl_tensorlens.subjects import load_local, load_subject

    if name in (DEFAULT_MODEL, *_subject_names()):
        subject = DEFAULT_SUBJECT if name == DEFAULT_MODEL else name
        loaded = load_subject(subject, backend=backend, dtype=_dtype(dtype))  # type: ignore[arg-type]
        return loaded.model, subject
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CliError(f"--model {name!r}: a folder but not a checkpoint (no config.json)")
        return load_local(path, backend=backend, dtype=_dtype(dtype)), path.name  # type: ignore[arg-type]
    return _load_hub(name, backend, dtype), name


def _load_hub(name: str, backend: str, dtype: str) -> Any:
    """A hub model through TransformerLens (only for names TL knows; needs the network or a cache)."""
    from tl_tensorlens._compat import has_hooked_transformer

    known_hint = f"run '{PROG} list models' for built-in names, or pass a checkpoint folder"
    use_hooked = has_hooked_transformer() and backend in ("auto", "hooked")
    if use_hooked:
        from transformer_lens import loading_from_pretrained

        try:
            official = loading_from_pretrained.get_official_model_name(name)
        except ValueError:
            raise CliError(
                f"unknown model {name!r}: not a built-in name, not a folder, not a TransformerLens model name; {known_hint}"
            ) from None
        from transformer_lens import HookedTransformer

        try:
            return HookedTransformer.from_pretrained_no_processing(official, dtype=_dtype(dtype)).eval()
        except OSError as e:
            raise CliError(
                f"model {name!r} could not be loaded from the Hugging Face hub (offline?): {str(e).splitlines()[0]}"
            ) from None
    if "/" not in name and not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise CliError(f"unknown model {name!r}; {known_hint}")
    try:
        from transformer_lens.model_bridge import TransformerBridge

        return TransformerBridge.boot_transformers(name, dtype=_dtype(dtype)).eval()
    except (OSError, ValueError, KeyError) as e:
        raise CliError(
            f"unknown model {name!r} (not built in, not a folder, and the hub gave: {str(e).splitlines()[0]}); {known_hint}"
        ) from None


def _parse_ids(tokens: str) -> list[int]:
    try:
        ids = [int(t) for t in tokens.replace(",", " ").split()]
    except ValueError:
        raise CliError(f"--tokens must be integers separated by spaces or commas, got {tokens!r}") from None
    if not ids:
        raise CliError("--tokens is empty")
    return ids


def _prompt_tokens(model: Any, prompt: str | None, ids: list[int] | None, is_default: bool) -> Any:
    import torch

    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
    d_vocab = int(model.cfg.d_vocab)
    if ids is not None:
        bad = [i for i in ids if not 0 <= i < d_vocab]
        if bad:
            raise CliError(f"--tokens: ids {bad[:5]} outside the vocabulary 0..{d_vocab - 1}")
        out = torch.tensor([ids])
    else:
        if prompt is None:
            if not is_default:
                raise CliError("--prompt (or --tokens) is required for this model")
            prompt = DEFAULT_PROMPT
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            raise CliError("this model has no tokenizer; pass --tokens")
        bos = getattr(tok, "bos_token", None)
        # A prompt that already starts with BOS (the induction format) must not get a second one.
        prepend = bool(bos) and not prompt.lstrip().startswith(bos)
        out = (
            model.to_tokens(prompt, prepend_bos=prepend, truncate=False)
            if hasattr(model, "to_tokens")
            else torch.tensor([tok.encode(prompt)])
        )
    if n_ctx and out.shape[-1] > n_ctx:
        raise CliError(f"the prompt has {out.shape[-1]} tokens, longer than the model's context n_ctx={n_ctx}")
    return out


# --------------------------------------------------------------------------------------- commands


def _cmd_explain(args: argparse.Namespace) -> int:
    from tl_tensorlens.report import DEFAULT_METHODS, available_methods, explain

    known = available_methods()
    methods = (
        list(DEFAULT_METHODS) if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    )
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise CliError(f"--methods: unknown {unknown or 'empty list'}; choose from {', '.join(known)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {args.out!r} exists and is not a folder")
    if args.prompt is not None and args.tokens is not None:
        raise CliError("give --prompt or --tokens, not both")
    if args.prompt is not None and not args.prompt.strip():
        raise CliError("--prompt is empty")
    ids = None if args.tokens is None else _parse_ids(args.tokens)  # before the (slow) model load
    model, label = load_model(args.model, backend=args.backend, dtype=args.dtype)
    tokens = _prompt_tokens(model, args.prompt, ids, args.model in (DEFAULT_MODEL, DEFAULT_SUBJECT))
    n = int(tokens.shape[-1])
    if not -n <= args.position < n:
        raise CliError(f"--position {args.position} out of range for a prompt of {n} tokens")
    if getattr(model.cfg, "attention_dir", "causal") == "bidirectional":
        methods = [m for m in methods if m != "tensor_logit"]
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
    )
    print(
        f"{label}: {n} tokens; position {rep.position} ('{rep.tokens[rep.position]}')"
        + (f" predicts '{rep.prediction}'" if rep.prediction else "")
    )
    for note in rep.notes:
        print(f"note: {note}")
    print(f"wrote {len(rep.files)} files to {out}: {', '.join(rep.files)}")
    return 0


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


def _cmd_study(args: argparse.Namespace) -> int:
    from tl_tensorlens.studies import perturbation, relations

    extra = list(args.study_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    owned = [f for f in _OWNED[args.command] if any(a == f or a.startswith(f + "=") for a in extra)]
    if owned:
        raise CliError(f"{args.command}: {', '.join(owned)} is set by --out here; remove it")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {args.out!r} exists and is not a folder")
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


def _cmd_list(args: argparse.Namespace) -> int:
    if args.what in ("all", "methods"):
        from tl_tensorlens.report import TENSOR_MAPS, available_methods

        print("methods:")
        descriptions: dict[str, str] = {
            "tensor_norm": "TensorLens Norm collapse ‖T[i,:,j,:]‖_F (Eq. 21)",
            "tensor_in_out": "TensorLens In+Out collapse (Eq. 22-23)",
            "tensor_logit": "TensorLens class-specific collapse for the model's own prediction (Eq. 24)",
        }
        try:
            from tl_tensorlens.baselines import method_info

            for m in available_methods():
                if m not in TENSOR_MAPS:
                    descriptions[m] = method_info(m).description
        except ImportError:
            pass
        for m in available_methods():
            print(f"  {m:24s} {descriptions.get(m, '')}")
    if args.what in ("all", "models"):
        from tl_tensorlens.subjects import list_subjects

        print("models:")
        print(f"  {DEFAULT_MODEL:24s} = {DEFAULT_SUBJECT} (used when --model is omitted)")
        for s in list_subjects():
            print(f"  {s.name:24s} {s.description}")
        print("  <folder>                 a local Hugging Face checkpoint folder (config.json + weights)")
        print("  <hub name>               a TransformerLens / Hugging Face name (needs the hub)")
    return 0


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
            raise CliError(f"{PROG}: choose a command: explain, perturb, relations, list (see --help)")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if args.command == "explain":
            return _cmd_explain(args)
        if args.command in ("perturb", "relations"):
            return _cmd_study(args)
        return _cmd_list(args)
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
