"""Relevance methods under one registry: attention baselines, tensor collapses, controls; plus the
tensor workflows (logit lens, patching) and the relation operators (mean tensor, LRE).

Every registered method has the signature ``fn(model, state, *, position=None, target=None) ->
[pos_out, pos_in]`` (see :mod:`tl_tensorlens.methods.registry`) and one name:

* attention baselines (paper Sec. 4.1, :mod:`~tl_tensorlens.methods.attention`): ``attn``,
  ``w_attn``, ``w_attn_res_ln``, ``globenc`` × ``rollout`` / ``mean``, and ``alti_rollout``;
* tensor collapses (:mod:`~tl_tensorlens.methods.collapses`): ``tensor_norm``, ``tensor_in_out``,
  ``tensor_in_class``;
* ``random``: the control.
"""

from tl_tensorlens.methods.attention import (
    ALL_BASELINES,
    ALTI,
    BASELINES,
    INTRA_LAYER,
    baseline_description,
    baseline_method,
    layer_maps,
    layer_mean,
    rollout,
    row_normalize,
)
from tl_tensorlens.methods.collapses import TENSOR_METHODS, make_tensor_method
from tl_tensorlens.methods.controls import random_method
from tl_tensorlens.methods.registry import (
    MethodInfo,
    RelevanceMethod,
    get_method,
    list_methods,
    method_info,
    register_method,
    unregister_method,
)


def _register_builtins() -> None:
    for name in ALL_BASELINES:
        register_method(name, baseline_method(name), description=baseline_description(name), family="attention")
    descriptions = {
        "tensor_norm": "TensorLens Norm collapse ‖T[i,:,j,:]‖_F (Eq. 21)",
        "tensor_in_out": "TensorLens In+Out collapse (Eq. 22-23)",
        "tensor_in_class": "TensorLens In+Class collapse for the target class/token (Eq. 24)",
    }
    for name in TENSOR_METHODS:
        register_method(
            name,
            make_tensor_method(name),
            description=descriptions[name],
            family="tensor",
            class_specific=name == "tensor_in_class",
        )
    register_method("random", random_method, description="random-ranking control", family="control")


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
