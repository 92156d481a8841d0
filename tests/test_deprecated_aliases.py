"""Every deprecated alias of 0.1 (tl_tensorlens._deprecation) warns with the new name and still works."""

import importlib
import sys

import pytest
import torch

from tests.models import TOKENS

#: Old module -> the new module(s) its warning names (tl_tensorlens/__init__.py).
MODULE_ALIASES = {
    "tl_tensorlens._compat": ["tl_tensorlens._backend"],
    "tl_tensorlens.baselines": ["tl_tensorlens.methods"],
    "tl_tensorlens.bound": ["tl_tensorlens.evaluation.bound"],
    "tl_tensorlens.metrics": ["tl_tensorlens.evaluation.metrics"],
    "tl_tensorlens.perturbation": ["tl_tensorlens.evaluation.perturbation"],
    "tl_tensorlens.plotting": ["tl_tensorlens.viz.plots"],
    "tl_tensorlens.relations": ["tl_tensorlens.evaluation.relations", "tl_tensorlens.methods.relations"],
    "tl_tensorlens.report": ["tl_tensorlens.viz.report"],
    "tl_tensorlens.workflows": ["tl_tensorlens.methods.logit_lens", "tl_tensorlens.methods.patching"],
}

#: (old module, old name, new module, new name)
MOVED_NAMES = [
    ("tl_tensorlens.capture", "detect_backend", "tl_tensorlens._backend", "model_kind"),
    ("tl_tensorlens.capture", "Backend", "tl_tensorlens._backend", "ModelKind"),
    ("tl_tensorlens.tensors", "_fmt_bytes", "tl_tensorlens.engine", "format_bytes"),
    ("tl_tensorlens.evaluation.perturbation", "plot_curves", "tl_tensorlens.viz.plots", "plot_perturbation_curves"),
]


@pytest.mark.parametrize("old", sorted(MODULE_ALIASES))
def test_module_alias_warns_and_forwards(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=rf"module {old} is deprecated.*use .*{MODULE_ALIASES[old][0]}"):
        mod = importlib.import_module(old)
    for new in MODULE_ALIASES[old]:
        target = importlib.import_module(new)
        name = sorted(getattr(target, "__all__", None) or [n for n in vars(target) if not n.startswith("__")])[0]
        assert getattr(mod, name) is getattr(target, name), (old, new, name)
    sys.modules.pop(old, None)


@pytest.mark.parametrize("old_module, old, new_module, new", MOVED_NAMES)
def test_moved_name_warns_and_is_the_new_object(old_module, old, new_module, new):
    mod = importlib.import_module(old_module)
    with pytest.warns(DeprecationWarning, match=rf"{old_module}\.{old} is deprecated.*use {new_module}.{new}"):
        obj = getattr(mod, old)
    assert obj is getattr(importlib.import_module(new_module), new)


def test_renamed_method_name_in_the_registry():
    from tl_tensorlens.methods import get_method

    with pytest.warns(DeprecationWarning, match="'tensor_logit'.*'tensor_in_class'"):
        old = get_method("tensor_logit")
    assert old is get_method("tensor_in_class")


@pytest.mark.parametrize("old", ["logit", "class"])
def test_old_collapse_kinds(decoder, old):
    from tl_tensorlens import TensorLens

    lens = TensorLens.from_model(decoder("gpt2"), TOKENS, output="ln_final")
    with pytest.warns(DeprecationWarning, match=rf"collapse kind '{old}' is deprecated.*'in_class'"):
        got = lens.collapse(old, token=5)
    torch.testing.assert_close(got, lens.collapse("in_class", token=5), rtol=0, atol=0)


def test_renamed_kwarg_layers_to_depths(decoder):
    from tl_tensorlens import capture
    from tl_tensorlens.methods.logit_lens import tensor_logit_lens

    model = decoder("gpt2")
    state = capture(model, TOKENS)
    with pytest.warns(DeprecationWarning, match=r"tensor_logit_lens\(layers=\.\.\.\) is deprecated.*use depths=\.\.\."):
        old = tensor_logit_lens(model, state, layers=[1, 2])
    new = tensor_logit_lens(model, state, depths=[1, 2])
    assert old.depths == new.depths == (1, 2)
    torch.testing.assert_close(old.maps, new.maps, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match=r"TensorLogitLens\.layers is deprecated.*depths"):
        assert old.layers == new.depths


def test_renamed_kwarg_and_new_name_together_is_an_error(decoder):
    from tl_tensorlens import ArgumentError, capture
    from tl_tensorlens.methods.logit_lens import tensor_logit_lens

    model = decoder("gpt2")
    state = capture(model, TOKENS)
    with pytest.raises((ArgumentError, TypeError)):
        tensor_logit_lens(model, state, layers=[1], depths=[1])
