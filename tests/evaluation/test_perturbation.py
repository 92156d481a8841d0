"""Perturbation harness: ranking, masking rules, resume after a kill, summary, plot."""

import json

import pytest
import torch

from tests.models import HAS_HOOKED, NO_HOOKED, encoder_model
from tl_tensorlens.errors import TensorLensError
from tl_tensorlens.evaluation.perturbation import (
    ClassifierReadout,
    Example,
    NextTokenReadout,
    PerturbationConfig,
    format_table,
    load_rows,
    rank_positions,
    run_perturbation,
    summarize,
)

needs_hooked = pytest.mark.skipif(not HAS_HOOKED, reason=NO_HOOKED)
FR = (0.0, 0.1, 0.2, 0.3)
METHODS = ["attn_rollout", "globenc_mean", "random"]
BOS, MASK = 0, 3


def _examples(n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        Example(f"ex{i}", torch.cat([torch.tensor([BOS]), torch.randint(4, 53, (6 + i % 4,), generator=gen)]))
        for i in range(n)
    ]


def _decoder_setup(decoder, masking="replace"):
    conf = PerturbationConfig(
        fractions=FR,
        masking=masking,
        mask_token_id=MASK if masking == "replace" else None,
        special_token_ids=(BOS,),
        batch_size=7,
    )
    return decoder("gpt2"), NextTokenReadout(), conf


def test_rank_positions_orders_and_breaks_ties_by_position():
    rel = torch.tensor([9.0, 1.0, 5.0, 5.0, 0.0])
    assert rank_positions(rel, [1, 2, 3, 4], "positive") == [2, 3, 1, 4]
    assert rank_positions(rel, [1, 2, 3, 4], "negative") == [4, 1, 2, 3]
    with pytest.raises(TensorLensError):
        rank_positions(torch.tensor([float("nan"), 1.0]), [0, 1], "positive")


def test_rows_are_consistent_and_special_tokens_never_masked(decoder, tmp_path):
    model, readout, conf = _decoder_setup(decoder)
    seen = []

    def spy(model_, state, *, position=None, target=None):
        seen.append((position, target))
        n = state.activations["blocks.0.hook_resid_pre"].shape[1]
        return torch.arange(n, 0, -1, dtype=torch.float64).expand(n, n)  # BOS ranked first: must be skipped

    from tl_tensorlens.methods import register_method, unregister_method

    register_method("spy_for_test", spy)
    try:
        ex = _examples(2)
        rows = run_perturbation(model, ex, ["spy_for_test"], readout, conf, tmp_path / "r.jsonl", progress=False)
    finally:
        unregister_method("spy_for_test")
    assert len(rows) == 2 * 2 * len(FR)
    assert seen[0][0] == ex[0].tokens.shape[0] - 1  # decoder: last position
    for r in rows:
        assert r["n_maskable"] == r["n_tokens"] - 1  # BOS is not maskable
        if r["fraction"] == 0.0:
            # batched vs single forwards differ in the last bits only
            assert r["correct"] == 1 and r["prob"] == pytest.approx(r["orig_prob"]) and r["hs_mse"] < 1e-20


def test_masking_replaces_top_tokens_not_bos(decoder):
    """Check the perturbed inputs directly through a recording readout."""
    model, _, conf = _decoder_setup(decoder)
    batches = []

    class Recording(NextTokenReadout):
        def __call__(self, model_, tokens):
            batches.append(tokens.clone())
            return super().__call__(model_, tokens)

    ex = [Example("a", torch.tensor([BOS, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]))]
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        run_perturbation(model, ex, ["attn_rollout"], Recording(), conf, f"{d}/r.jsonl", progress=False)
    perturbed = torch.cat(batches[1:])
    assert (perturbed[:, 0] == BOS).all()
    n_mask = (perturbed == MASK).sum(-1).tolist()
    # 10 maskable tokens: k = 0, 1, 2, 3 per direction; identical inputs (k = 0) run once
    assert sorted(n_mask) == [0, 1, 1, 2, 2, 3, 3]


