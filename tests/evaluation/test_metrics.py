"""Metric properties: perfect vs random ranking, monotone curves, identity perturbations."""

import numpy as np
import pytest

from tl_tensorlens.errors import TensorLensError
from tl_tensorlens.evaluation import metrics

FR = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]


def test_constant_and_linear_curves_have_the_expected_auc():
    assert metrics.auc(FR, [1.0] * 7) == pytest.approx(1.0)
    assert metrics.auc(FR, [1.0] * 7, normalize=False) == pytest.approx(0.3)
    # y = 1 - f/0.3 falls linearly from 1 to 0: mean height 1/2, raw area 0.15 (trapezoid is exact)
    assert metrics.auc(FR, [1 - f / 0.3 for f in FR]) == pytest.approx(0.5)
    assert metrics.auc(FR, [1 - f / 0.3 for f in FR], normalize=False) == pytest.approx(0.15)
    # uneven grid, hand trapezoid: (0.1*(1+.5) + 0.2*(.5+.25)) / 2 = 0.15
    assert metrics.auc([0.0, 0.1, 0.3], [1.0, 0.5, 0.25], normalize=False) == pytest.approx(0.15)


def test_auc_is_monotone_in_the_curve():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = np.sort(rng.random(7))[::-1]
        z = y - rng.random(7) * 0.1  # pointwise below
        assert metrics.auc(FR, z) <= metrics.auc(FR, y)
        assert min(y) <= metrics.auc(FR, y) <= max(y)


def test_aopc_and_hs_mse_of_an_identity_perturbation_are_zero():
    assert metrics.aopc(0.73, [0.73] * 7) == 0.0
    import torch

    h = torch.randn(16, dtype=torch.float64)
    assert metrics.hs_mse(metrics.hidden_state_mse(h, h.expand(7, 16)).tolist()) == 0.0


def test_perfect_ranking_beats_random_ranking():
    """A toy model whose probability drops by the importance of each masked token: masking in the
    true order (perfect ranking) must give the lowest positive-perturbation AUC / highest AOPC, and
    reversed order the opposite, with random rankings in between on average."""
    rng = np.random.default_rng(1)
    n = 20
    imp = rng.dirichlet(np.ones(n))

    def curve(order):
        return [1.0 - imp[order[: metrics.n_masked(f, n)]].sum() for f in FR]

    perfect = list(np.argsort(-imp))
    worst = perfect[::-1]
    rand_auc = [metrics.auc(FR, curve(metrics.random_ranking(n, seed=s))) for s in range(200)]
    rand_aopc = [metrics.aopc(1.0, curve(metrics.random_ranking(n, seed=s))) for s in range(200)]
    assert metrics.auc(FR, curve(perfect)) < min(rand_auc)
    assert metrics.auc(FR, curve(worst)) > max(rand_auc)
    assert metrics.aopc(1.0, curve(perfect)) > max(rand_aopc)
    # random ranking: expected drop at k masked is k/n of the total mass
    assert np.mean(rand_aopc) == pytest.approx(np.mean([metrics.n_masked(f, n) / n for f in FR]), abs=0.01)


def test_bootstrap_ci_is_seeded_and_covers_the_mean():
    v = np.random.default_rng(0).normal(size=200)
    a, b = metrics.bootstrap_ci(v, seed=3), metrics.bootstrap_ci(v, seed=3)
    assert a == b
    assert a.low < a.mean < a.high and a.n == 200
    assert metrics.bootstrap_ci([2.0] * 5) == metrics.Estimate(2.0, 2.0, 2.0, 5)
    d = metrics.paired_difference_ci(v + 1.0, v)
    assert d.mean == pytest.approx(1.0) and d.low == pytest.approx(1.0)


def test_random_ranking_and_n_masked():
    assert sorted(metrics.random_ranking(10, seed=0)) == list(range(10))
    assert metrics.random_ranking(10, seed=0) == metrics.random_ranking(10, seed=0)
    assert [metrics.n_masked(f, 10) for f in FR] == [0, 1, 1, 2, 2, 3, 3]  # half up: 0.5 -> 1
    assert metrics.n_masked(0.15, 20) == 3


def test_metric_errors():
    with pytest.raises(TensorLensError):
        metrics.auc([0.0, 0.0], [1.0, 1.0])
    with pytest.raises(TensorLensError):
        metrics.auc([0.0, 0.1], [1.0])
    with pytest.raises(TensorLensError):
        metrics.auc([0.0, 0.1], [1.0, float("nan")])
    with pytest.raises(TensorLensError):
        metrics.bootstrap_ci([])
    with pytest.raises(TensorLensError):
        metrics.n_masked(1.5, 3)
