"""The perturbation study's method list: which Integrated Gradients a real subject runs."""

import argparse

from tl_tensorlens.methods import get_method
from tl_tensorlens.studies.perturbation import IG_REF, METHODS, _methods


def test_default_list_swaps_ig_for_the_reference_token_baseline():
    methods = _methods(argparse.Namespace(methods=None), METHODS, ig_baseline=3, keep=(0,))
    assert IG_REF in methods and "integrated_gradients" not in methods
    assert len(methods) == len(METHODS)
    assert get_method(IG_REF) is not get_method("integrated_gradients")


def test_an_explicit_request_keeps_the_zero_baseline():
    """--methods integrated_gradients means the registry's zero-baseline IG, not a silent substitute."""
    methods = _methods(argparse.Namespace(methods="integrated_gradients, tensor_in_class"), METHODS, ig_baseline=3)
    assert methods == ["integrated_gradients", "tensor_in_class"]
    explicit_ref = _methods(argparse.Namespace(methods=IG_REF), METHODS, ig_baseline=3)
    assert explicit_ref == [IG_REF]