def test_deletion_masking_runs(decoder, tmp_path):
    model, readout, conf = _decoder_setup(decoder, "delete")
    rows = run_perturbation(model, _examples(2), ["attn_mean"], readout, conf, tmp_path / "d.jsonl", progress=False)
    assert len(rows) == 2 * 2 * len(FR)


def test_killed_run_resumes_to_the_same_table(decoder, tmp_path):
    model, readout, conf = _decoder_setup(decoder)
    ex = _examples(6)
    full = run_perturbation(model, ex, METHODS, readout, conf, tmp_path / "full.jsonl", progress=False)

    class Killed(Exception):
        pass

    def kill_after_two(n_written):
        if n_written == 2:
            raise Killed

    path = tmp_path / "resumed.jsonl"
    with pytest.raises(Killed):
        run_perturbation(model, ex, METHODS, readout, conf, path, progress=False, on_example_written=kill_after_two)
    assert len(load_rows(path)) == 2 * len(METHODS) * 2 * len(FR)
    # simulate a crash in the middle of the next write: a torn line at the end of the file
    with open(path, "a") as fh:
        fh.write('{"config": "torn')
    # rerun must not recompute finished examples: count the examples it writes
    written = []
    resumed = run_perturbation(
        model, ex, METHODS, readout, conf, path, progress=False, on_example_written=written.append
    )
    assert written == [1, 2, 3, 4]
    assert resumed == full
    lines = path.read_text().splitlines()
    assert len(lines) == len(full) and len({json.dumps(json.loads(x), sort_keys=True) for x in lines}) == len(full)
    # a third run with every row present writes nothing and returns the same table
    again = run_perturbation(model, ex, METHODS, readout, conf, path, progress=False, on_example_written=written.append)
    assert again == full and written == [1, 2, 3, 4]


def test_configurations_share_a_file_without_mixing(decoder, tmp_path):
    model, readout, conf = _decoder_setup(decoder)
    path = tmp_path / "r.jsonl"
    first = run_perturbation(model, _examples(1), ["attn_mean"], readout, conf, path, progress=False)
    other = PerturbationConfig(fractions=(0.0, 0.5), mask_token_id=MASK, special_token_ids=(BOS,))
    second = run_perturbation(model, _examples(1), ["attn_mean"], readout, other, path, progress=False)
    assert {r["config"] for r in first} == {conf.key()} and {r["config"] for r in second} == {other.key()}
    assert len(second) == 2 * len(other.fractions)
    # the first configuration's rows are untouched and still resume without recomputation
    again = run_perturbation(model, _examples(1), ["attn_mean"], readout, conf, path, progress=False)
    assert again == first


@needs_hooked
def test_encoder_classifier_summary_and_plot(tmp_path):
    model = encoder_model()
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(model.cfg.d_model, 2, generator=gen, dtype=torch.float64)
    readout = ClassifierReadout(W, torch.zeros(2, dtype=torch.float64))
    conf = PerturbationConfig(fractions=FR, mask_token_id=MASK, special_token_ids=(1, 2))
    ex = [Example(f"e{i}", torch.tensor([1, *range(5 + i, 14 + i), 2])) for i in range(4)]
    methods = ["attn_rollout", "w_attn_res_ln_rollout", "tensor_in_out", "tensor_in_class", "random"]
    rows = run_perturbation(model, ex, methods, readout, conf, tmp_path / "e.jsonl", progress=False)
    summ = summarize(rows, n_resamples=50)
    assert {(s.method, s.order) for s in summ} == {(m, d) for m in methods for d in ("positive", "negative")}
    assert all(s.n_examples == 4 and s.accuracy_curve[0] == 1.0 for s in summ)
    table = format_table(summ)
    assert table.count("\n") == len(methods) + 1 and "tensor_in_class" in table
    from tl_tensorlens.viz.plots import plot_perturbation_curves

    fig = plot_perturbation_curves(summ)
    assert type(fig).__name__ == "Figure" and len(fig.axes) == 2


