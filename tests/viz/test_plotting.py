"""Pictures are figures (never shown), readable PNGs, and optional libraries stay lazy."""

import subprocess
import sys

import pytest
import torch

pytest.importorskip("matplotlib")

from tl_tensorlens.errors import TensorLensError  # noqa: E402
from tl_tensorlens.viz import plots as plotting  # noqa: E402

TOK = ["<bos>", "the", "cat", "sat", "on", "the", "mat"]


def check_png(path, min_bytes=5_000):
    """A real, non-blank PNG: header, size, and more than one colour."""
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) >= min_bytes, (path, len(data))
    img = mpimg.imread(path)
    assert img.shape[0] >= 100 and img.shape[1] >= 100
    assert float(img[..., :3].std()) > 0.02, f"{path} looks blank"


def _save(fig, tmp_path, name):
    from matplotlib.figure import Figure

    assert isinstance(fig, Figure)
    path = tmp_path / name
    fig.savefig(path, dpi=80)
    check_png(path)
    return path


def test_every_plot_is_a_readable_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = len(TOK)
    causal = torch.tril(torch.randn(n, n, generator=g))
    fig = plotting.plot_map(causal, TOK, title="map", cbar_label="relevance")
    ax = fig.axes[0]
    assert ax.get_title() == "map" and [t.get_text() for t in ax.get_xticklabels()] == TOK
    assert len(fig.axes) == 2  # colour bar
    _save(fig, tmp_path, "map.png")
    _save(
        plotting.plot_map_grid(torch.rand(5, n, n, generator=g), TOK, titles=[f"L{i}" for i in range(5)], ncols=3),
        tmp_path,
        "grid.png",
    )
    _save(plotting.plot_relevance_strip(torch.randn(n, generator=g), TOK, title="strip"), tmp_path, "strip.png")
    maps = {"tensor_in_out": causal, "attn_rollout": torch.tril(torch.rand(n, n, generator=g))}
    _save(plotting.plot_method_comparison(maps, TOK), tmp_path, "cmp.png")
    _save(plotting.plot_method_comparison(maps, TOK, position=-1), tmp_path, "cmp_row.png")
    _save(
        plotting.plot_patching(torch.randn(2, n, generator=g), labels=TOK, reference=torch.randn(2, n, generator=g)),
        tmp_path,
        "patch.png",
    )
    curves = {"tensor_in_out": [1.0, 0.6, 0.3, 0.2], "attn_rollout": [1.0, 0.8, 0.7, 0.6]}
    _save(plotting.plot_perturbation_curves(curves, fractions=[0, 0.1, 0.2, 0.3]), tmp_path, "curves.png")


def test_workflow_plots(tmp_path):
    from tests.models import HAS_HOOKED, TOKENS

    if not HAS_HOOKED:
        pytest.skip("uses a HookedTransformer")
    from tests.models import hooked_model
    from tl_tensorlens.methods.logit_lens import tensor_logit_lens
    from tl_tensorlens.methods.patching import LogitDiff, frozen_component_patching

    model = hooked_model("gpt2")
    labels = plotting.token_labels(model, TOKENS[0])
    ll = tensor_logit_lens(model, TOKENS, positions=[-1])
    _save(plotting.plot_logit_lens(ll, labels, position=-1), tmp_path, "ll.png")
    corrupted = TOKENS.clone()
    corrupted[0, 2] = 30
    res = frozen_component_patching(model, TOKENS, corrupted, LogitDiff(-1, 3))
    _save(plotting.plot_component_patching(res, labels), tmp_path, "comp.png")


def test_plot_errors_name_the_mismatch():
    with pytest.raises(TensorLensError, match="3 input columns but 2"):
        plotting.plot_map(torch.rand(3, 3), ["a", "b"])
    with pytest.raises((TensorLensError, TypeError)):  # the type checker may refuse first under pytest
        plotting.plot_map(torch.rand(3), ["a", "b", "c"])
    with pytest.raises(TensorLensError, match="titles"):
        plotting.plot_map_grid(torch.rand(2, 3, 3), list("abc"), titles=["x"])
    with pytest.raises(TensorLensError, match="fractions"):
        plotting.plot_perturbation_curves({"a": [1, 2]})
    with pytest.raises(TensorLensError, match="position"):
        plotting.plot_method_comparison({"a": torch.rand(3, 3)}, list("abc"), position=5)


def test_html_fallback_is_self_contained():
    html = plotting.attention_html({"m": torch.rand(3, 3)}, ["a", "<b>", "c"], use_circuitsvis=False)
    assert "<table" in html and "&lt;b&gt;" in html and "<script" not in html
    strip = plotting.relevance_html(torch.tensor([0.5, -1.0, 0.0]), ["a", "b", "c"], use_circuitsvis=False)
    assert strip.count('class="tok"') == 3
    assert plotting.maps_to_json({"m": torch.tensor([[1.0, float("nan")]])}) == '{"m": [[1.0, null]]}'


def test_circuitsvis_html_is_offline():
    if not plotting.has_circuitsvis():
        pytest.skip("circuitsvis not installed (optional)")
    html = plotting.attention_html({"m": torch.rand(3, 3)}, ["a", "b", "c"])
    assert "CircuitsVis" in html and "unpkg.com" not in html  # the JS bundle is inlined


def test_import_does_not_load_optional_libraries():
    code = (
        "import sys, tl_tensorlens, tl_tensorlens.methods.patching, tl_tensorlens.viz.plots, tl_tensorlens.cli, "
        "tl_tensorlens.viz.report\n"
        "bad = [m for m in ('matplotlib', 'circuitsvis', 'plotly') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
