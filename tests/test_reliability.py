"""Reliability: every bad input, stale or foreign state and crash mode of issue 15, table-driven.

Each case asserts the library error class, a fragment of its message (argument, value, what is
allowed), that no hook is left on the model and that the model's own logits are unchanged. The
cases run on a TransformerBridge built by ``boot_native`` (both TL lines) and, on TL 3.x, on a
HookedTransformer.
"""

import contextlib
import copy
import json
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch

from tl_tensorlens import (
    ArgumentError,
    MemoryBudgetError,
    StateMismatchError,
    TensorLens,
    VerificationError,
    capture,
    linearized,
    replay,
    verify_replay,
)
from tl_tensorlens._backend import has_hooked_transformer
from tl_tensorlens.errors import CheckpointError, ResultsStoreError, TensorLensError

TOKENS = torch.tensor([1, 4, 2, 7, 3])
BACKENDS = ["native", "hooked"] if has_hooked_transformer() else ["native"]


def _init(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not torch.isfinite(p).all() or "bias" in name or name.split(".")[-1].startswith("b"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def tiny(backend: str, *, n_layers: int = 2, dtype: torch.dtype = torch.float64, **kw: Any) -> Any:
    """A tiny random model: ``native`` (TransformerBridge.boot_native) or ``hooked`` (TL 3.x)."""
    base = dict(n_layers=n_layers, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=20, n_ctx=8, act_fn="gelu_new")
    base.update(kw)
    if backend == "hooked":
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            model = HookedTransformer(HookedTransformerConfig(**base, seed=0, dtype=dtype))
    else:
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge

        model = TransformerBridge.boot_native(TransformerBridgeConfig(**base, seed=0), dtype=dtype)
    _init(model, 0)
    return model.eval()


def hook_count(model: Any) -> int:
    """TL hook functions plus plain module hooks on the model."""
    n = sum(len(hp._forward_hooks) + len(hp._backward_hooks) for hp in model.hook_dict.values())
    return n + sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@dataclass
class Ctx:
    model: Any
    state: Any
    lens: Any
    budget_lens: Any


@pytest.fixture(params=BACKENDS)
def ctx(request: pytest.FixtureRequest) -> Ctx:
    model = tiny(request.param)
    lens = TensorLens.from_model(model, TOKENS, output="ln_final")
    return Ctx(model, lens.state, lens, None)


# ------------------------------------------------------------------------------------------ table
# (id, call(ctx), error class, message fragment)
CASES: list[tuple[str, Callable[[Ctx], Any], type[Exception], str]] = [
    # token ids and prompts
    ("negative id", lambda c: capture(c.model, torch.tensor([1, -1, 2])), ArgumentError, r"tokens=\[-1\].*0\.\.19"),
    ("float ids", lambda c: capture(c.model, torch.tensor([1.0, 2.7])), ArgumentError, "floats are not ids"),
    ("empty prompt", lambda c: capture(c.model, torch.tensor([], dtype=torch.long)), ArgumentError, "at least one"),
    ("empty string", lambda c: capture(c.model, "  "), ArgumentError, "non-empty"),
    ("None prompt", lambda c: capture(c.model, None), ArgumentError, "tokens=None"),
    ("out-of-vocab id", lambda c: capture(c.model, [1, 99]), ArgumentError, r"tokens=\[99\]"),
    ("over n_ctx", lambda c: capture(c.model, list(range(9))), ArgumentError, "n_ctx=8"),
    ("batch of prompts", lambda c: capture(c.model, torch.zeros(2, 3, dtype=torch.long)), ArgumentError, "one prompt"),
    ("bool ids", lambda c: capture(c.model, torch.tensor([True, False])), ArgumentError, "integer token ids"),
    # lens arguments
    ("slice(True)", lambda c: c.lens.slice(True), ArgumentError, "pos_out=True"),
    ("slice('3')", lambda c: c.lens.slice("3"), ArgumentError, "pos_out='3'"),
    ("slice out of range", lambda c: c.lens.slice(5), ArgumentError, r"pos_out=5.*0\.\.4"),
    ("positions float", lambda c: c.lens.collapse("in_out", positions=[1.0]), ArgumentError, "positions=1.0"),
    ("heads float", lambda c: c.lens.with_heads({0: [1.7]}), ArgumentError, r"heads\[0\]=1\.7"),
    ("heads int not list", lambda c: c.lens.with_heads({0: 1}), ArgumentError, r"heads\[0\]=1.*list"),
    ("heads list not map", lambda c: c.lens.with_heads([0, 1]), ArgumentError, "mapping"),
    ("head out of range", lambda c: c.lens.with_heads({0: [2]}), ArgumentError, r"heads\[0\]=2.*0\.\.1"),
    ("heads outside range", lambda c: c.lens.layer_range(1, 2).with_heads({0: [1]}), ArgumentError, "range 1..1"),
    ("layers=(0,)", lambda c: TensorLens.from_state(c.model, c.state, layers=(0,)), ArgumentError, r"layers=\(0,\)"),
    ("layers float", lambda c: TensorLens.from_state(c.model, c.state, layers=(0.5, 2)), ArgumentError, "layers="),
    (
        "layers reversed",
        lambda c: TensorLens.from_state(c.model, c.state, layers=(2, 1)),
        ArgumentError,
        "start < stop",
    ),
    ("output unknown", lambda c: TensorLens.from_state(c.model, c.state, output="mlp"), ArgumentError, "output='mlp'"),
    ("logits partial", lambda c: c.lens.layer_range(0, 1, output="logits"), ArgumentError, "last block"),
    ("head(5, 0)", lambda c: c.lens.head(5, 0), ArgumentError, r"layer=5.*0\.\.1"),
    ("head(-1, 0)", lambda c: c.lens.head(-1, 0), ArgumentError, "layer=-1"),
    ("head(0, 9)", lambda c: c.lens.head(0, 9), ArgumentError, "head=9"),
    ("token out of vocab", lambda c: c.lens.collapse("in_class", token=99), ArgumentError, r"token=\[99\]"),
    ("token negative", lambda c: c.lens.collapse("in_class", token=-1), ArgumentError, r"token=\[-1\]"),
    ("token float", lambda c: c.lens.collapse("in_class", token=2.0), ArgumentError, "token=2.0"),
    ("token and direction", lambda c: c.lens.collapse("in_class"), ArgumentError, "exactly one of token"),
    ("direction shape", lambda c: c.lens.collapse("in_class", direction=torch.ones(3)), ArgumentError, "direction"),
    ("kind unknown", lambda c: c.lens.collapse("bogus"), ArgumentError, "kind='bogus'"),
    ("probes 2.5", lambda c: c.lens.collapse_randomized_norm(2.5), ArgumentError, "probes=2.5"),
    ("probes '8'", lambda c: c.lens.collapse_randomized_norm("8"), ArgumentError, "probes='8'"),
    ("probes 1", lambda c: c.lens.collapse_randomized_norm(1), ArgumentError, "probes=1"),
    ("full method", lambda c: c.lens.full(method="bogus"), ArgumentError, "method='bogus'"),
    ("apply shape", lambda c: c.lens.apply(torch.zeros(3, 16, dtype=torch.float64)), ArgumentError, r"x=\(3, 16\)"),
    ("replay shape", lambda c: replay(c.model, c.state, torch.zeros(2, 16, dtype=torch.float64)), ArgumentError, "x="),
    ("bias not bool", lambda c: TensorLens.from_state(c.model, c.state, bias="no"), ArgumentError, "bias='no'"),
    # memory budget values
    ("budget 0.5", lambda c: TensorLens.from_state(c.model, c.state, memory_budget=0.5), ArgumentError, "0.5"),
    ("budget 0", lambda c: TensorLens.from_state(c.model, c.state, memory_budget=0), ArgumentError, "memory_budget=0"),
    ("budget words", lambda c: TensorLens.from_state(c.model, c.state, memory_budget="lots"), ArgumentError, "4GiB"),
    ("budget bool", lambda c: TensorLens.from_state(c.model, c.state, memory_budget=True), ArgumentError, "True"),
    # the memory budget is enforced on every path, before allocating
    ("full over budget", lambda c: _small(c).full(), MemoryBudgetError, r"full\(\).*estimated"),
    ("full forward over budget", lambda c: _small(c).full(method="forward"), MemoryBudgetError, r"full\(\)"),
    ("slice over budget", lambda c: _small(c).slice(2), MemoryBudgetError, r"slice\(2\)"),
    ("norm over budget", lambda c: _small(c).collapse("norm"), MemoryBudgetError, "collapse_randomized_norm"),
    ("in_out over budget", lambda c: _small(c).collapse("in_out"), MemoryBudgetError, r"collapse\('in_out'\)"),
    ("in_class over budget", lambda c: _small(c).collapse("in_class", token=3), MemoryBudgetError, "in_class"),
    ("rnorm over budget", lambda c: _small(c).collapse_randomized_norm(8), MemoryBudgetError, "randomized_norm"),
    ("contributions over budget", lambda c: _small(c).contributions(), MemoryBudgetError, "contributions"),
    ("head full over budget", lambda c: _small(c).head(0, 1).full(), MemoryBudgetError, r"HeadTensor.full"),
    ("head slice over budget", lambda c: _small(c).head(0, 1)[2], MemoryBudgetError, r"HeadTensor\[2\]"),
    ("apply over budget", lambda c: _small(c).apply(c.state.x0), MemoryBudgetError, "apply"),
    # stale or foreign state
    ("other weights", lambda c: replay(_other(c), c.state, c.state.x0), StateMismatchError, "weights differ"),
    ("other layer count", lambda c: replay(_deeper(c), c.state, c.state.x0), StateMismatchError, "n_layers"),
    ("other dtype", lambda c: replay(_float32(c), c.state, c.state.x0), StateMismatchError, "float32"),
    ("other norm", lambda c: replay(_rms(c), c.state, c.state.x0), StateMismatchError, "normalization_type"),
    (
        "other model lens",
        lambda c: TensorLens.from_state(_other(c), c.state).collapse("in_out"),
        StateMismatchError,
        "",
    ),
    ("capture inside linearized", lambda c: _nested_capture(c), StateMismatchError, "frozen replay"),
]


def _small(c: Ctx) -> Any:
    """The lens with a budget that holds the replay's working memory but no result of ~6 KiB or more."""
    return TensorLens.from_state(c.model, c.state, output="ln_final", memory_budget=2000)


def _other(c: Ctx) -> Any:
    backend = "hooked" if c.state.backend == "hooked" else "native"
    model = tiny(backend)
    _init(model, 7)
    return model


def _deeper(c: Ctx) -> Any:
    return tiny("hooked" if c.state.backend == "hooked" else "native", n_layers=3)


def _float32(c: Ctx) -> Any:
    return tiny("hooked" if c.state.backend == "hooked" else "native", dtype=torch.float32)


def _rms(c: Ctx) -> Any:
    return tiny("hooked" if c.state.backend == "hooked" else "native", normalization_type="RMS", gated_mlp=True)


def _nested_capture(c: Ctx) -> Any:
    with linearized(c.model, c.state):
        return capture(c.model, TOKENS)


@contextlib.contextmanager
def as_a_user_sees_it() -> Any:
    """Without the test suite's runtime type checker (jaxtyping + beartype only run under pytest):
    a wrong type must reach the library's own check and its named error."""
    import jaxtyping

    old = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", old)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_named_library_error(ctx: Ctx, case: tuple[Any, ...]) -> None:
    name, call, error, fragment = case
    before_hooks = hook_count(ctx.model)
    with torch.no_grad():
        before = ctx.model(TOKENS[None])
    with pytest.raises(error, match=fragment) as info, as_a_user_sees_it():
        call(ctx)
    assert isinstance(info.value, TensorLensError)
    assert hook_count(ctx.model) == before_hooks, f"{name}: a hook survived the error"
    with torch.no_grad():
        assert torch.equal(ctx.model(TOKENS[None]), before), f"{name}: the model changed"


def test_budget_strings_are_sizes(ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    assert TensorLens.from_state(ctx.model, ctx.state, memory_budget="1GB").memory_budget == 10**9
    monkeypatch.setenv("TL_TENSORLENS_MEMORY_BUDGET", "4GiB")
    assert TensorLens.from_state(ctx.model, ctx.state).memory_budget == 4 * 2**30
    monkeypatch.setenv("TL_TENSORLENS_MEMORY_BUDGET", "four gigs")
    with pytest.raises(ArgumentError, match="TL_TENSORLENS_MEMORY_BUDGET='four gigs'"):
        TensorLens.from_state(ctx.model, ctx.state)


def test_small_budget_chunks_and_gives_the_same_numbers(ctx: Ctx) -> None:
    """A budget that forces one item per chunk changes the chunking, not the numbers."""
    one = ctx.lens.engine.item_bytes(TOKENS.shape[0])
    tight = TensorLens.from_state(ctx.model, ctx.state, output="ln_final", memory_budget=4 * one + 40_000)
    for a, b in (
        (tight.collapse("in_out"), ctx.lens.collapse("in_out")),
        (tight.collapse("norm"), ctx.lens.collapse("norm")),
        (tight.slice(3), ctx.lens.slice(3)),
        (tight.collapse_randomized_norm(6, seed=1).squared, ctx.lens.collapse_randomized_norm(6, seed=1).squared),
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_weights_edited_after_capture_are_refused_then_recaptured(ctx: Ctx) -> None:
    p = next(ctx.model.parameters())
    original = p.detach().clone()
    with torch.no_grad():
        p.add_(0.1)
    try:
        with pytest.raises(StateMismatchError, match="changed after the capture"):
            ctx.lens.collapse("in_out")
        fresh = TensorLens.from_model(ctx.model, TOKENS, output="ln_final")
        assert fresh.collapse("in_out").shape == (5, 5)
    finally:
        with torch.no_grad():
            p.copy_(original)
    # restored values: the sampled weights match the capture again, so the old lens is valid again
    assert ctx.lens.collapse("in_out").shape == (5, 5)


def test_an_identical_copy_may_replay_the_capture(ctx: Ctx) -> None:
    twin = copy.deepcopy(ctx.model) if ctx.state.backend == "hooked" else None
    if twin is None:  # bridges do not deep-copy: rebuild the same weights instead
        twin = tiny("native")
    torch.testing.assert_close(replay(twin, ctx.state, ctx.state.x0), replay(ctx.model, ctx.state, ctx.state.x0))


def test_verify_replay_treats_nonfinite_as_failure(ctx: Ctx) -> None:
    state = capture(ctx.model, TOKENS)
    frozen = dict(state.frozen)
    name = next(k for k in frozen if k.endswith("ln2.hook_scale"))
    frozen[name] = frozen[name].clone()
    frozen[name][0, 2] = 0.0  # 1/0 inside the replay: inf, then NaN downstream
    checks = verify_replay(ctx.model, replace(state, frozen=frozen), raise_on_failure=False)
    assert not checks[0].ok and checks[0].nonfinite is not None and "x0" in checks[0].nonfinite
    with pytest.raises(VerificationError, match="non-finite"):
        verify_replay(ctx.model, replace(state, frozen=frozen))


def test_a_hidden_nonlinearity_is_refused_by_the_main_job(ctx: Ctx, tmp_path: Any) -> None:
    """An unhooked tanh after an MLP (a nonlinearity no hook can freeze) must stop explain()."""
    pytest.importorskip("matplotlib")
    from tl_tensorlens.viz.report import explain

    handle = ctx.model.blocks[0].mlp.register_forward_hook(lambda m, i, o: torch.tanh(3 * o))
    try:
        with pytest.raises(VerificationError, match="affine error"):
            explain(ctx.model, TOKENS, tmp_path / "r", methods=["tensor_norm"], interactive=False)
        assert not (tmp_path / "r" / "index.html").exists()
    finally:
        handle.remove()


def test_nan_weights_are_refused_by_the_main_job(ctx: Ctx, tmp_path: Any) -> None:
    pytest.importorskip("matplotlib")
    from tl_tensorlens.viz.report import explain

    model = _other(ctx)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(VerificationError, match="non-finite"):
        explain(model, TOKENS, tmp_path / "r", methods=["tensor_norm"], interactive=False)


def test_out_of_memory_in_a_batched_backward_is_a_budget_error(ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    """An out-of-memory error must not be taken for a missing batching rule (a silent slow loop)."""
    real = torch.autograd.grad

    def oom(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("is_grads_batched"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", oom)
    with pytest.raises(MemoryBudgetError, match="out of device memory.*estimated"):
        ctx.lens.collapse("in_out")


def test_threads_on_one_model_are_serialized_and_correct(ctx: Ctx) -> None:
    """Two threads, two lenses, one model: TL hooks live on the model, so the library serializes
    hooked forwards per model; every result equals the single-threaded one."""
    other_tokens = torch.tensor([3, 3, 1, 0, 6])
    lenses = [ctx.lens, TensorLens.from_model(ctx.model, other_tokens, output="ln_final")]
    expected = [lens.collapse("in_out") for lens in lenses]
    results: dict[tuple[int, int], Any] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for rep in range(6):
                results[(k, rep)] = lenses[k].collapse("in_out")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    hooks_before = hook_count(ctx.model)
    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (k, _), value in results.items():
        torch.testing.assert_close(value, expected[k], rtol=0, atol=0)
    assert hook_count(ctx.model) == hooks_before


def test_inference_mode_calls_work(ctx: Ctx) -> None:
    with torch.inference_mode():
        lens = TensorLens.from_model(ctx.model, TOKENS, output="ln_final")
        torch.testing.assert_close(lens.collapse("in_out"), ctx.lens.collapse("in_out"), rtol=1e-13, atol=1e-13)
        assert lens.slice(1).shape == (16, 5, 16)


# ------------------------------------------------------------------------------------------ results files
def test_store_cuts_torn_tail_moves_corrupt_lines_and_refuses_conflicts(tmp_path: Any) -> None:
    from tl_tensorlens.evaluation.store import ResultsStoreWarning, ResultStore

    path = tmp_path / "rows.jsonl"
    rows = [{"k": i, "v": float(i)} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + "not json\n" + json.dumps(rows[2]) + '\n{"k": 9')
    with pytest.warns(ResultsStoreWarning, match=r"rows.jsonl: 1 corrupt line\(s\) \(line 3\)"):
        store = ResultStore(path, ("k",))
    assert [r["k"] for r in store.rows] == [0, 1, 2]
    assert (tmp_path / "rows.jsonl.corrupt").read_text().count("not json") == 1
    assert path.read_text().endswith("\n") and "not json" not in path.read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired: a reopen is silent
        again = ResultStore(path, ("k",))
    again.append([{"k": 1, "v": 1.0}])  # identical duplicate: skipped
    with pytest.raises(ResultsStoreError, match="conflicts with line 2"):
        again.append([{"k": 1, "v": 5.0}])
    path.write_text(path.read_text() + json.dumps({"k": 0, "v": -1.0}) + "\n")
    with pytest.raises(ResultsStoreError, match="lines 1 and 4 hold different rows"):
        ResultStore(path, ("k",))


def test_perturbation_rows_are_keyed_by_model_and_tokens(tmp_path: Any) -> None:
    from tl_tensorlens.evaluation.perturbation import Example, NextTokenReadout, PerturbationConfig, run_perturbation

    conf = PerturbationConfig(fractions=(0.0, 0.5), mask_token_id=0, special_token_ids=())
    path = tmp_path / "p.jsonl"
    a, b = tiny("native"), _other(Ctx(tiny("native"), capture(tiny("native"), TOKENS), None, None))
    ex = [Example("e0", torch.tensor([1, 4, 2, 7, 3]))]
    rows_a = run_perturbation(a, ex, ["attn_mean"], NextTokenReadout(), conf, path, progress=False)
    rows_b = run_perturbation(b, ex, ["attn_mean"], NextTokenReadout(), conf, path, progress=False)
    assert rows_a[0]["model"] != rows_b[0]["model"]
    assert {r["model"] for r in rows_b} == {rows_b[0]["model"]}
    changed = [Example("e0", torch.tensor([1, 4, 2, 7, 5]))]  # same id, new tokens: recomputed
    rows_c = run_perturbation(a, changed, ["attn_mean"], NextTokenReadout(), conf, path, progress=False)
    assert rows_c[0]["tokens"] != rows_a[0]["tokens"] and len(rows_c) == len(rows_a)


def test_report_block_torn_by_a_crash_is_repaired(tmp_path: Any) -> None:
    from tl_tensorlens.studies._common import replace_block

    doc = tmp_path / "perturbation.md"
    doc.write_text("# Title\n\nintro\n<!-- s -->\nhalf a table | 0.")
    replace_block(doc, "<!-- s -->", "<!-- e -->", "| full | table |")
    assert doc.read_text() == "# Title\n\nintro\n<!-- s -->\n| full | table |\n<!-- e -->\n"
    replace_block(doc, "<!-- s -->", "<!-- e -->", "v2")
    assert doc.read_text().count("<!-- s -->") == 1 and "v2" in doc.read_text() and "intro" in doc.read_text()


# ------------------------------------------------------------------------------------------ checkpoints
def _save_gpt2(path: Any) -> None:
    import transformers as tr

    torch.manual_seed(0)
    hf = tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=20))
    hf.save_pretrained(path)


def test_incomplete_checkpoint_is_refused_by_name(tmp_path: Any) -> None:
    from safetensors.torch import load_file, save_file

    from tl_tensorlens.subjects import load_local

    _save_gpt2(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    dropped = next(k for k in weights if k.endswith("mlp.c_fc.weight"))
    del weights[dropped]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks weights.*c_fc\.weight"):
        load_local(tmp_path, backend="bridge")
    # the user may accept a head they will not use; the rest still loads
    model = load_local(tmp_path, backend="bridge", allow_missing=(dropped.rsplit(".", 1)[0],))
    assert model.cfg.n_layers == 1


@pytest.mark.parametrize(
    "breakage, fragment",
    [
        (lambda p: (p / "config.json").write_text("{not json"), "not a readable JSON config"),
        (lambda p: (p / "config.json").write_text("[1, 2]"), "expected a JSON object"),
        (lambda p: (p / "model.safetensors").unlink(), "cannot load this checkpoint"),
        (lambda p: (p / "model.safetensors").write_bytes(b"garbage"), "cannot load this checkpoint"),
        (lambda p: (p / "config.json").unlink(), "no config.json"),
    ],
    ids=["bad json", "json list", "no weights", "corrupt weights", "no config"],
)
def test_malformed_checkpoint_folders(tmp_path: Any, capsys: Any, breakage: Any, fragment: str) -> None:
    from tl_tensorlens.cli import main
    from tl_tensorlens.subjects import load_local

    _save_gpt2(tmp_path / "ck")
    breakage(tmp_path / "ck")
    with pytest.raises(TensorLensError, match=fragment):
        load_local(tmp_path / "ck", backend="bridge")
    code = main(["explain", "--model", str(tmp_path / "ck"), "--tokens", "1 2 3", "--out", str(tmp_path / "o")])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "it/s]" not in ln]
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["perturb", "--", "--n-decoder", "0"], "--n-decoder: 0 is not allowed"),
        (["perturb", "--", "--n-decoder", "-5"], "--n-decoder: -5 is not allowed"),
        (["perturb", "--", "--fractions", "0,abc"], "--fractions"),
        (["perturb", "--", "--fractions", "0.3,0.1"], "increasing"),
        (["perturb", "--", "--n-bootstrap", "0"], "--n-bootstrap: 0"),
        (["relations", "--", "--n-splits", "0"], "--n-splits: 0"),
        (["relations", "--", "--n-train", "x"], "'x' is not an integer"),
    ],
)
def test_study_arguments_exit_2_with_one_line(tmp_path: Any, capsys: Any, argv: list[str], fragment: str) -> None:
    from tl_tensorlens.cli import main

    assert main([argv[0], "--out", str(tmp_path / "o"), *argv[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0] and "Traceback" not in err[0], err
