"""Benchmark the TensorLens engine against autograd baselines on the same frozen replay.

What is measured, per model (random weights, float32, ``output="resid_post"``, last position ``i``):

* one output slice ``T[i]`` (``[d_model, pos, d_model]``) with ``TensorLens.slice(i)`` and with
  ``torch.autograd.functional.jacobian`` (default loop and ``vectorize=True``) and
  ``torch.func.jacrev`` applied to ``x -> replay.run(model, state, x[None], spec)[0, i]`` — the same
  frozen replay, so every method must agree (the max relative difference to the lens is reported);
* wall time, peak memory and achieved GFLOP/s against this machine's measured float32 matmul
  GFLOP/s (a 1024³ product, and the best GEMM at the case's own backward shapes). The flop floor of
  a slice is ``d_model`` vector-Jacobian products through the frozen replay. A VJP with respect to
  the *input only* (weights have ``requires_grad=False``) forms ``g Wᵀ`` but not ``xᵀ g`` for every
  linear map, and never reaches Q, K, the scores (the pattern is frozen) or a gated MLP's gate
  projection (the gate is a frozen multiplier), so the floor is ``d_model x vjp_flops`` (O and V
  projections, the MLP's in/up and out projections, pattern mixing) and achieved GFLOP/s = floor /
  time. (Counting weight gradients as well would double every GFLOP/s figure; ``VJP_FLOP_FACTOR``
  below sets it.)
* the exact Norm collapse (``lens.collapse("norm")``: one slice per output row) against the
  randomized one (``lens.collapse_randomized_norm(k)``): time, Spearman rho over the causal entries
  (``pos_in <= pos_out``) and the mean relative error.

Peak memory is the peak resident set size (RSS) above the value just before the call, sampled every
millisecond by a background thread from ``/proc/self/statm`` (psutil elsewhere), after ``gc.collect()``
and glibc ``malloc_trim(0)`` so freed memory from earlier calls is returned first. ``tracemalloc``
would miss it: torch's CPU allocator does not go through Python's allocator.

Usage::

    python benchmarks/bench_tensors.py --size small --out results.json
    python benchmarks/bench_tensors.py --size full --threads 1 --out benchmarks/results_full.json

Sizes: ``tiny`` (seconds, used by the test suite), ``small`` (d_model 256, 4 layers, 64 tokens),
``full`` (``small`` plus a GPT-2-small-shaped model: 12 layers, d_model 768, 12 heads, d_mlp 3072,
vocabulary 50257, at ``--gpt2-len`` tokens, default 16; and a SmolLM2-135M-shaped LLaMA: 30 layers,
d_model 576, 9 heads / 3 KV heads, SwiGLU d_mlp 1536, RMSNorm, rotary, 32 tokens), ``smollm2`` (that
one alone).
"""

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

#: Forward-flop multiples per input-only VJP (see the module docstring).
VJP_FLOP_FACTOR = 1.0


