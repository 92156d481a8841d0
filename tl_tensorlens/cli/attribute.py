"""``tl-tensorlens attribute``: relevance maps of chosen methods for every prompt of a file -> JSONL.

See :func:`tl_tensorlens.evaluation.attribution.attribute`. One output row per (prompt, method), written
through :class:`~tl_tensorlens.evaluation.store.ResultStore`: a rerun skips the rows already there, a
torn last line (a kill mid-write) is cut and recomputed.

Under ``torchrun --nproc-per-node K -m tl_tensorlens attribute ...`` the batches of prompts are
sharded across ranks (batch ``b`` on rank ``b % K``; batches are formed from the whole file, so every
prompt gets the same bits as in one process). Each rank appends to its own part file
``OUT.rank{r}.part`` (no rank ever writes another's file, a killed rank loses nothing another wrote);
at the end rank 0 merges every part into ``OUT`` in prompt order and removes the parts. A rerun (with
any number of ranks) skips the rows found in ``OUT`` and in any leftover part.
"""

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

from tl_tensorlens.cli._common import DTYPES, load_model_and_head
from tl_tensorlens.errors import CliError

KEY_FIELDS = ("model", "dtype", "index", "prompt_sha", "method", "position_arg")

_DESCRIPTION = """\
Compute relevance maps of METHODS for every prompt of FILE and append one JSON row per
(prompt, method) to OUT (JSONL): index, text, tokens, method, position, target, target_label and the
map [pos_out][pos_in] (rows: output positions; NaN written as null).

FILE: one prompt per line (blank lines skipped), or JSONL (a file ending in .jsonl, or whose first
line starts with '{') with a "text" field per line.

Resumable: rows are keyed by model, dtype, prompt index and text hash, method and --position; a rerun
skips rows already in OUT, and a torn last line left by a kill is cut and recomputed.

Batching: prompts of equal token length share one batched capture and, for tensor_in_out and
tensor_in_class, one batched replay (--batch-size, 1 = a per-prompt loop).

Class-specific methods (tensor_in_class, gradient baselines) explain the token the model predicts
at --position (decoders), or the head's predicted class (encoders with a head, e.g. 'polarity').

Several processes: torchrun --nproc-per-node K -m tl_tensorlens attribute ... shards prompt batches
across ranks (gloo on CPU; --device cuda uses NCCL, one GPU per rank); each rank writes
OUT.rank{r}.part and rank 0 merges them into OUT at the end. Results are bit-identical to one process.
"""


def add_parser(sub: Any) -> None:
    a = sub.add_parser(
        "attribute",
        help="maps of chosen methods for every prompt of a file -> JSONL (resumable, torchrun-shardable)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a.add_argument(
        "--model",
        required=True,
        help="a subject name (e.g. induction, minilm, polarity, smollm2), 'default', a checkpoint folder, or a hub name",
    )
    a.add_argument("--prompts", required=True, metavar="FILE", help="one prompt per line, or JSONL with a 'text' field")
    a.add_argument(
        "--methods",
        required=True,
        help="comma list of registered methods (see 'tl-tensorlens list methods'), e.g. tensor_in_out,tensor_in_class",
    )
    a.add_argument("--out", required=True, metavar="OUT.jsonl", help="results file (created; appended to on reruns)")
    a.add_argument(
        "--position",
        type=int,
        default=-1,
        help="output position whose predicted token class-specific methods explain (default: last; decoders)",
    )
    a.add_argument("--batch-size", type=int, default=8, help="equal-length prompts per batched replay (default 8)")
    a.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (under torchrun: cuda:LOCAL_RANK)"
    )
    a.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype (default float32)")
    a.add_argument("--backend", default="auto", choices=["auto", "hooked", "bridge"])
    a.add_argument(
        "--verify",
        action="store_true",
        help="check on every prompt that the frozen replay reproduces the model (a failure exits 2)",
    )
    a.add_argument("--no-progress", action="store_true", help="no progress bar")


