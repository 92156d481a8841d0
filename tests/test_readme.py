"""The README's Python example runs as written (so the front page cannot rot)."""

import re
from pathlib import Path

import pytest

from tests.models import HAS_HOOKED

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.skipif(not HAS_HOOKED, reason="the README example builds a HookedTransformer (TL 3.x)")
def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102 - our own README
    lens = namespace["lens"]
    assert namespace["T"].shape == (4, 16, 4, 16)
    assert namespace["M"].shape == (4, 4)
    assert lens.state.backend == "hooked"