@dataclass(frozen=True)
class Case:
    """One benchmarked model shape."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    n_pos: int
    d_vocab: int = 1000
    norm_rows: str = "all"  # "all": the whole Norm collapse; "last": only the last row (one slice)
    probes: tuple[int, ...] = (4, 16, 64)
    jacobian_loop: bool = True
    family: str = "gpt2"  # "gpt2": LayerNorm, GELU MLP, learned positions; "llama": RMSNorm, SwiGLU, rotary, GQA
    n_kv_heads: int | None = None


def cases(size: str, gpt2_len: int) -> list[Case]:
    """The models of one ``--size``."""
    tiny = Case("tiny", n_layers=2, d_model=32, n_heads=4, d_mlp=128, n_pos=8, d_vocab=101, probes=(4, 16))
    small = Case("d256-L4-N64", n_layers=4, d_model=256, n_heads=8, d_mlp=1024, n_pos=64)
    gpt2 = Case(
        f"gpt2-small-N{gpt2_len}",
        n_layers=12,
        d_model=768,
        n_heads=12,
        d_mlp=3072,
        n_pos=gpt2_len,
        d_vocab=50257,
        norm_rows="last",
        probes=(16, 64),
    )
    smollm2 = Case(
        "smollm2-shape-N32",
        n_layers=30,
        d_model=576,
        n_heads=9,
        d_mlp=1536,
        n_pos=32,
        d_vocab=49152,
        norm_rows="last",
        probes=(16, 64),
        jacobian_loop=False,
        family="llama",
        n_kv_heads=3,
    )
    return {"tiny": [tiny], "small": [small], "full": [small, gpt2, smollm2], "smollm2": [smollm2]}[size]


# ------------------------------------------------------------------------------------------ measuring
def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        import psutil

        return int(psutil.Process().memory_info().rss)


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed memory may stay mapped, deltas undercount
        pass


@dataclass
class Measure:
    """Wall time and peak RSS above baseline of one call."""

    seconds: float = 0.0
    peak_bytes: int = 0
    result: Any = field(default=None, repr=False)


def measure(fn: Callable[[], Any]) -> Measure:
    """Run ``fn`` once, timing it and sampling the RSS every millisecond."""
    _trim()
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - t0
        stop.set()
        thread.join()
    peak[0] = max(peak[0], _rss())
    return Measure(seconds, peak[0] - base, result)


def matmul_gflops(threads: int, m: int = 1024, k: int = 1024, n: int = 1024, seconds: float = 1.0) -> float:
    """This machine's float32 GEMM rate, ``[m, k] @ [k, n]``, in GFLOP/s.

    Products are repeated for about ``seconds`` after a warm-up and the best of five equal windows is
    kept: one short burst (the old reference) read anywhere from 130 to 220 GFLOP/s on this machine
    depending on what ran just before, which made "% of matmul" meaningless.
    """
    a, b = torch.randn(m, k), torch.randn(k, n)
    t0 = time.perf_counter()
    reps = 0
    while time.perf_counter() - t0 < 0.2 or reps < 2:  # warm-up, and how many products fill a window
        _ = a @ b
        reps += 1
    per_window = max(1, int(reps * seconds / 5 / (time.perf_counter() - t0)))
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(per_window):
            _ = a @ b
        best = min(best, (time.perf_counter() - t0) / per_window)
    return 2 * m * k * n / best / 1e9


def case_gemm_gflops(case: Case, threads: int) -> float:
    """The best GEMM rate at the shapes that dominate a slice's batched backward: a chunk of
    cotangents through the MLP, ``[m, d_mlp] @ [d_mlp, d_model]`` with ``m`` = 1024 or 4096 rows
    (cotangents x positions). A single ``m = d_model · n_pos`` product would understate it: its left
    factor no longer fits the cache (50 MB at SmolLM2's shape) and it runs memory-bound."""
    return max(matmul_gflops(threads, m, case.d_mlp, case.d_model, seconds=0.5) for m in (1024, 4096))


def forward_flops(case: Case, n: int) -> float:
    """Flops of one forward of the model at length ``n`` up to the last ``resid_post`` (for the record).

    Per layer: Q, K, V and O projections ``2 n (2 D² + 2 D D_kv)`` (``D_kv = D`` without GQA), the
    MLP ``2 n (2 D d_mlp)`` (gated: ``3``), scores and mixing ``2 · 2 n² D``. Norms and elementwise
    work are ignored (a few percent).
    """
    d = case.d_model
    kv = d * (case.n_kv_heads or case.n_heads) // case.n_heads  # width of K and V (GQA)
    mlp_mats = 3 if case.family == "llama" else 2  # gate, up, down vs in, out
    per_layer = 2 * n * (2 * d * d + 2 * d * kv) + 2 * n * mlp_mats * d * case.d_mlp + 4 * n * n * d
    return float(case.n_layers * per_layer)


def vjp_flops(case: Case, n: int) -> float:
    """Flops of one input-only vector-Jacobian product through the **frozen** replay at length ``n``.

    The attention pattern is a frozen constant, so the backward never reaches Q, K or the scores,
    and a gated MLP's gate ``act(x W_gate)`` is a frozen multiplier, so it never reaches ``W_gate``:
    per layer it pulls the cotangent through O and V ``2 n (D² + D D_kv)``, the pattern mixing
    ``2 n² D`` and the MLP's in (or up) and out projections ``2 n (2 D d_mlp)``; with
    ``requires_grad=False`` weights every linear map costs ``g Wᵀ`` only. This is the slice's flop
    floor per cotangent (the old floor, one full forward, counted Q, K, the scores and the gate the
    backward never computes: 17 % too much at GPT-2's shape, 40 % at SmolLM2's, which then read as
    "more than 100 % of the matmul rate").
    """
    d = case.d_model
    kv = d * (case.n_kv_heads or case.n_heads) // case.n_heads
    per_layer = 2 * n * (d * d + d * kv) + 2 * n * 2 * d * case.d_mlp + 2 * n * n * d
    return float(case.n_layers * per_layer)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two flat tensors (average ranks are not needed: no ties here)."""
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


# ------------------------------------------------------------------------------------------ models
def build_model(case: Case, backend: str) -> Any:
    """A random float32 GPT-2-style model of the case's shape."""
    torch.manual_seed(0)
    if case.family == "llama":
        return _llama(case, backend)
    if backend == "hooked":
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig(
            n_layers=case.n_layers,
            d_model=case.d_model,
            n_heads=case.n_heads,
            d_head=case.d_model // case.n_heads,
            d_mlp=case.d_mlp,
            d_vocab=case.d_vocab,
            n_ctx=max(1024, case.n_pos),
            act_fn="gelu_new",
            normalization_type="LN",
            dtype=torch.float32,
            seed=0,
        )
        model = HookedTransformer(cfg, move_to_device=False)
    else:
        import transformers

        from tl_tensorlens._backend import bridge_from_hf

        hf = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                n_layer=case.n_layers,
                n_embd=case.d_model,
                n_head=case.n_heads,
                n_inner=case.d_mlp,
                vocab_size=case.d_vocab,
                n_positions=max(1024, case.n_pos),
            )
        )
        model = bridge_from_hf(hf.float().eval())
    model.eval()
    model.requires_grad_(False)  # Jacobians w.r.t. the input only: no graph through the weights
    return model


