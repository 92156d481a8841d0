"""Relevance methods under one registry: attention baselines, tensor collapses, controls; plus the
tensor workflows (logit lens, patching) and the relation operators (mean tensor, LRE).

Every registered method has the signature ``fn(model, state, *, position=None, target=None) ->
[pos_out, pos_in]`` (see :mod:`tl_tensorlens.methods.registry`) and one name:

* attention baselines (paper Sec. 4.1, :mod:`~tl_tensorlens.methods.attention`): ``attn``,
  ``w_attn``, ``w_attn_res_ln``, ``globenc`` × ``rollout`` / ``mean``, and ``alti_rollout``;
* tensor collapses (:mod:`~tl_tensorlens.methods.collapses`): ``tensor_norm``, ``tensor_in_out``,
  ``tensor_in_class``;
* gradient baselines of the real model (:mod:`~tl_tensorlens.methods.gradients`, class-specific, like
  In+Class): ``input_x_gradient``, ``input_x_gradient_l2``, ``integrated_gradients``, ``attnlrp``,
  ``cp_lrp``;
* ``random``: the control.

Not maps, so not registered: :func:`~tl_tensorlens.methods.dla.component_attribution` (per-head /
MLP / embedding / bias direct logit attribution with its split over source tokens) and
:func:`~tl_tensorlens.methods.jlens.compare_jlens` (the frozen transport beside TL's Jacobian lens).
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
from tl_tensorlens.methods.collapses import (
    RANDOMIZED_NORM,
    TENSOR_METHODS,
    make_randomized_norm_method,
    make_tensor_method,
)
from tl_tensorlens.methods.controls import random_method
from tl_tensorlens.methods.dla import DLA_UNITS, ComponentAttribution, component_attribution, format_attribution
from tl_tensorlens.methods.gradients import (
    GRADIENT_METHODS,
    attnlrp,
    cp_lrp,
    input_x_gradient,
    input_x_gradient_l2,
    integrated_gradients,
    make_integrated_gradients,
)
from tl_tensorlens.methods.heads import HeadContributions, attention_received, detect_sinks, head_contributions
from tl_tensorlens.methods.jlens import JLensLayer, compare_jlens, format_jlens_table, lens_readout, transport_matrix
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
    register_method(
        RANDOMIZED_NORM,
        make_randomized_norm_method(16),
        description="TensorLens Norm collapse, Hutchinson estimate with 16 probes per row",
        family="tensor",
    )
    gradients = {
        "input_x_gradient": (input_x_gradient, "Input×Gradient of the real model, signed sum over d_model"),
        "input_x_gradient_l2": (input_x_gradient_l2, "Input×Gradient of the real model, L2 norm over d_model"),
        "integrated_gradients": (
            make_integrated_gradients(),
            "Integrated Gradients of the real model, zero baseline, 32 Gauss-Legendre nodes",
        ),
        "attnlrp": (attnlrp, "AttnLRP (Achtibat et al. 2024): lxt's rules on TL hooks"),
        "cp_lrp": (cp_lrp, "CP-LRP (Ali et al. 2022): attention and norms as constants; equals In+Class"),
    }
    for name, (fn, description) in gradients.items():
        register_method(name, fn, description=description, family="gradient", class_specific=True)
    register_method("random", random_method, description="random-ranking control", family="control")


_register_builtins()
del _register_builtins

__all__ = [
    "ALL_BASELINES",
    "ALTI",
    "BASELINES",
    "DLA_UNITS",
    "ComponentAttribution",
    "JLensLayer",
    "compare_jlens",
    "format_jlens_table",
    "lens_readout",
    "transport_matrix",
    "component_attribution",
    "format_attribution",
    "GRADIENT_METHODS",
    "HeadContributions",
    "INTRA_LAYER",
    "RANDOMIZED_NORM",
    "TENSOR_METHODS",
    "MethodInfo",
    "RelevanceMethod",
    "attention_received",
    "attnlrp",
    "cp_lrp",
    "detect_sinks",
    "get_method",
    "head_contributions",
    "input_x_gradient",
    "input_x_gradient_l2",
    "integrated_gradients",
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
