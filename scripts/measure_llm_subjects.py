"""Measure the real-LLM subjects (SmolLM2-135M, Gemma-3-270M): load cost and numerical agreement.

Every case runs in its own subprocess, one at a time, so its peak RSS is its own:

* ``build``: the first load, dequantizing the GGUF into a fresh temporary cache (time, peak RSS);
* ``load``: a cached load per model x backend x dtype (time, peak RSS), then logits against the
  Hugging Face model on three prompts (max abs / relative difference, top-1 tokens),
  ``verify_replay`` on two prompts, ``TensorLens.from_model(..., output="ln_final")``: logit collapse
  + collapse_bias against the replay's and the model's logit, the bias ``c``, the last-position
  slice (saved for the HT-vs-Bridge comparison);
* ``mixed`` (TL 3.x, float64): HookedTransformer and Bridge in one process: their frozen coefficients
  (patterns, norm scales, MLP gates) compared by kind, and the HookedTransformer replay run on the
  Bridge's frozen coefficients against the Bridge's own tensor rows;
* ``lossless``: dequantizing straight into float64 against the stored float32 folder, upcast.

Results go to ``<out>/tl<major><minor>.json`` (one file per TransformerLens line: run the script once
in each venv); ``--report`` prints the table of every JSON file in ``<out>``.

    OMP_NUM_THREADS=1 python scripts/measure_llm_subjects.py --out out/llm_subjects          # TL 3.9 venv
    OMP_NUM_THREADS=1 python scripts/measure_llm_subjects.py --out out/llm_subjects          # TL 4.3 venv
    python scripts/measure_llm_subjects.py --out out/llm_subjects --report
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROMPTS = ("The capital of France is", "The Eiffel Tower is in the city of", "def fibonacci(n):")
LENS_PROMPT = PROMPTS[0]


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def _dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "float64": torch.float64}[name]


def _max_rel(a: Any, b: Any) -> tuple[float, float]:
    d = float((a.double() - b.double()).abs().max())
    scale = float(b.double().abs().max())
    return d, (d / scale if scale else 0.0)


def case_build(name: str) -> dict[str, Any]:
    from tl_tensorlens.subjects.llm import build_llm_subject

    t0 = time.perf_counter()
    folder = build_llm_subject(name)
    seconds = time.perf_counter() - t0
    prov = json.loads((folder / "provenance.json").read_text(encoding="utf-8"))
    size = sum(p.stat().st_size for p in folder.iterdir())
    return {"seconds": seconds, "peak_rss_gb": _peak_gb(), "folder_bytes": size, "provenance": prov}


def case_load(name: str, backend: str, dtype_name: str, out: Path, tag: str, do_slice: bool) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    from tl_tensorlens import TensorLens, verify_replay
    from tl_tensorlens.subjects.llm import hf_tokens, load_hf, load_llm

    dtype = _dtype(dtype_name)
    res: dict[str, Any] = {}
    t0 = time.perf_counter()
    model = load_llm(name, backend=backend, dtype=dtype)  # type: ignore[arg-type]
    res["load_seconds"] = time.perf_counter() - t0
    res["load_peak_rss_gb"] = _peak_gb()
    tokens = {p: hf_tokens(name, p) for p in PROMPTS}
    res["to_tokens_is_hf"] = all(torch.equal(model.to_tokens(p).cpu(), tokens[p]) for p in PROMPTS)
    hf, tok = load_hf(name, dtype=dtype)
    res["logits"] = {}
    for p in PROMPTS:
        with torch.no_grad():
            a = model(tokens[p])[0]
            b = hf(tokens[p]).logits[0]
        d, r = _max_rel(a, b)
        res["logits"][p] = {
            "max_abs": d,
            "rel_to_max": r,
            "top1_tl": tok.decode(int(a[-1].argmax())),
            "top1_hf": tok.decode(int(b[-1].argmax())),
            "top5_hf": [tok.decode(int(i)) for i in b[-1].topk(5).indices],
        }
    del hf
    res["verify"] = {}
    for p in PROMPTS[:2]:
        t = time.perf_counter()
        checks = verify_replay(model, tokens[p], outputs=("ln_final", "logits"), raise_on_failure=False)
        res["verify"][p] = {
            c.output: {
                "reproduction": c.reproduction_error,
                "affine": c.affine_error,
                "tolerance": c.tolerance,
                "reproduction_tolerance": c.reproduction_tolerance,
                "ok": c.ok,
            }
            for c in checks
        }
        res["verify"][p]["seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    x = tokens[LENS_PROMPT]
    lens = TensorLens.from_model(model, x, output="ln_final", verify=False)
    bias = lens.bias
    res["lens_seconds"] = time.perf_counter() - t
    with torch.no_grad():
        logits = model(x)[0]
    top = int(logits[-1].argmax())
    t = time.perf_counter()
    rows = lens.collapse("in_class", token=top)
    cb = lens.collapse_bias("in_class", token=top)
    res["logit_collapse_seconds"] = time.perf_counter() - t
    replay_logit = (lens.output @ model.W_U.detach().to(lens.output))[:, top]
    if getattr(model, "b_U", None) is not None:
        replay_logit = replay_logit + model.b_U.detach().to(lens.output)[top]
    total = rows.sum(-1) + cb
    res["logit_collapse"] = {
        "token": tok.decode(top),
        "logit_last": float(logits[-1, top]),
        "err_vs_replay_logit": float((total - replay_logit).abs().max()),
        "err_vs_model_logit": float((total - logits[:, top].to(total)).abs().max()),
        "row_last": rows[-1].tolist(),
        "bias_max_abs": float(bias.abs().max()),
    }
    tensors = {"bias": bias.contiguous(), "input": lens.input.contiguous()}
    if do_slice:
        t = time.perf_counter()
        sl = lens.slice(lens.n_pos - 1)
        res["slice_seconds"] = time.perf_counter() - t
        rebuilt = torch.einsum("djk,jk->d", sl, lens.input) + bias[-1]
        res["slice_rebuild_err"] = float((rebuilt - lens.output[-1]).abs().max())
        tensors["slice"] = sl.contiguous()
    for k, v in lens.state.frozen.items():
        tensors[f"frozen/{k}"] = v.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / f"{name}_{backend}_{dtype_name}_{tag}.safetensors"))
    res["peak_rss_gb"] = _peak_gb()
    return res


def case_mixed(name: str) -> dict[str, Any]:
    import dataclasses

    import torch

    from tl_tensorlens import TensorLens, capture
    from tl_tensorlens.subjects.llm import hf_tokens, load_llm

    ht = load_llm(name, backend="hooked", dtype=torch.float64)
    br = load_llm(name, backend="bridge", dtype=torch.float64)
    x = hf_tokens(name, LENS_PROMPT)
    sh, sb = capture(ht, x), capture(br, x)
    by_kind: dict[str, float] = {}
    for k, a in sh.frozen.items():
        b = sb.frozen[k]
        kind = ".".join(k.split(".")[2:]) if k.startswith("blocks.") else k
        by_kind[kind] = max(by_kind.get(kind, 0.0), _max_rel(a, b)[1])
    mixed = dataclasses.replace(sh, frozen=dict(sb.frozen))
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(ht.cfg.d_model, generator=gen)[:32]
    g = torch.zeros(len(idx), x.shape[1], ht.cfg.d_model, dtype=torch.float64)
    g[torch.arange(len(idx)), -1, idx] = 1.0
    rows = {
        lab: TensorLens.from_state(m, s, output="ln_final").apply_adjoint(g)
        for lab, (m, s) in {"ht": (ht, sh), "bridge": (br, sb), "ht_on_bridge_frozen": (ht, mixed)}.items()
    }
    return {
        "frozen_rel_by_kind": by_kind,
        "frozen_keys_equal": set(sh.frozen) == set(sb.frozen),
        "rows_ht_vs_bridge": _max_rel(rows["ht"], rows["bridge"]),
        "rows_ht_on_bridge_frozen_vs_bridge": _max_rel(rows["ht_on_bridge_frozen"], rows["bridge"]),
        "peak_rss_gb": _peak_gb(),
    }


def case_lossless(name: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from tl_tensorlens.subjects.llm import gguf_path, load_hf

    stored, _ = load_hf(name, dtype=torch.float64)
    stored_sd = {k: v.clone() for k, v in stored.state_dict().items()}
    del stored
    with tempfile.TemporaryDirectory() as work:
        path = gguf_path(name, work)
        t = time.perf_counter()
        direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float64)
        seconds = time.perf_counter() - t
    differing = [k for k, v in direct.state_dict().items() if not torch.equal(v, stored_sd[k])]
    return {
        "n_tensors": len(stored_sd),
        "n_differing": len(differing),
        "differing": differing[:10],
        "direct_float64_seconds": seconds,
        "peak_rss_gb": _peak_gb(),
    }


def _run_case(argv: list[str], out: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = f.name
    cmd = [sys.executable, __file__, "--out", str(out), "--case", *argv, "--result", result_file]
    print("$", " ".join(cmd[1:]), flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"error": proc.stderr[-2000:], "wall_seconds": wall}
    res = json.loads(Path(result_file).read_text(encoding="utf-8"))
    os.unlink(result_file)
    res["wall_seconds"] = wall
    return res


def _fmt(x: float) -> str:
    return f"{x:.1e}" if isinstance(x, float) else str(x)


def report(out: Path) -> str:
    """The table of every ``tl*.json`` in ``out`` (and HT-vs-Bridge slice differences)."""
    from safetensors.torch import load_file

    lines = []
    for file in sorted(out.glob("tl*.json")):
        data = json.loads(file.read_text(encoding="utf-8"))
        tag = file.stem
        lines.append(f"## {tag}: TransformerLens {data['env']['transformer_lens']}, threads {data['env']['threads']}")
        for name, b in data.get("build", {}).items():
            if "error" not in b:
                lines.append(
                    f"first load {name}: {b['seconds']:.0f} s, peak RSS {b['peak_rss_gb']:.2f} GB, "
                    f"folder {b['folder_bytes'] / 1e6:.0f} MB"
                )
        lines.append(
            "| model | backend | dtype | load s | load peak GB | peak GB | logits vs HF max abs (rel) | top-1 x3 | "
            "verify repro / affine (2 prompts) | collapse+bias vs replay / model | c |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for key, r in data.get("load", {}).items():
            name, backend, dt = key.split(":")
            if "error" in r:
                lines.append(f"| {name} | {backend} | {dt} | error | | | | | | | |")
                continue
            lg = r["logits"].values()
            worst = max(lg, key=lambda v: v["max_abs"])
            tops = ", ".join(repr(v["top1_tl"]) + ("" if v["top1_tl"] == v["top1_hf"] else "≠HF") for v in lg)
            rep = max(c["reproduction"] for v in r["verify"].values() for k, c in v.items() if k != "seconds")
            aff = max(c["affine"] for v in r["verify"].values() for k, c in v.items() if k != "seconds")
            ok = all(c["ok"] for v in r["verify"].values() for k, c in v.items() if k != "seconds")
            lc = r["logit_collapse"]
            lines.append(
                f"| {name} | {backend} | {dt} | {r['load_seconds']:.1f} | {r['load_peak_rss_gb']:.2f} | "
                f"{r['peak_rss_gb']:.2f} | {_fmt(worst['max_abs'])} ({_fmt(worst['rel_to_max'])}) | {tops} | "
                f"{_fmt(rep)} / {_fmt(aff)} {'ok' if ok else 'FAIL'} | {_fmt(lc['err_vs_replay_logit'])} / "
                f"{_fmt(lc['err_vs_model_logit'])} | {_fmt(lc['bias_max_abs'])} |"
            )
        for name in ("smollm2", "gemma3"):
            for dt in ("float64", "float32"):
                a, b = out / f"{name}_hooked_{dt}_{tag}.safetensors", out / f"{name}_bridge_{dt}_{tag}.safetensors"
                if not (a.is_file() and b.is_file()):
                    continue
                ta, tb = load_file(str(a)), load_file(str(b))
                if "slice" in ta and "slice" in tb:
                    d, r = _max_rel(ta["slice"], tb["slice"])
                    frob = float((ta["slice"] - tb["slice"]).norm() / tb["slice"].norm())
                    db = float((ta["bias"] - tb["bias"]).abs().max())
                    lines.append(
                        f"HT vs Bridge {name} {dt}: slice(-1) max abs {_fmt(d)} (rel to max {_fmt(r)}, "
                        f"Frobenius rel {_fmt(frob)}), bias max abs {_fmt(db)}"
                    )
        for name, m in data.get("mixed", {}).items():
            if "error" in m:
                continue
            kinds = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(m["frozen_rel_by_kind"].items()))
            lines.append(
                f"mixed {name} float64: frozen coefficients HT vs Bridge (max rel): {kinds}; 32 rows of T[-1]: "
                f"HT vs Bridge {_fmt(m['rows_ht_vs_bridge'][0])} (rel {_fmt(m['rows_ht_vs_bridge'][1])}), "
                f"HT replay on the Bridge's frozen values vs Bridge {_fmt(m['rows_ht_on_bridge_frozen_vs_bridge'][0])}"
            )
        for name, m in data.get("lossless", {}).items():
            if "error" not in m:
                lines.append(
                    f"lossless {name}: float64 dequantization vs stored float32 upcast: "
                    f"{m['n_differing']} of {m['n_tensors']} tensors differ"
                )
        lines.append("")
    tags = sorted(f.stem for f in out.glob("tl*.json"))
    if len(tags) > 1:
        for name in ("smollm2", "gemma3"):
            for dt in ("float64", "float32"):
                files = [out / f"{name}_bridge_{dt}_{t}.safetensors" for t in tags]
                if all(f.is_file() for f in files):
                    t0, t1 = load_file(str(files[0])), load_file(str(files[1]))
                    keys = [k for k in ("slice", "bias", "input") if k in t0 and k in t1]
                    diffs = {k: float((t0[k] - t1[k]).abs().max()) for k in keys}
                    lines.append(f"Bridge {tags[0]} vs {tags[1]} {name} {dt}: max abs {diffs}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the measurement cases (one subprocess each) and write ``<out>/tl<major><minor>.json``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", default="out/llm_subjects")
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    parser.add_argument("--backends", nargs="+", default=["hooked", "bridge"])
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    parser.add_argument("--no-build", action="store_true", help="skip the first-load (dequantization) timing")
    parser.add_argument("--no-slice", action="store_true", help="skip the last-position slices")
    parser.add_argument("--no-mixed", action="store_true", help="skip the HT-vs-Bridge frozen-value comparison")
    parser.add_argument("--lossless", action="store_true", help="also dequantize straight into float64 and compare")
    parser.add_argument("--report", action="store_true", help="only print the table of the JSON files in --out")
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.case:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        kind, *rest = args.case
        if kind == "build":
            res = case_build(rest[0])
        elif kind == "load":
            res = case_load(rest[0], rest[1], rest[2], out, rest[3], rest[4] == "slice")
        elif kind == "mixed":
            res = case_mixed(rest[0])
        else:
            res = case_lossless(rest[0])
        Path(args.result).write_text(json.dumps(res, indent=1), encoding="utf-8")
        return 0
    if args.report:
        print(report(out))
        return 0

    from tl_tensorlens._backend import has_hooked_transformer, tl_version
    from tl_tensorlens.subjects.llm import describe_versions, ensure_llm_subject

    major, minor = tl_version()
    tag = f"tl{major}{minor}"
    backends = [b for b in args.backends if b != "hooked" or has_hooked_transformer()]
    data: dict[str, Any] = {
        "env": {
            **describe_versions(),
            "threads": os.environ.get("OMP_NUM_THREADS", "unset"),
            "loadavg_start": os.getloadavg(),
            "python": sys.version.split()[0],
        },
        "build": {},
        "load": {},
        "mixed": {},
        "lossless": {},
    }
    out.mkdir(parents=True, exist_ok=True)
    result_file = out / f"{tag}.json"

    def save() -> None:
        result_file.write_text(json.dumps(data, indent=1), encoding="utf-8")

    for name in args.models:
        if not args.no_build:
            tmp = tempfile.mkdtemp(prefix="tl_llm_cache_")
            try:
                data["build"][name] = _run_case(["build", name], out, env={**os.environ, "TL_TENSORLENS_CACHE": tmp})
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            save()
        ensure_llm_subject(name)
        for backend in backends:
            for dt in args.dtypes:
                slice_flag = "noslice" if args.no_slice else "slice"
                data["load"][f"{name}:{backend}:{dt}"] = _run_case(["load", name, backend, dt, tag, slice_flag], out)
                save()
        if not args.no_mixed and has_hooked_transformer() and "hooked" in backends and "bridge" in backends:
            data["mixed"][name] = _run_case(["mixed", name], out)
            save()
        if args.lossless:
            data["lossless"][name] = _run_case(["lossless", name], out)
            save()
    data["env"]["loadavg_end"] = os.getloadavg()
    save()
    print(report(out))
    print(f"wrote {result_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
