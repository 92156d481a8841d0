"""Exact vs randomized Norm collapse on real and trained weights: time, rank agreement, coverage.

``benchmarks/bench_tensors.py`` compares the two on random-weight models; this asks the user's
question on the project's subjects: on the real all-MiniLM-L6-v2 (polarity sentences), the trained
induction model and the WikiText language model, how close is ``collapse_randomized_norm(k)`` to
the exact ``collapse("norm")``, and how much faster? Prints a table and writes JSON.

Per prompt the full ``[pos_out, pos_in]`` map is computed both ways; the causal upper triangle
(exact zeros for both) is left out of every statistic. Reported, pooled over prompts:

* ``rho``: Spearman rank correlation of all valid entries of each map, averaged over prompts;
* ``row top-1``: share of output rows whose most relevant input is the same;
* ``median rel err``: median of ``|‖·‖_est − ‖·‖_exact| / ‖·‖_exact`` (``norm``, the square root);
* ``within 2 SE``: share of entries whose squared estimate lies within 2 reported standard errors
  of the exact square (Gaussian ≈ 0.95; skewed samples with few probes cover less).

Usage:
    OMP_NUM_THREADS=2 python benchmarks/bench_norm_real.py --n 20 --threads 2 --out benchmarks/results_norm_real.json
"""

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from tl_tensorlens import TensorLens
from tl_tensorlens.errors import TensorLensError
from tl_tensorlens.replay import OutputPoint


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two flat tensors (ordinal ranks)."""
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def prompts(subject: str, n: int, build: bool) -> tuple[Any, list[torch.Tensor], OutputPoint]:
    """The model, ``n`` token prompts ``[1, pos]`` and the tensor's output point for a subject."""
    from tl_tensorlens.subjects import load_subject

    if subject == "minilm":
        from tl_tensorlens.subjects import load_polarity_data

        model = load_subject("minilm").model
        sentences = load_polarity_data().test.sentences[:n]
        tok = model.tokenizer
        return (
            model,
            [torch.tensor([tok(s, truncation=True, max_length=64)["input_ids"]]) for s in sentences],
            "resid_post",
        )
    if subject == "induction":
        from tl_tensorlens.subjects import induction_batch

        model = load_subject("induction").model
        return model, [t[None] for t in induction_batch(n, 31, seed=777).tokens], "ln_final"
    if subject == "wikitext":
        from tl_tensorlens.subjects import heldout_windows

        model = load_subject("wikitext", build=build).model
        windows = heldout_windows(model.tokenizer)
        return model, [w[None, :48] for w in windows[:n]], "ln_final"
    raise TensorLensError(f"unknown subject {subject!r}; known: minilm, induction, wikitext")


def run_subject(subject: str, n: int, ks: Sequence[int], build: bool) -> dict[str, Any]:
    """Time and compare exact and randomized Norm on ``n`` prompts of one subject."""
    model, toks, output = prompts(subject, n, build)
    exact_s = 0.0
    per_k: dict[int, dict[str, list[float]]] = {k: {"s": [], "rho": [], "top1": [], "rel": [], "cover": []} for k in ks}
    lengths = []
    with torch.no_grad():
        for t in toks:
            lens = TensorLens.from_model(model, t, output=output, progress=False)
            n_pos = lens.n_pos
            lengths.append(n_pos)
            valid = torch.ones(n_pos, n_pos, dtype=torch.bool)
            if lens.state.is_causal:
                valid = torch.tril(valid)
            t0 = time.perf_counter()
            exact = lens.collapse("norm").double()
            exact_s += time.perf_counter() - t0
            for k in ks:
                t0 = time.perf_counter()
                est = lens.collapse_randomized_norm(k, seed=k)
                per_k[k]["s"].append(time.perf_counter() - t0)
                sq, se = est.squared.double(), est.squared_stderr.double()
                norm = est.norm.double()
                per_k[k]["rho"].append(spearman(norm[valid], exact[valid]))
                masked_e = exact.masked_fill(~valid, -1.0)
                masked_r = norm.masked_fill(~valid, -1.0)
                per_k[k]["top1"].append(float((masked_e.argmax(-1) == masked_r.argmax(-1)).double().mean()))
                rel = ((norm - exact).abs() / exact.clamp_min(1e-300))[valid]
                per_k[k]["rel"].extend(rel.tolist())
                per_k[k]["cover"].extend(((sq - exact.pow(2)).abs() <= 2 * se)[valid].double().tolist())
    rows = []
    for k in ks:
        d = per_k[k]
        rand_s = sum(d["s"])
        rows.append(
            {
                "k": k,
                "seconds": rand_s,
                "speedup": exact_s / rand_s if rand_s else float("nan"),
                "rho": sum(d["rho"]) / len(d["rho"]),
                "row_top1": sum(d["top1"]) / len(d["top1"]),
                "median_rel_err": float(torch.tensor(d["rel"]).median()),
                "within_2se": sum(d["cover"]) / len(d["cover"]),
            }
        )
    return {
        "subject": subject,
        "prompts": len(toks),
        "mean_tokens": sum(lengths) / len(lengths),
        "d_model": int(model.cfg.d_model),
        "output": output,
        "exact_seconds": exact_s,
        "randomized": rows,
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| subject | prompts | mean tokens | exact Norm (s) | k | randomized (s) | speedup | rho | row top-1 | median rel err | within 2 SE |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for q in r["randomized"]:
            lines.append(
                f"| {r['subject']} | {r['prompts']} | {r['mean_tokens']:.1f} | {r['exact_seconds']:.2f} | {q['k']} | "
                f"{q['seconds']:.2f} | {q['speedup']:.1f}x | {q['rho']:.3f} | {q['row_top1']:.3f} | "
                f"{q['median_rel_err']:.3f} | {q['within_2se']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--subjects", default="minilm,induction,wikitext")
    p.add_argument("--n", type=int, default=20, help="prompts per subject")
    p.add_argument("--ks", default="4,16,64", help="probe counts")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--build", action="store_true", help="build the wikitext subject if it is not built")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    results, skipped = [], {}
    for subject in [s.strip() for s in args.subjects.split(",") if s.strip()]:
        try:
            results.append(run_subject(subject, args.n, ks, args.build))
        except TensorLensError as err:  # missing data, MiniLM package or wikitext build
            skipped[subject] = str(err)
            print(f"skipped {subject}: {err}", file=sys.stderr)
    print(table(results))
    if args.out:
        meta = {
            "torch": torch.__version__,
            "threads": args.threads,
            "machine": platform.machine(),
            "python": platform.python_version(),
        }
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "results": results, "skipped": skipped}, f, indent=1)
    return 0 if results else 1


if __name__ == "__main__":
    raise SystemExit(main())
