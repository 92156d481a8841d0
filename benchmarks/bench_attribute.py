"""Prompts per second of dataset-level attribution: per-prompt loop vs batched vs K ranks, side by side.

For each subject and each map (``tensor_in_out``, and the class map ``tensor_in_class``: the predicted
next token for decoders, the polarity head's predicted class for the MiniLM encoder), the same ``N``
random prompts of one token length are attributed with :func:`tl_tensorlens.evaluation.attribution.attribute`:

* ``loop``: ``batch_size=1`` (one capture and one replay per prompt, what every study did before);
* ``batched``: ``batch_size=B`` (one batched capture and one batched replay per ``B`` prompts);
* ``ranks``: ``batch_size=B`` sharded over ``K`` processes by ``torch.distributed.run`` (gloo, CPU);
  timed from a barrier after model loading to a barrier after the last rank finished, so process
  start and model loading are not counted (they are paid once per run, not per prompt).

Only ratios within one run mean anything on a shared machine. Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_attribute.py --size small --out bench_attribute.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SIZES = {"tiny": dict(n=6, length=8, batch=3), "small": dict(n=16, length=12, batch=8)}
MAPS = ("tensor_in_out", "tensor_in_class")


def load(subject: str) -> tuple[Any, Any]:
    from tl_tensorlens.subjects import load_subject

    s = load_subject(subject, backend="bridge", dtype=torch.float32)
    return s.model, s.head


def make_prompts(model: Any, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """``n`` random prompts of ``length`` tokens: BOS (decoders) or [CLS] ... [SEP] (encoders) around
    ordinary vocabulary ids."""
    tok = model.tokenizer
    gen = torch.Generator().manual_seed(seed)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(min(int(model.cfg.d_vocab), 5000)) if i not in special]
    cls, sep = getattr(tok, "cls_token_id", None), getattr(tok, "sep_token_id", None)
    prompts = []
    for _ in range(n):
        if cls is not None and sep is not None:
            body = [vocab[int(j)] for j in torch.randint(len(vocab), (length - 2,), generator=gen)]
            prompts.append([cls, *body, sep])
        else:
            body = [vocab[int(j)] for j in torch.randint(len(vocab), (length - 1,), generator=gen)]
            prompts.append([int(tok.bos_token_id), *body])
    return prompts


def timed(model: Any, head: Any, prompts: list[list[int]], method: str, batch: int, shard: Any = None) -> float:
    from tl_tensorlens.evaluation.attribution import attribute

    t0 = time.perf_counter()
    for _ in attribute(model, prompts, [method], head=head, batch_size=batch, shard=shard, progress=False):
        pass
    return time.perf_counter() - t0


def worker(args: argparse.Namespace) -> None:
    """One rank of the ``ranks`` measurement (run by torch.distributed.run)."""
    from tl_tensorlens import distributed

    rank, world = distributed.init_from_env()
    model, head = load(args.subject)
    size = SIZES[args.size]
    prompts = make_prompts(model, size["n"], size["length"])
    timed(model, head, prompts[:1], args.method, 1)  # warm-up
    distributed.barrier()
    t0 = time.perf_counter()
    timed(model, head, prompts, args.method, size["batch"], shard=(rank, world))
    distributed.barrier()
    wall = time.perf_counter() - t0
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps({"seconds": wall, "ranks": world}))
    distributed.shutdown()


def ranks_seconds(subject: str, method: str, size: str, k: int) -> float | None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "w.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(k)]
        cmd += [__file__, "--worker", "--subject", subject, "--method", method, "--size", size]
        cmd += ["--worker-out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0 or not out.exists():
            print(proc.stderr[-2000:], file=sys.stderr)
            return None
        return float(json.loads(out.read_text())["seconds"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--subjects", default="induction,polarity", help="comma list of subjects (default induction,polarity)"
    )
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--ranks", type=int, default=2, help="processes of the sharded measurement (0: skip it)")
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--subject", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    size = SIZES[args.size]
    results = []
    for subject in [s.strip() for s in args.subjects.split(",") if s.strip()]:
        model, head = load(subject)
        prompts = make_prompts(model, size["n"], size["length"])
        for method in MAPS:
            timed(model, head, prompts[:1], method, 1)  # warm-up
            loop = timed(model, head, prompts, method, 1)
            batched = timed(model, head, prompts, method, size["batch"])
            ranks = ranks_seconds(subject, method, args.size, args.ranks) if args.ranks > 1 else None
            n = size["n"]
            row = {
                "subject": subject,
                "map": method,
                "prompts": n,
                "tokens": size["length"],
                "batch_size": size["batch"],
                "loop_prompts_per_s": n / loop,
                "batched_prompts_per_s": n / batched,
                "ranks": args.ranks if ranks else None,
                "ranks_prompts_per_s": None if ranks is None else n / ranks,
                "batched_vs_loop": loop / batched,
                "ranks_vs_loop": None if ranks is None else loop / ranks,
            }
            results.append(row)
            print(json.dumps(row), flush=True)
        del model
    header = f"| subject | map | loop p/s | batched p/s | {args.ranks} ranks p/s | batched ÷ loop | ranks ÷ loop |"
    print("\n" + header + "\n|" + "---|" * 7)
    for r in results:
        rk = "—" if r["ranks_prompts_per_s"] is None else f"{r['ranks_prompts_per_s']:.2f}"
        rr = "—" if r["ranks_vs_loop"] is None else f"{r['ranks_vs_loop']:.2f}×"
        print(
            f"| {r['subject']} | {r['map']} | {r['loop_prompts_per_s']:.2f} | {r['batched_prompts_per_s']:.2f} | "
            f"{rk} | {r['batched_vs_loop']:.2f}× | {rr} |"
        )
    meta = {
        "size": args.size,
        **size,
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "note": "shared machine: only ratios measured side by side in one run are meaningful",
    }
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
