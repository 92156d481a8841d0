"""Perturbation metrics as pure functions (paper Sec. 4.1; definitions in docs/perturbation.md).

A perturbation curve is a value (accuracy, probability of the original prediction, hidden-state
change) measured after masking a fraction ``f_0 < f_1 < … < f_K`` of the input tokens
(the paper: 0 % to 30 %). Per example:

* :func:`auc`: area under the curve by the trapezoid rule over the *fraction* axis,
  ``Σ_k (f_{k+1} - f_k)(y_k + y_{k+1}) / 2``, divided by the span ``f_K - f_0`` when
  ``normalize=True`` (the default), so the result is the curve's mean height and lies in [0, 1]
  for accuracies whatever the range of fractions. Multiply by the span (0.3) for the raw area.
  The paper does not say which it reports (see docs/perturbation.md).
* :func:`aopc`: area over the perturbation curve (Samek et al. 2017):
  ``(1 / (K+1)) Σ_k (p_0 - p_k)``, the mean drop of the original prediction's probability over
  the steps, with ``p_0`` the unperturbed probability (the 0 % step counts, contributing 0).
* :func:`hs_mse`: mean over the steps of the mean squared change of the output hidden state
  ``(1 / (K+1)) Σ_k mean_d (h_k[d] - h_0[d])²``.

Aggregates over examples use :func:`bootstrap_ci` (percentile bootstrap, seeded).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from tl_tensorlens.errors import TensorLensError

ArrayLike = Sequence[float | int] | np.ndarray | Tensor


def _as_array(values: ArrayLike, name: str) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().to(torch.float64).numpy()
    arr = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise TensorLensError(f"{name} has non-finite values: {arr}")
    return arr


def auc(fractions: ArrayLike, values: ArrayLike, *, normalize: bool = True) -> float:
    """Trapezoid area under ``values`` over the fraction axis.

    Args:
        fractions: strictly increasing masked fractions, e.g. ``[0, 0.1, 0.2, 0.3]``.
        values: the curve at those fractions (same length).
        normalize: divide by ``fractions[-1] - fractions[0]`` (the mean height of the curve).

    Example:
        >>> auc([0.0, 0.1, 0.2, 0.3], [1.0, 1.0, 1.0, 1.0])
        1.0
        >>> round(auc([0.0, 0.3], [1.0, 0.0], normalize=False), 6)
        0.15
    """
    x = _as_array(fractions, "fractions")
    y = _as_array(values, "values")
    if x.ndim != 1 or x.shape != y.shape:
        raise TensorLensError(f"fractions {x.shape} and values {y.shape} must be 1-d of one length")
    if x.size < 2 or np.any(np.diff(x) <= 0):
        raise TensorLensError(f"fractions must be strictly increasing with ≥ 2 steps, got {x}")
    area = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))
    return area / float(x[-1] - x[0]) if normalize else area


def aopc(original_prob: float, probs: ArrayLike) -> float:
    """Mean drop of the original prediction's probability over the steps.

    Args:
        original_prob: probability of the original prediction on the unperturbed input.
        probs: its probability after each step (include the 0 % step, as Samek et al.).

    Example:
        >>> aopc(0.9, [0.9, 0.9, 0.9])
        0.0
        >>> round(aopc(1.0, [1.0, 0.5, 0.0]), 6)
        0.5
    """
    p = _as_array(probs, "probs")
    if p.size == 0:
        raise TensorLensError("aopc needs at least one step")
    return float(np.mean(original_prob - p))


def hidden_state_mse(
    original: Float[Tensor, " d_model"], perturbed: Float[Tensor, "*step d_model"]
) -> Float[Tensor, "*step"]:
    """Per-step mean over features of ``(h_k - h_0)²`` (same dtype as the inputs)."""
    if original.shape[-1] != perturbed.shape[-1]:
        raise TensorLensError(
            f"hidden states differ in width: original {tuple(original.shape)}, perturbed {tuple(perturbed.shape)}"
        )
    return ((perturbed - original) ** 2).mean(-1)


def hs_mse(step_mse: ArrayLike) -> float:
    """HS-MSE of one example: the mean over steps of the per-step hidden-state MSE.

    Example:
        >>> hs_mse([0.0, 0.5, 1.0])
        0.5
    """
    v = _as_array(step_mse, "step_mse")
    if v.size == 0:
        raise TensorLensError("hs_mse needs at least one step")
    return float(np.mean(v))


@dataclass(frozen=True)
class Estimate:
    """A mean with a bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap_ci(values: ArrayLike, *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> Estimate:
    """Percentile-bootstrap confidence interval of the mean (resampling examples).

    Example:
        >>> est = bootstrap_ci([1.0, 2.0, 3.0, 4.0], seed=0)
        >>> est.mean, est.low <= est.mean <= est.high
        (2.5, True)
    """
    v = _as_array(values, "values").ravel()
    if v.size == 0:
        raise TensorLensError("bootstrap_ci needs at least one value")
    if not 0 < confidence < 1:
        raise TensorLensError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_resamples, v.size))
    means = v[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return Estimate(float(v.mean()), float(low), float(high), int(v.size), confidence)


def paired_difference_ci(
    a: ArrayLike, b: ArrayLike, *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> Estimate:
    """Bootstrap CI of ``mean(a - b)`` over paired examples (e.g. two methods on one dataset)."""
    x, y = _as_array(a, "a"), _as_array(b, "b")
    if x.shape != y.shape:
        raise TensorLensError(f"paired values differ in shape: {x.shape} vs {y.shape}")
    return bootstrap_ci(x - y, n_resamples=n_resamples, confidence=confidence, seed=seed)


def random_ranking(n: int, *, seed: int) -> list[int]:
    """A seeded random order of ``n`` positions: the random-ranking control.

    Example:
        >>> sorted(random_ranking(5, seed=1))
        [0, 1, 2, 3, 4]
    """
    if n < 0:
        raise TensorLensError(f"n must be ≥ 0, got {n}")
    return [int(i) for i in np.random.default_rng(seed).permutation(n)]


def n_masked(fraction: float, n_maskable: int) -> int:
    """Tokens masked at ``fraction``: ``⌊fraction · n + 1/2⌋`` (round half up), at most ``n``.

    Example:
        >>> [n_masked(f, 20) for f in (0.0, 0.05, 0.1, 0.3)]
        [0, 1, 2, 6]
    """
    if not 0 <= fraction <= 1:
        raise TensorLensError(f"fraction must be in [0, 1], got {fraction}")
    # The epsilon keeps 0.15 * 20 = 3.0000000000000004 style float noise from moving a step.
    return min(n_maskable, int(math.floor(fraction * n_maskable + 0.5 + 1e-9)))