def read_prompts(path: str) -> list[str]:
    """Prompts of ``--prompts``: plain lines, or JSONL with a ``text`` field."""
    p = Path(path)
    if not p.is_file():
        raise CliError(f"--prompts {path!r}: no such file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise CliError(f"--prompts {path!r}: not UTF-8 text") from None
    first = next((ln for ln in lines if ln.strip()), "")
    if p.suffix == ".jsonl" or first.lstrip().startswith("{"):
        out = []
        for number, ln in enumerate(lines, start=1):
            if not ln.strip():
                continue
            try:
                row = json.loads(ln)
            except ValueError:
                raise CliError(f"--prompts {path}:{number}: not a JSON object") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
                raise CliError(f"--prompts {path}:{number}: needs a non-empty string field 'text'")
            out.append(row["text"])
    else:
        out = [ln for ln in lines if ln.strip()]
    if not out:
        raise CliError(f"--prompts {path!r}: no prompts")
    return out


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def part_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.name}.rank{rank}.part")


def run(args: argparse.Namespace) -> int:
    from tl_tensorlens import distributed
    from tl_tensorlens.errors import TensorLensError
    from tl_tensorlens.evaluation.attribution import attribute, check_methods
    from tl_tensorlens.evaluation.store import ResultStore

    try:
        methods = check_methods([m.strip() for m in args.methods.split(",") if m.strip()])
    except TensorLensError as e:
        raise CliError(f"--methods: {e}") from None
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.out)
    if out.exists() and not out.is_file():
        raise CliError(f"--out {args.out!r} exists and is not a file")
    prompts = read_prompts(args.prompts)
    own_group = not distributed.is_initialized()  # a caller's process group is left to the caller
    rank, world = distributed.init_from_env(args.device)
    device = distributed.local_device(args.device)
    model, label, head = load_model_and_head(args.model, backend=args.backend, dtype=args.dtype, device=device)

    def keyed(index: int, method: str) -> dict[str, Any]:
        return {
            "model": label,
            "dtype": args.dtype,
            "index": index,
            "prompt_sha": _sha(prompts[index]),
            "method": method,
            "position_arg": args.position,
        }

    main_store = ResultStore(out, KEY_FIELDS)
    parts = sorted(out.parent.glob(f"{out.name}.rank*.part")) if out.parent.exists() else []
    done_stores = [main_store, *(ResultStore(p, KEY_FIELDS) for p in parts)]
    distributed.barrier()  # every rank has read (and repaired) the files before anyone appends
    mine = main_store if world == 1 else ResultStore(part_path(out, rank), KEY_FIELDS)

    def skip(index: int, method: str) -> bool:
        key = main_store.key(keyed(index, method))
        return any(s.has(key) for s in done_stores) or mine.has(key)

    n_new = 0
    for res in attribute(
        model,
        prompts,
        methods,
        position=args.position,
        head=head,
        batch_size=args.batch_size,
        skip=skip,
        shard=(rank, world),
        verify=args.verify,
        progress=False if args.no_progress or rank else None,
    ):
        mine.append([{**keyed(res.index, res.method), **res.to_row()}])
        n_new += 1
    distributed.barrier()
    if rank == 0:
        # Every part (this run's, and any a killed run left) goes into OUT, in prompt order.
        leftover = sorted(out.parent.glob(f"{out.name}.rank*.part")) if out.parent.exists() else []
        rows = [r for p in leftover for r in ResultStore(p, KEY_FIELDS).rows]
        order = {m: k for k, m in enumerate(methods)}
        rows.sort(key=lambda r: (r["index"], order.get(r["method"], len(order))))
        main_store.append(rows)
        for p in leftover:
            p.unlink()
        print(
            f"{label}: {len(prompts)} prompts x {len(methods)} methods on {world} rank(s); "
            f"{n_new} new rows here, {len(ResultStore(out, KEY_FIELDS))} rows in {out}"
        )
    distributed.barrier()
    if own_group:
        distributed.shutdown()
    return 0
