"""``tl-tensorlens --version``, and ``explain`` without matplotlib: checked before the model loads,
and the report still has ``index.html`` and ``maps.json``."""

import json
import sys

import pytest

import tl_tensorlens
from tl_tensorlens.cli import main
from tl_tensorlens.errors import MissingDependencyError

QUICK = ["--no-heads", "--no-layers", "--no-interactive", "--methods", "tensor_norm"]


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tl-tensorlens {tl_tensorlens.__version__}"


def test_explain_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    import tl_tensorlens.cli.explain as cli_explain

    real_load = cli_explain.load_model
    seen_at_load: list[str] = []

    def load_model(*args, **kwargs):
        seen_at_load.append(capsys.readouterr().err)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(cli_explain, "load_model", load_model)
    out = tmp_path / "rep"
    assert main(["explain", "--out", str(out), *QUICK]) == 0
    assert len(seen_at_load) == 1 and "matplotlib is not installed" in seen_at_load[0]  # said before loading
    files = {p.name for p in out.iterdir()}
    assert {"index.html", "maps.json"} <= files
    assert not any(f.endswith(".png") for f in files)
    payload = json.loads((out / "maps.json").read_text())
    assert payload["maps"]["tensor_norm"] and any("matplotlib" in n for n in payload["notes"])
    assert "matplotlib is not installed" in (out / "index.html").read_text()


def test_explain_pictures_true_needs_matplotlib(tmp_path, monkeypatch):
    import torch

    from tests.models import TOKENS, bridge_model
    from tl_tensorlens.viz.report import explain

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match="matplotlib"):
        explain(bridge_model("gpt2"), TOKENS[0], tmp_path, methods=["tensor_norm"], pictures=True)
    rep = explain(bridge_model("gpt2", torch.float64), TOKENS[0], tmp_path / "r", methods=["tensor_norm"])
    assert "index.html" in rep.files and not any(f.endswith(".png") for f in rep.files)
