"""Attention-aggregation baselines and the relevance-method registry (paper Sec. 4.1)."""

from tl_tensorlens.baselines._common import row_normalize
from tl_tensorlens.baselines._cross import layer_mean, rollout
from tl_tensorlens.baselines._intra import INTRA_LAYER, layer_maps
from tl_tensorlens.baselines._methods import (
    ALL_BASELINES,
    ALTI,
    BASELINES,
    TENSOR_METHODS,
    _register_builtins,
    make_tensor_method,
    random_method,
)
from tl_tensorlens.baselines._registry import (
    MethodInfo,
    RelevanceMethod,
    get_method,
    list_methods,
    method_info,
    register_method,
    unregister_method,
)

_register_builtins()
del _register_builtins

__all__ = [
    "ALL_BASELINES",
    "ALTI",
    "BASELINES",
    "INTRA_LAYER",
    "TENSOR_METHODS",
    "MethodInfo",
    "RelevanceMethod",
    "get_method",
    "layer_maps",
    "layer_mean",
    "list_methods",
    "make_tensor_method",
    "method_info",
    "random_method",
    "register_method",
    "rollout",
    "row_normalize",
    "unregister_method",
]
