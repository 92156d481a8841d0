"""The README's Python example runs as written (so the front page cannot rot)."""

import re
from pathlib import Path

import pytest

from tests.models import HAS_HOOKED

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(marker: str) -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if marker in b]
    assert blocks, f"README has no python example with {marker!r}"
    return blocks[0]


@pytest.mark.skipif(not HAS_HOOKED, reason="the README example builds a HookedTransformer (TL 3.x)")
def test_readme_python_example_runs():
    namespace: dict = {}
    exec(compile(_block("HookedTransformerConfig("), str(README), "exec"), namespace)  # noqa: S102 - our own README
    lens = namespace["lens"]
    assert namespace["T"].shape == (4, 16, 4, 16)
    assert namespace["M"].shape == (4, 4)
    assert lens.state.backend == "hooked"


@pytest.mark.llm
def test_readme_real_model_example_runs(capsys):
    """The front page's SmolLM2 example (float64, ~30 s): the row plus its bias is the " Paris" logit."""
    from tl_tensorlens.subjects import llm

    missing = llm.missing_packages("smollm2")
    if missing:
        pytest.skip(f"smollm2: packages {missing} not installed ({' && '.join(llm.INSTALL_COMMANDS)})")
    namespace: dict = {}
    exec(compile(_block('load_subject("smollm2"'), str(README), "exec"), namespace)  # noqa: S102 - our own README
    model, tokens, row, bias, paris = (namespace[k] for k in ("model", "tokens", "row", "bias", "paris"))
    logit = float(model(tokens[None])[0, -1, paris])
    # the Bridge computes RMSNorm in float32 inside a float64 model: measured 2.4e-7 here
    assert abs(float(row.sum() + bias) - logit) < 2e-6 * abs(logit)
    assert int(model(tokens[None])[0, -1].argmax()) == paris  # the model does answer " Paris"
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == tokens.shape[0] + 1
