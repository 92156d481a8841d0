"""Evaluation: pure metrics, the perturbation test (Sec. 4.1), relation decoding (Sec. 4.2), the
approximation bound (Prop. 1), dataset-level attribution and the one resumable results store they share."""

from tl_tensorlens.evaluation.attribution import (
    BATCHED_METHODS,
    Attribution,
    Readout,
    attribute,
    batched_collapse,
    plan_batches,
)
from tl_tensorlens.evaluation.store import ResultsStoreWarning, ResultStore

__all__ = [
    "BATCHED_METHODS",
    "Attribution",
    "Readout",
    "ResultStore",
    "ResultsStoreWarning",
    "attribute",
    "batched_collapse",
    "plan_batches",
]
