"""The memory budget, checked against reality: the engine's planned peak vs the measured peak RSS.

Every lens path that allocates in proportion to its work plans its chunks from a memory model
(:meth:`tl_tensorlens.engine.Engine.item_bytes`: one replay item with its graph, plus the chunk's
cotangents / tangents and the result). This script runs each path under a budget small enough that it
must chunk, records the largest peak the engine admitted (``Engine.planned_peak``: result + kept graph
+ one chunk) and the peak resident set size measured above the baseline (sampled every millisecond by
``bench_tensors.measure``), and prints their ratio. Target: measured / planned within [1/1.5, 1.5]
(the estimate neither hides a 1.5x overshoot nor wastes more than a third of the budget).

Usage::

    python benchmarks/bench_memory.py --out benchmarks/results_memory.json            # d256, 4 layers, 64 tokens
    python benchmarks/bench_memory.py --size tiny --out /tmp/m.json                    # seconds (the smoke test)

Memory is measured as RSS: torch's CPU allocator returns large blocks to the OS, and each call starts
after ``gc.collect()`` + ``malloc_trim``. Paths below a few MiB are dominated by allocator noise, so the
budgets are sized to make every planned peak at least ~50 MiB at ``--size small``.
"""

import argparse
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tensors import Case, build_model, measure  # noqa: E402 - sibling script

from tl_tensorlens import TensorLens  # noqa: E402
from tl_tensorlens.engine import format_bytes  # noqa: E402

TOLERANCE = 1.5


def paths(
    lens_for: Callable[..., TensorLens], n: int, big: str
) -> dict[str, tuple[TensorLens, Callable[[TensorLens], Any]]]:
    """The measured calls, each on its own lens (so ``planned_peak`` covers that call only); the
    whole tensor gets the larger budget ``big`` (its result alone is ``n² d²`` floats)."""
    last = n - 1
    return {
        "slice(last)": (lens_for("resid_post"), lambda L: L.slice(last)),
        "full()": (lens_for("resid_post", big), lambda L: L.full()),
        "full(method='forward')": (lens_for("resid_post", big), lambda L: L.full(method="forward")),
        "contributions()": (lens_for("resid_post"), lambda L: L.contributions()),
        "collapse('norm')": (lens_for("resid_post"), lambda L: L.collapse("norm")),
        "collapse('in_out')": (lens_for("resid_post"), lambda L: L.collapse("in_out")),
        "collapse('in_class') @logits": (lens_for("logits"), lambda L: L.collapse("in_class", token=3)),
        "collapse_randomized_norm(64)": (lens_for("resid_post"), lambda L: L.collapse_randomized_norm(64)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--size", choices=("tiny", "small"), default="small")
    p.add_argument("--budget", default=None, help="memory budget per call (default: 8MiB tiny, 64MiB small)")
    p.add_argument("--full-budget", default=None, help="budget of full() (default: 16MiB tiny, 384MiB small)")
    p.add_argument("--backend", choices=("hooked", "bridge", "auto"), default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.size == "tiny":
        case = Case("tiny", n_layers=2, d_model=32, n_heads=4, d_mlp=128, n_pos=8, d_vocab=101)
        budget, big = args.budget or "8MiB", args.full_budget or "16MiB"
    else:
        case = Case("d256-L4-N32", n_layers=4, d_model=256, n_heads=8, d_mlp=1024, n_pos=32, d_vocab=2000)
        budget, big = args.budget or "64MiB", args.full_budget or "384MiB"
    from tl_tensorlens._backend import has_hooked_transformer

    backend = args.backend if args.backend != "auto" else ("hooked" if has_hooked_transformer() else "bridge")
    model = build_model(case, backend)
    tokens = torch.randint(0, case.d_vocab, (case.n_pos,), generator=torch.Generator().manual_seed(0))

    def lens_for(output: Any, budget: str = budget) -> TensorLens:
        return TensorLens.from_model(model, tokens, output=output, memory_budget=budget, verify=False, progress=False)

    rows = []
    print(f"{case.name} ({backend}, float32), budget {budget} (full(): {big}), {args.threads} thread(s)")
    print(f"{'path':32} {'planned':>10} {'measured':>10} {'ratio':>6}  ok")
    for name, (lens, call) in paths(lens_for, case.n_pos, big).items():
        lens.engine.planned_peak = 0
        m = measure(lambda lens=lens, call=call: call(lens))
        planned = lens.engine.planned_peak
        ratio = m.peak_bytes / planned if planned else float("nan")
        ok = planned > 0 and 1 / TOLERANCE <= ratio <= TOLERANCE
        rows.append(
            {
                "path": name,
                "planned_bytes": planned,
                "measured_peak_bytes": m.peak_bytes,
                "ratio": ratio,
                "ok": ok,
                "seconds": m.seconds,
            }
        )
        print(
            f"{name:32} {format_bytes(planned):>10} {format_bytes(m.peak_bytes):>10} {ratio:6.2f}  {'yes' if ok else 'NO'}"
        )
        del m
    n_ok = sum(r["ok"] for r in rows)
    print(f"{n_ok}/{len(rows)} paths within {TOLERANCE}x of the plan")
    if args.out:
        meta = {
            "case": case.name,
            "backend": backend,
            "budget": budget,
            "full_budget": big,
            "threads": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "tolerance": TOLERANCE,
        }
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
