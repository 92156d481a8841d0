"""Root pytest configuration.

* The checkout's data folder (``../shared/data``) is where the tests read data from: the package
  itself never looks there, so ``TL_TENSORLENS_DATA`` is pointed at it here unless already set.
* Docstring examples that build a ``HookedTransformer`` (TransformerLens 3.x only) are skipped on
  4.x with that reason; examples built on ``TransformerBridge.boot_native`` run on both lines.
"""

import os
from pathlib import Path

import pytest

from tl_tensorlens._backend import has_hooked_transformer

_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"
if "TL_TENSORLENS_DATA" not in os.environ and _DATA.is_dir():
    os.environ["TL_TENSORLENS_DATA"] = str(_DATA)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if has_hooked_transformer():
        return
    skip = pytest.mark.skip(reason="docstring example builds a HookedTransformer (TransformerLens 3.x only)")
    for item in items:
        if isinstance(item, pytest.DoctestItem) and "HookedTransformer" in "".join(
            ex.source for ex in getattr(item.dtest, "examples", [])
        ):
            item.add_marker(skip)
