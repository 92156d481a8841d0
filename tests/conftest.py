"""Tiny-model fixtures, one per backend, for the tests that mirror the package.

* ``hooked`` — a factory of tiny ``HookedTransformer`` decoders (TransformerLens 3.x; skips on 4.x);
* ``native`` — a factory of tiny ``TransformerBridge.boot_native`` decoders from the same config
  fields (skips where the TL line has no ``boot_native``);
* ``bridge`` — a factory of ``TransformerBridge`` s around Hugging Face models built from configs;
* ``decoder`` — parametrized over :data:`tests.models.DECODER_BACKENDS` (``hooked`` on TL 3.x,
  ``native`` on both), so one test body checks every decoder backend the installed TL has;
* ``encoder`` — parametrized over :data:`tests.models.ENCODER_BACKENDS` (HookedEncoder on TL 3.x,
  a BERT Bridge on both).

Each factory is called as ``factory(family="gpt2", dtype=torch.float64, **config_overrides)`` and
carries its ``backend`` name.
"""

from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.models import (
    DECODER_BACKENDS,
    ENCODER_BACKENDS,
    HAS_HOOKED,
    HAS_NATIVE,
    HOOKED_CONFIGS,
    NATIVE_FAMILIES,
    NO_HOOKED,
    NO_NATIVE,
    any_encoder,
    bridge_model,
    decoder_model_cfg,
)


class Factory:
    """Builds tiny random models of one backend: ``factory(family, dtype=..., **overrides)``."""

    def __init__(self, backend: str, build: Callable[..., Any]) -> None:
        self.backend = backend
        self._build = build

    def __call__(self, family: str | None = "gpt2", dtype: torch.dtype = torch.float64, **overrides: Any) -> Any:
        return self._build(family, dtype, **overrides)

    def __repr__(self) -> str:
        return f"Factory({self.backend!r})"


def _decoder(backend: str) -> Factory:
    def build(family: str | None, dtype: torch.dtype, **overrides: Any) -> Any:
        if backend == "native" and family is not None and family not in NATIVE_FAMILIES:
            pytest.skip(f"boot_native does not build the {family!r} family as configured (see NATIVE_FAMILIES)")
        config = {**(HOOKED_CONFIGS[family] if family is not None else {}), **overrides}
        return decoder_model_cfg(backend, dtype, **config)

    return Factory(backend, build)


@pytest.fixture
def hooked() -> Factory:
    """Tiny HookedTransformer decoders (TransformerLens 3.x only)."""
    if not HAS_HOOKED:
        pytest.skip(NO_HOOKED)
    return _decoder("hooked")


@pytest.fixture
def native() -> Factory:
    """Tiny ``TransformerBridge.boot_native`` decoders (no Hugging Face model)."""
    if not HAS_NATIVE:
        pytest.skip(NO_NATIVE)
    return _decoder("native")


@pytest.fixture
def bridge() -> Factory:
    """TransformerBridges around tiny Hugging Face models (families of tests.models.BRIDGE_FAMILIES)."""

    def build(family: str | None, dtype: torch.dtype, **overrides: Any) -> Any:
        if overrides:
            raise TypeError("bridge models take no config overrides; build an HF model with tests.models.hf_model")
        return bridge_model(family or "gpt2", dtype)

    return Factory("bridge", build)


@pytest.fixture(params=DECODER_BACKENDS)
def decoder(request: pytest.FixtureRequest) -> Factory:
    """Tiny decoders on every decoder backend the installed TL has (hooked on 3.x, native on both)."""
    return _decoder(request.param)


@pytest.fixture(params=ENCODER_BACKENDS)
def encoder(request: pytest.FixtureRequest) -> Factory:
    """A tiny BERT encoder: HookedEncoder (TL 3.x) or a BERT TransformerBridge (both lines)."""

    def build(family: str | None, dtype: torch.dtype, **overrides: Any) -> Any:
        if overrides:
            from tests.models import encoder_model

            if request.param != "hooked":
                pytest.skip("config overrides build a HookedEncoder (TransformerLens 3.x only)")
            return encoder_model(dtype, **overrides)
        return any_encoder(request.param, dtype)

    return Factory(request.param, build)