def test_config_validation():
    with pytest.raises(TensorLensError, match="mask_token_id"):
        PerturbationConfig()
    with pytest.raises(TensorLensError, match="increasing"):
        PerturbationConfig(fractions=(0.2, 0.1), mask_token_id=1)
    with pytest.raises(TensorLensError, match="orders"):
        PerturbationConfig(orders=("up",), mask_token_id=1)
    assert PerturbationConfig(mask_token_id=1).key() == PerturbationConfig(mask_token_id=1, batch_size=3).key()


def test_rank_by_magnitude_changes_only_signed_orderings_and_keys():
    from tl_tensorlens.evaluation.perturbation import PerturbationConfig, rank_positions

    signed = torch.tensor([0.0, -5.0, 0.1, 2.0, -0.2])
    # By value the most negative token is masked first in negative perturbation; by magnitude the
    # one with the smallest effect is.
    assert rank_positions(signed, [1, 2, 3, 4], "negative") == [1, 4, 2, 3]
    assert rank_positions(signed, [1, 2, 3, 4], "negative", "magnitude") == [2, 4, 3, 1]
    assert rank_positions(signed, [1, 2, 3, 4], "positive", "magnitude") == [1, 3, 4, 2]
    nonneg = signed.abs()
    for d in ("positive", "negative"):
        assert rank_positions(nonneg, [1, 2, 3, 4], d) == rank_positions(nonneg, [1, 2, 3, 4], d, "magnitude")
    base = PerturbationConfig(mask_token_id=3)
    assert PerturbationConfig(mask_token_id=3, rank_by="value").key() == base.key()
    assert PerturbationConfig(mask_token_id=3, rank_by="magnitude").key() != base.key()
    # Under pytest jaxtyping/beartype reject the literal first (a TypeError); without them the
    # config's own check raises the library error. Both name the field.
    with pytest.raises((TensorLensError, TypeError), match="rank_by"):
        PerturbationConfig(mask_token_id=3, rank_by="abs")  # type: ignore[arg-type]


def test_keep_last_never_masks_the_query_token_and_keys_only_when_set(decoder):
    """With keep_last the last position stays even for a method that ranks it first; the default
    config's key is what it was before the option existed (stored runs resume)."""
    import dataclasses

    model, _, conf = _decoder_setup(decoder)
    keep = dataclasses.replace(conf, keep_last=True)
    assert dataclasses.replace(conf, keep_last=False).key() == conf.key()
    assert keep.key() != conf.key()
    batches = []

    class Recording(NextTokenReadout):
        def __call__(self, model_, tokens):
            batches.append(tokens.clone())
            return super().__call__(model_, tokens)

    def last_first(model_, state, *, position=None, target=None):
        n = state.activations["blocks.0.hook_resid_pre"].shape[1]
        return torch.arange(n, dtype=torch.float64).expand(n, n)  # the last token most relevant

    from tl_tensorlens.methods import register_method, unregister_method

    ex = [Example("a", torch.tensor([BOS, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]))]
    register_method("last_first_for_test", last_first)
    try:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            rows = run_perturbation(
                model, ex, ["last_first_for_test"], Recording(), keep, f"{d}/r.jsonl", progress=False
            )
    finally:
        unregister_method("last_first_for_test")
    perturbed = torch.cat(batches[1:])
    assert (perturbed[:, -1] == 19).all() and (perturbed[:, 0] == BOS).all()
    assert {r["n_maskable"] for r in rows} == {9}  # 11 tokens less BOS less the query token
    # positive order masks the tokens just before the query first: 18, then 17 and 18, ...
    pos_inputs = [t for t in perturbed if (t == MASK).any()]
    assert any((t[-2] == MASK) and (t == MASK).sum() == 1 for t in pos_inputs)
    with pytest.raises((TensorLensError, TypeError), match="keep_last"):
        PerturbationConfig(mask_token_id=3, keep_last="yes")  # type: ignore[arg-type]
