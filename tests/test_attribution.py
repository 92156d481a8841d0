"""Dataset-level attribution: attribute() (batched == per-prompt loop), capture_batch, the attribute
CLI (resumable, torn tail), and torch.distributed sharding (2 gloo ranks, bit-identical)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.models import HAS_HOOKED, bridge_model
from tl_tensorlens.capture import capture, capture_batch
from tl_tensorlens.cli import main
from tl_tensorlens.errors import ArgumentError
from tl_tensorlens.evaluation.attribution import Attribution, Readout, attribute, batched_collapse, plan_batches
from tl_tensorlens.methods import get_method
from tl_tensorlens.tensors import TensorLens

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    [0, 5, 17, 8, 33, 5, 17],
    [0, 9, 2, 44, 9, 2, 44],
    [0, 12, 30, 12, 30],
    [0, 7, 7, 21, 40, 7, 21],
    [0, 50, 3, 50, 3],
]
INDUCTION = [
    "<bos> t83 t94 t12 t35 t83 t94 t12",
    "<bos> t43 t80 t27 t11 t43 t80 t27",
    "<bos> t12 t35 t43 t12 t35",
    "<bos> t50 t51 t52 t53 t50 t51 t52",
    "<bos> t60 t61 t60",
]


def _models():
    out = [pytest.param(lambda: bridge_model("gpt2"), id="bridge")]
    if HAS_HOOKED:
        from tests.models import hooked_model

        out.append(pytest.param(lambda: hooked_model("llama_gqa"), id="hooked-llama"))
    else:
        out.append(pytest.param(None, id="hooked", marks=pytest.mark.skip(reason="TL 4.x has no HookedTransformer")))
    return out


@pytest.mark.parametrize("make", _models())
def test_batched_equals_per_prompt_loop(make):
    model = make()
    methods = ["tensor_in_out", "tensor_in_class", "attn_rollout"]
    loop = {(a.index, a.method): a for a in attribute(model, PROMPTS, methods, batch_size=1)}
    batched = {(a.index, a.method): a for a in attribute(model, PROMPTS, methods, batch_size=4)}
    assert loop.keys() == batched.keys() == {(i, m) for i in range(len(PROMPTS)) for m in methods}
    for key, a in loop.items():
        b = batched[key]
        assert a.target == b.target and a.position == b.position == len(PROMPTS[key[0]]) - 1
        torch.testing.assert_close(b.map, a.map, rtol=1e-10, atol=1e-10)
    # and the per-prompt loop is the registry method itself on a fresh capture
    state = capture(model, torch.tensor(PROMPTS[1]))
    ref = get_method("tensor_in_class")(model, state, target=loop[(1, "tensor_in_class")].target)
    torch.testing.assert_close(loop[(1, "tensor_in_class")].map, ref, rtol=1e-12, atol=1e-12)


def test_batched_collapse_rows_sum_to_readout():
    model = bridge_model("gpt2")
    ids = torch.tensor([PROMPTS[0], PROMPTS[1], PROMPTS[3]])
    states = capture_batch(model, ids)
    for s, t in zip(states, ids, strict=True):
        single = capture(model, t)
        torch.testing.assert_close(s.frozen["blocks.1.ln2.hook_scale"], single.frozen["blocks.1.ln2.hook_scale"])
    maps = batched_collapse(model, states, "in_out")
    for s, m in zip(states, maps, strict=True):
        lens = TensorLens.from_state(model, s, output="ln_final")
        # In+Out rows sum to h_outᵀ(F(x) − c) (Eq. 23): a property, not a recomputation
        torch.testing.assert_close(m.sum(-1) + lens.collapse_bias("in_out"), (lens.output**2).sum(-1))
        torch.testing.assert_close(m, lens.collapse("in_out"), rtol=1e-10, atol=1e-10)


def test_results_are_labelled_and_immutable():
    model = bridge_model("gpt2")
    out = list(attribute(model, PROMPTS[:2], "tensor_in_class", position=3))
    assert [a.index for a in out] == [0, 1]
    a = out[0]
    assert isinstance(a, Attribution) and a.method == "tensor_in_class" and a.position == 3
    logits = capture(model, torch.tensor(PROMPTS[0])).logits
    assert logits is not None and a.target == int(logits[0, 3].argmax())
    assert len(a.tokens) == len(PROMPTS[0]) and a.text == " ".join(map(str, PROMPTS[0]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.method = "x"  # type: ignore[misc]
    row = a.to_row()
    assert json.loads(json.dumps(row))["map"] == a.map.tolist()


def test_skip_and_shard_partition_the_work():
    model = bridge_model("gpt2")
    assert plan_batches([7, 7, 5, 7, 5], 2) == [[0, 1], [2, 4], [3]]
    every = {(a.index, a.method) for a in attribute(model, PROMPTS, ["attn_rollout"], batch_size=2)}
    parts = [
        {(a.index, a.method) for a in attribute(model, PROMPTS, ["attn_rollout"], batch_size=2, shard=(r, 2))}
        for r in range(2)
    ]
    assert parts[0] | parts[1] == every and not parts[0] & parts[1]
    rest = {a.index for a in attribute(model, PROMPTS, ["attn_rollout"], skip=lambda i, m: i < 3)}
    assert rest == {3, 4}


def test_bad_arguments_are_library_errors():
    model = bridge_model("gpt2")
    with pytest.raises(ArgumentError, match="bogus.*tensor_in_out"):
        list(attribute(model, PROMPTS, ["tensor_in_out", "bogus"]))
    with pytest.raises(ArgumentError, match="methods"):
        list(attribute(model, PROMPTS, []))
    with pytest.raises(ArgumentError, match="position"):
        list(attribute(model, PROMPTS, ["attn_rollout"], position=6))
    with pytest.raises(ArgumentError, match="batch_size"):
        list(attribute(model, PROMPTS, ["attn_rollout"], batch_size=0))
    with pytest.raises(ArgumentError, match="prompts"):
        list(attribute(model, "one string", ["attn_rollout"]))


def test_class_methods_on_an_encoder_need_a_head():
    if HAS_HOOKED:
        from tests.models import encoder_model

        model = encoder_model()
    else:
        model = bridge_model("bert")
    with pytest.raises(ArgumentError, match="tensor_in_class.*head"):
        list(attribute(model, [[0, 5, 6, 1]], ["tensor_in_class"]))


def test_encoder_class_map_explains_the_heads_prediction():
    model = bridge_model("bert")
    gen = torch.Generator().manual_seed(0)
    head = Readout(torch.randn(32, 3, generator=gen, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    prompts = [[0, 5, 6, 7, 1], [0, 9, 8, 7, 1], [0, 11, 12, 1]]
    methods = ["tensor_in_class", "tensor_in_out"]
    loop = {(a.index, a.method): a for a in attribute(model, prompts, methods, head=head, batch_size=1)}
    batched = {(a.index, a.method): a for a in attribute(model, prompts, methods, head=head, batch_size=3)}
    for (i, m), a in loop.items():
        torch.testing.assert_close(batched[(i, m)].map, a.map, rtol=1e-10, atol=1e-10)
        assert a.position == 0
    state = capture(model, torch.tensor(prompts[1]))
    lens = TensorLens.from_state(model, state, output="resid_post")
    c = int((lens.output[0] @ head.W + head.b).argmax())
    a = loop[(1, "tensor_in_class")]
    assert a.target == c and a.target_label == f"class {c}"
    # In+Class rows plus the bias term give the head's logit (Eq. 24), here for the [CLS] row
    logit = a.map[0].sum() + lens.collapse_bias("in_class", direction=head.W[:, c])[0] + head.b[c]
    torch.testing.assert_close(logit, (lens.output[0] @ head.W + head.b)[c])


def _rows(path):
    return {(r["index"], r["method"]): r for r in map(json.loads, Path(path).read_text().splitlines())}


def test_cli_attribute_resumes_and_repairs_a_torn_tail(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"text": t, "id": k}) + "\n" for k, t in enumerate(INDUCTION[:3])))
    out = tmp_path / "o.jsonl"
    argv = ["attribute", "--model", "induction", "--prompts", str(prompts), "--methods", "tensor_in_out,attn_rollout"]
    argv += ["--out", str(out), "--dtype", "float64", "--no-progress"]
    assert main([*argv, "--verify"]) == 0
    first = out.read_bytes()
    rows = _rows(out)
    assert len(rows) == 6 and rows[(0, "tensor_in_out")]["tokens"][1] == "t83"
    assert main(argv) == 0  # a rerun computes nothing
    assert out.read_bytes() == first and "0 new rows" in capsys.readouterr().out
    lines = first.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:-1]) + lines[-1][:25])  # a kill in the middle of the last write
    assert main(argv) == 0
    assert "1 new rows" in capsys.readouterr().out
    assert _rows(out) == rows


def test_cli_attribute_help_and_errors(tmp_path, capsys):
    assert main(["attribute", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in (
        "--model",
        "--prompts",
        "--methods",
        "--out",
        "--position",
        "--device",
        "--dtype",
        "--batch-size",
        "--verify",
        "torchrun",
        "bfloat16",
        "text",
    ):
        assert flag in text, flag
    p = tmp_path / "p.txt"
    p.write_text("<bos> t83 t94\n")
    base = ["attribute", "--model", "induction", "--prompts", str(p), "--out", str(tmp_path / "o.jsonl")]
    assert main([*base, "--methods", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main([*base, "--methods", "attn_rollout", "--dtype", "float16"]) == 2
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    assert main([*base[:4], str(tmp_path / "bad.jsonl"), *base[5:], "--methods", "attn_rollout"]) == 2
    assert "'text'" in capsys.readouterr().err


WORKER = ROOT / "tests" / "_attribution_dist_worker.py"


def test_two_gloo_ranks_are_bit_identical_to_one_process(tmp_path):
    """Prompt sharding (the CLI under torch.distributed.run) and one-prompt row / chunk / probe
    sharding (exact Norm, randomized Norm, slice) on 2 gloo ranks equal one process bit for bit."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(INDUCTION[:3]) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(WORKER), str(prompts), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(tmp_path.glob("*.part"))  # rank 0 merged the parts

    # one process, in this process
    one = tmp_path / "one.jsonl"
    argv = ["attribute", "--model", "induction", "--prompts", str(prompts), "--out", str(one)]
    assert main([*argv, "--methods", "tensor_in_out,tensor_in_class", "--dtype", "float64", "--batch-size", "2"]) == 0
    two = _rows(tmp_path / "two.jsonl")
    assert two.keys() == _rows(one).keys() and len(two) == 2 * 3
    for key, row in _rows(one).items():
        assert torch.equal(torch.tensor(two[key]["map"]), torch.tensor(row["map"])), key  # JSON floats round-trip

    from tests._attribution_dist_worker import one_prompt

    ref = one_prompt()
    got = torch.load(tmp_path / "rank0.pt")
    assert got["slice_chunks"] > 1 and got["contributed"] == [True, True]
    for name, value in ref.items():
        assert torch.equal(got[name], value), name


def test_bench_attribute_tiny_runs(tmp_path, capsys):
    """benchmarks/bench_attribute.py runs end to end (one subject, no ranks: seconds)."""
    import importlib.util

    script = ROOT / "benchmarks" / "bench_attribute.py"
    spec = importlib.util.spec_from_file_location("bench_attribute", script)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "b.json"
    assert bench.main(["--subjects", "induction", "--size", "tiny", "--ranks", "0", "--out", str(out)]) == 0
    assert "| induction | tensor_in_out |" in capsys.readouterr().out
    rows = json.loads(out.read_text())["results"]
    assert [r["map"] for r in rows] == ["tensor_in_out", "tensor_in_class"]
    assert all(r["loop_prompts_per_s"] > 0 and r["batched_prompts_per_s"] > 0 for r in rows)
