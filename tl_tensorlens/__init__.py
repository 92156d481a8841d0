"""TensorLens for TransformerLens: a transformer at a fixed input as one exact linear operator.

The pipeline, one module (or folder) per stage:

1. :mod:`~tl_tensorlens.capture` — one forward freezes every input-dependent coefficient (FrozenState);
2. :mod:`~tl_tensorlens.replay` — the model with those values substituted, exactly affine in its input;
3. :mod:`~tl_tensorlens.engine` — chunked VJPs/JVPs of the replay under a memory budget;
4. :mod:`~tl_tensorlens.tensors` — the lens API (TensorLens, HeadTensor, collapses);
5. :mod:`~tl_tensorlens.methods` (relevance methods, logit lens, patching, relation operators) and
   :mod:`~tl_tensorlens.evaluation` (metrics, perturbation, relation decoding, the bound, the store);
6. :mod:`~tl_tensorlens.viz` (plots, report) and :mod:`~tl_tensorlens.cli` (commands).
"""

from tl_tensorlens._deprecation import install_module_aliases
from tl_tensorlens.capture import FrozenState, capture, capture_batch, check_supported, model_fingerprint
from tl_tensorlens.engine import default_memory_budget
from tl_tensorlens.errors import (
    ArgumentError,
    CaptureError,
    MemoryBudgetError,
    ReplayError,
    StateMismatchError,
    TensorLensError,
    UnsupportedModelError,
    VerificationError,
)
from tl_tensorlens.evaluation.attribution import Attribution, attribute
from tl_tensorlens.evaluation.bound import ApproximationReport, approximation_error
from tl_tensorlens.replay import ReplayCheck, ReplaySpec, frozen_hooks, linearized, live, replay, verify_replay
from tl_tensorlens.tensors import HeadTensor, RandomizedNorm, TensorLens

__version__ = "0.2.0"

# Modules of 0.1 that moved in 0.2 (the pipeline layout); importing them warns and forwards.
install_module_aliases(
    {
        "tl_tensorlens._compat": ["tl_tensorlens._backend"],
        "tl_tensorlens.baselines": ["tl_tensorlens.methods", "tl_tensorlens.methods.attention"],
        "tl_tensorlens.bound": ["tl_tensorlens.evaluation.bound"],
        "tl_tensorlens.metrics": ["tl_tensorlens.evaluation.metrics"],
        "tl_tensorlens.perturbation": ["tl_tensorlens.evaluation.perturbation", "tl_tensorlens.viz.plots"],
        "tl_tensorlens.plotting": ["tl_tensorlens.viz.plots"],
        "tl_tensorlens.relations": [
            "tl_tensorlens.evaluation.relations",
            "tl_tensorlens.methods.relations",
            "tl_tensorlens.viz.plots",
        ],
        "tl_tensorlens.report": ["tl_tensorlens.viz.report"],
        "tl_tensorlens.workflows": ["tl_tensorlens.methods.logit_lens", "tl_tensorlens.methods.patching"],
    }
)

__all__ = [
    "ApproximationReport",
    "ArgumentError",
    "Attribution",
    "CaptureError",
    "FrozenState",
    "HeadTensor",
    "MemoryBudgetError",
    "RandomizedNorm",
    "ReplayCheck",
    "ReplayError",
    "ReplaySpec",
    "StateMismatchError",
    "TensorLens",
    "TensorLensError",
    "UnsupportedModelError",
    "VerificationError",
    "__version__",
    "approximation_error",
    "attribute",
    "capture",
    "capture_batch",
    "check_supported",
    "default_memory_budget",
    "frozen_hooks",
    "linearized",
    "live",
    "model_fingerprint",
    "replay",
    "verify_replay",
]