def _llama(case: Case, backend: str) -> Any:
    """A random float32 LLaMA-family model (RMSNorm, SwiGLU, rotary, GQA): SmolLM2's shape."""
    if backend == "hooked":
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig(
            n_layers=case.n_layers,
            d_model=case.d_model,
            n_heads=case.n_heads,
            n_key_value_heads=case.n_kv_heads,
            d_head=case.d_model // case.n_heads,
            d_mlp=case.d_mlp,
            d_vocab=case.d_vocab,
            n_ctx=max(1024, case.n_pos),
            act_fn="silu",
            gated_mlp=True,
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_dim=case.d_model // case.n_heads,
            final_rms=True,
            dtype=torch.float32,
            seed=0,
        )
        model = HookedTransformer(cfg, move_to_device=False)
    else:
        import transformers

        from tl_tensorlens._backend import bridge_from_hf

        hf = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                num_hidden_layers=case.n_layers,
                hidden_size=case.d_model,
                num_attention_heads=case.n_heads,
                num_key_value_heads=case.n_kv_heads,
                intermediate_size=case.d_mlp,
                vocab_size=case.d_vocab,
                max_position_embeddings=max(1024, case.n_pos),
                tie_word_embeddings=True,
            )
        )
        model = bridge_from_hf(hf.float().eval())
    model.eval()
    model.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------------ one case
