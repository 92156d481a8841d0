"""Evaluation: pure metrics, the perturbation test (Sec. 4.1), relation decoding (Sec. 4.2), the
approximation bound (Prop. 1) and the one resumable results store they share."""

from tl_tensorlens.evaluation.store import ResultsStoreWarning, ResultStore

__all__ = ["ResultStore", "ResultsStoreWarning"]
