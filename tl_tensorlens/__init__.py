"""TensorLens for TransformerLens: a transformer at a fixed input as one exact linear operator."""

from tl_tensorlens.bound import ApproximationReport, approximation_error
from tl_tensorlens.capture import FrozenState, capture, check_supported
from tl_tensorlens.errors import (
    CaptureError,
    MemoryBudgetError,
    ReplayError,
    TensorLensError,
    UnsupportedModelError,
    VerificationError,
)
from tl_tensorlens.replay import ReplayCheck, ReplaySpec, frozen_hooks, linearized, live, replay, verify_replay
from tl_tensorlens.tensors import HeadTensor, RandomizedNorm, TensorLens, default_memory_budget

__version__ = "0.1.0"

__all__ = [
    "CaptureError",
    "FrozenState",
    "HeadTensor",
    "RandomizedNorm",
    "TensorLens",
    "default_memory_budget",
    "MemoryBudgetError",
    "ReplayCheck",
    "ReplayError",
    "ReplaySpec",
    "TensorLensError",
    "UnsupportedModelError",
    "VerificationError",
    "ApproximationReport",
    "__version__",
    "approximation_error",
    "capture",
    "check_supported",
    "frozen_hooks",
    "linearized",
    "live",
    "replay",
    "verify_replay",
]
