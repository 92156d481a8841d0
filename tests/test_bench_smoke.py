"""The benchmark script runs end to end at a tiny size (seconds), so it cannot rot."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tensors.py"
REAL_SCRIPT = SCRIPT.with_name("bench_norm_real.py")


def _load(script: Path = SCRIPT):
    spec = importlib.util.spec_from_file_location(script.stem, script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_bench_tiny_runs_and_agrees(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "tiny.json"
    assert bench.main(["--size", "tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| tiny | lens.slice |" in printed
    data = json.loads(out.read_text())
    assert data["machine"]["matmul_float32_gflops"] > 0
    (res,) = data["results"]
    methods = [r["method"] for r in res["slice"]]
    assert methods == ["lens.slice", "autograd.jacobian", "autograd.jacobian(vectorize)", "func.jacrev"]
    for r in res["slice"]:
        assert r["max_rel_diff_vs_lens"] <= 1e-4
        assert r["seconds"] > 0 and r["gflops"] > 0
    norm = res["norm_collapse"]
    assert norm[0]["spearman"] == 1.0
    assert all(-1.0 <= r["spearman"] <= 1.0 for r in norm)


def test_flop_model_and_spearman():
    bench = _load()
    case = bench.Case("c", n_layers=1, d_model=4, n_heads=1, d_mlp=16, n_pos=2)
    # 2·n·4·D² + 2·n·2·D·d_mlp + 4·n²·D = 256 + 512 + 64
    assert bench.forward_flops(case, 2) == 832.0
    # the frozen replay's VJP skips Q, K and the scores: 2·n·2·D² + 2·n·2·D·d_mlp + 2·n²·D = 128 + 512 + 32
    assert bench.vjp_flops(case, 2) == 672.0
    # a gated MLP's gate is a frozen multiplier: the VJP never reaches W_gate, so gated == plain
    gated = dataclasses.replace(case, family="llama", n_kv_heads=1)
    assert bench.forward_flops(gated, 2) == 832.0 + 2 * 2 * 4 * 16
    assert bench.vjp_flops(gated, 2) == 672.0
    import torch

    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert bench.spearman(a, a) == pytest.approx(1.0)
    assert bench.spearman(a, -a) == pytest.approx(-1.0)


def test_bench_norm_real_runs_on_the_committed_induction_model(tmp_path, capsys):
    bench = _load(REAL_SCRIPT)
    out = tmp_path / "real.json"
    assert bench.main(["--subjects", "induction", "--n", "1", "--ks", "4,64", "--out", str(out)]) == 0
    assert "| induction | 1 |" in capsys.readouterr().out
    (res,) = json.loads(out.read_text())["results"]
    few, many = res["randomized"]
    assert res["exact_seconds"] > 0 and few["seconds"] > 0
    for r in (few, many):
        assert 0.5 < r["rho"] <= 1.0 and 0.0 <= r["within_2se"] <= 1.0
    assert many["median_rel_err"] < few["median_rel_err"]  # more probes, closer estimates
