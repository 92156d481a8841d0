"""Root pytest configuration: doctests in tl_tensorlens run on TransformerLens 3.x only.

Most docstring examples build a tiny ``HookedTransformer``, which TransformerLens 4 removed; on 4.x
they are skipped with that reason (the Bridge paths are covered by tests/).
"""

import pytest

from tl_tensorlens._compat import has_hooked_transformer


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if has_hooked_transformer():
        return
    skip = pytest.mark.skip(reason="docstring examples build a HookedTransformer (TransformerLens 3.x only)")
    for item in items:
        if isinstance(item, pytest.DoctestItem):
            item.add_marker(skip)