def run_case(
    case: Case, backend: str, peak_gflops: float, log: Callable[[str], None], repeat: int = 1
) -> dict[str, Any]:
    from tl_tensorlens import TensorLens
    from tl_tensorlens.replay import run

    model = build_model(case, backend)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, case.d_vocab, (1, case.n_pos), generator=gen)
    lens = TensorLens.from_model(model, tokens, output="resid_post", progress=False)
    state, spec = lens.state, lens.spec
    i = case.n_pos - 1
    x0 = state.x0.detach().clone()
    lens.output  # noqa: B018 - warm-up: first replay pays one-off hook and allocator costs

    def f(x: torch.Tensor) -> torch.Tensor:
        return run(model, state, x[None], spec)[0, i]

    floor = case.d_model * VJP_FLOP_FACTOR * vjp_flops(case, case.n_pos)
    gemm = case_gemm_gflops(case, torch.get_num_threads())  # measured now, just before the slices
    log(f"  GEMM at this case's shape: {gemm:.1f} GFLOP/s")
    methods: list[tuple[str, Callable[[], torch.Tensor]]] = [("lens.slice", lambda: lens.slice(i))]
    if case.jacobian_loop:
        methods.append(("autograd.jacobian", lambda: torch.autograd.functional.jacobian(f, x0)))
    methods.append(("autograd.jacobian(vectorize)", lambda: torch.autograd.functional.jacobian(f, x0, vectorize=True)))
    methods.append(("func.jacrev", lambda: torch.func.jacrev(f)(x0)))

    rows = []
    ref = None
    for name, fn in methods:
        m = min((measure(fn) for _ in range(repeat)), key=lambda mm: mm.seconds)  # best of `repeat`
        out = m.result.detach()
        if ref is None:
            ref = out
        rel = float((out - ref).abs().max() / ref.abs().max())
        gflops = floor / m.seconds / 1e9
        row = dict(
            method=name,
            seconds=m.seconds,
            peak_mib=m.peak_bytes / 2**20,
            gflops=gflops,
            fraction_of_matmul=gflops / peak_gflops,
            fraction_of_case_gemm=gflops / gemm,
            max_rel_diff_vs_lens=rel,
        )
        rows.append(row)
        log(
            f"  {name:30s} {m.seconds:9.2f} s {row['peak_mib']:9.1f} MiB {gflops:8.1f} GFLOP/s "
            f"({100 * row['fraction_of_matmul']:5.1f}% of matmul, {100 * row['fraction_of_case_gemm']:5.1f}% of case GEMM)"
            f"  rel diff {rel:.1e}"
        )
        del m, out
    lens_s = rows[0]["seconds"]
    for row in rows:
        row["time_vs_lens"] = row["seconds"] / lens_s

    # Norm collapse: exact (one slice per row) vs randomized (k probes per row).
    positions = None if case.norm_rows == "all" else [i]
    exact = measure(lambda: lens.collapse("norm", positions=positions))
    E = exact.result
    n_rows = E.shape[0]
    row_ids = torch.arange(case.n_pos) if positions is None else torch.tensor(positions)
    causal = torch.arange(case.n_pos)[None, :] <= row_ids[:, None]
    norm_rows = [
        dict(
            method="collapse('norm') exact",
            probes=None,
            seconds=exact.seconds,
            peak_mib=exact.peak_bytes / 2**20,
            spearman=1.0,
            mean_rel_err=0.0,
        )
    ]
    log(f"  {'norm exact':30s} {exact.seconds:9.2f} s {exact.peak_bytes / 2**20:9.1f} MiB  ({n_rows} rows)")
    for k in case.probes:
        m = measure(lambda k=k: lens.collapse_randomized_norm(k, positions=positions, seed=0))
        R = m.result.norm
        rho = spearman(E[causal].flatten(), R[causal].flatten())
        rel = float(((R - E).abs()[causal] / E[causal].clamp_min(1e-30)).mean())
        norm_rows.append(
            dict(
                method=f"randomized k={k}",
                probes=k,
                seconds=m.seconds,
                peak_mib=m.peak_bytes / 2**20,
                spearman=rho,
                mean_rel_err=rel,
                speedup=exact.seconds / m.seconds,
            )
        )
        log(
            f"  {'norm randomized k=' + str(k):30s} {m.seconds:9.2f} s {m.peak_bytes / 2**20:9.1f} MiB  "
            f"speedup {exact.seconds / m.seconds:6.1f}x  Spearman {rho:.3f}  mean rel err {rel:.3f}"
        )
    return dict(
        case=asdict(case),
        forward_gflop=forward_flops(case, case.n_pos) / 1e9,
        vjp_gflop=vjp_flops(case, case.n_pos) / 1e9,
        slice_floor_gflop=floor / 1e9,
        case_gemm_gflops=gemm,
        slice=rows,
        norm_collapse=norm_rows,
    )


# ------------------------------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--size", choices=("tiny", "small", "full", "smollm2"), default="small")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--repeat", type=int, default=1, help="time each slice method this many times, keep the best")
    p.add_argument("--gpt2-len", type=int, default=16, help="tokens of the GPT-2-small-shaped model (full)")
    p.add_argument(
        "--backend",
        choices=("auto", "hooked", "bridge"),
        default="auto",
        help="auto: HookedTransformer where TransformerLens has it (3.x), else TransformerBridge",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print a table; optionally write JSON. Returns 0, or 1 if methods disagree."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    backend = args.backend
    if backend == "auto":
        from tl_tensorlens._backend import has_hooked_transformer

        backend = "hooked" if has_hooked_transformer() else "bridge"
    import transformer_lens  # noqa: F401 - version for the record

    peak = matmul_gflops(args.threads)
    machine = dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        transformer_lens=_tl_version(),
        backend=backend,
        matmul_float32_gflops=peak,
        memory="peak RSS above baseline, sampled every 1 ms (/proc/self/statm), after gc + malloc_trim",
    )
    print(f"float32 matmul: {peak:.1f} GFLOP/s on {args.threads} thread(s); backend {backend}")
    results = []
    ok = True
    for case in cases(args.size, args.gpt2_len):
        print(f"\n{case.name}: L={case.n_layers} D={case.d_model} H={case.n_heads} d_mlp={case.d_mlp} N={case.n_pos}")
        res = run_case(case, backend, peak, print, repeat=args.repeat)
        tol = 1e-4  # float32: the methods sum the same products in different orders
        ok = ok and all(r["max_rel_diff_vs_lens"] <= tol for r in res["slice"])
        results.append(res)
    print("\n" + summary(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                dict(
                    command=" ".join(
                        ["python", "benchmarks/bench_tensors.py", *(sys.argv[1:] if argv is None else argv)]
                    ),
                    size=args.size,
                    machine=machine,
                    results=results,
                ),
                f,
                indent=2,
            )
    if not ok:
        print("ERROR: a baseline disagrees with lens.slice beyond 1e-4 relative", file=sys.stderr)
    return 0 if ok else 1


def _tl_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("transformer_lens")


def summary(results: list[dict[str, Any]]) -> str:
    """Markdown tables of the results (what docs/benchmarks.md quotes)."""
    lines = [
        "| model | method | time (s) | vs lens | peak RSS (MiB) | GFLOP/s | % of matmul | % of case GEMM | max rel diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        for r in res["slice"]:
            lines.append(
                f"| {res['case']['name']} | {r['method']} | {r['seconds']:.2f} | {r['time_vs_lens']:.2f}x | "
                f"{r['peak_mib']:.0f} | {r['gflops']:.1f} | {100 * r['fraction_of_matmul']:.1f} | "
                f"{100 * r['fraction_of_case_gemm']:.1f} | {r['max_rel_diff_vs_lens']:.1e} |"
            )
    lines += [
        "",
        "| model | Norm collapse | rows | time (s) | speedup | Spearman ρ | mean rel err |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        rows = res["case"]["n_pos"] if res["case"]["norm_rows"] == "all" else 1
        for r in res["norm_collapse"]:
            lines.append(
                f"| {res['case']['name']} | {r['method']} | {rows} | {r['seconds']:.2f} | "
                f"{r.get('speedup', 1.0):.1f}x | {r['spearman']:.3f} | {r['mean_rel_err']:.3f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
