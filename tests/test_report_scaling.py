"""The report at real-model size: sinks drawn apart, per-head contributions, the ranked head view.

Small models only (both TL lines); the one real-model check (SmolLM2) is marked ``llm``.
"""

import json
import time

import pytest
import torch

pytest.importorskip("matplotlib")

from tests.models import HAS_HOOKED, TOKENS, bridge_model  # noqa: E402
from tl_tensorlens import capture  # noqa: E402
from tl_tensorlens.errors import ArgumentError  # noqa: E402
from tl_tensorlens.methods.heads import attention_received, detect_sinks, head_contributions  # noqa: E402
from tl_tensorlens.replay import replay  # noqa: E402
from tl_tensorlens.viz import plots as plotting  # noqa: E402
from tl_tensorlens.viz.report import PAGED_LAYERS, explain, sink_positions  # noqa: E402

TOK = ["<bos>", " the", " cat", "\n", "$x$", " sat"]


def _models() -> list[tuple[str, object, float]]:
    """(name, float64 model, tolerance of the zero-the-head check relative to the logit scale)."""
    # Bridge RMS models: HF computes the norm in float32 inside a float64 model (docs/method.md §4).
    out: list[tuple[str, object, float]] = [("bridge_gpt2", bridge_model("gpt2"), 1e-12)]
    out.append(("bridge_llama_gqa", bridge_model("llama_gqa"), 1e-6))
    if HAS_HOOKED:
        from tests.models import hooked_model

        out.append(("hooked_gqa_bias", hooked_model("three_layers_gqa_bias"), 1e-12))
        out.append(("hooked_gemma2_softcaps", hooked_model("gemma2_softcaps_sandwich"), 1e-12))
    return out


def _tiny_bridge(n_layers: int):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(
        n_layers=n_layers, d_model=8, n_heads=3, d_head=4, d_mlp=16, d_vocab=23, n_ctx=12, act_fn="gelu_new", seed=0
    )
    return TransformerBridge.boot_native(cfg, dtype=torch.float64).eval()


# ------------------------------------------------------------------------------------ contributions
@pytest.mark.parametrize("which", range(4))
def test_head_contribution_is_what_zeroing_the_head_removes(which):
    models = _models()
    if which >= len(models):
        pytest.skip("HookedTransformer families need TL 3.x")
    name, model, tol = models[which]
    state = capture(model, TOKENS)
    n_heads = int(state.pattern(0).shape[0])
    token = 7
    hc = head_contributions(model, state, position=-1, token=token)

    def logit(heads=None):
        return float(replay(model, state, state.x0, output="logits", heads=heads)[-1, token].detach())

    full = logit()
    assert hc.value == pytest.approx(full, abs=1e-12)
    scale = max(1.0, abs(full))
    for layer in range(state.n_layers):
        for h in range(n_heads):
            removed = full - logit({layer: [k for k in range(n_heads) if k != h]})
            assert abs(removed - float(hc.contributions[layer, h])) <= tol * scale, (name, layer, h)
        # the heads of one layer add up: together they carry what zeroing the whole layer removes
        assert abs((full - logit({layer: []})) - float(hc.contributions[layer].sum())) <= tol * scale, (name, layer)
    assert torch.allclose(hc.by_source.sum(-1), hc.contributions, atol=1e-12 * scale)
    assert float(hc.contributions.abs().max()) > 1e-3  # not trivially zero


def test_head_contributions_bad_input():
    model = bridge_model("gpt2")
    state = capture(model, TOKENS)
    with pytest.raises(ArgumentError, match="token"):
        head_contributions(model, state)
    with pytest.raises(ArgumentError, match="vocab|0"):
        head_contributions(model, state, token=10_000)
    with pytest.raises(ArgumentError, match="position"):
        head_contributions(model, state, token=3, position=99)
    hc = head_contributions(model, state, token=3)
    with pytest.raises(ArgumentError, match="by"):
        hc.top(3, by="largest")


def test_top_heads_are_ranked_by_magnitude():
    model = bridge_model("llama_gqa")
    hc = head_contributions(model, TOKENS, token=11)
    c = hc.contributions
    ranked = hc.top(c.numel())
    mags = [abs(v) for _, _, v in ranked]
    assert mags == sorted(mags, reverse=True)
    assert {(layer, h) for layer, h, _ in ranked} == {
        (layer, h) for layer in range(c.shape[0]) for h in range(c.shape[1])
    }
    assert all(float(c[layer, h]) == v for layer, h, v in ranked)
    pos = [v for _, _, v in hc.top(c.numel(), by="positive")]
    assert pos == sorted(pos, reverse=True) and pos[0] == float(c.max())
    assert hc.top(3) == ranked[:3]


# ------------------------------------------------------------------------------------ sinks
def test_attention_received_and_sink_modes():
    model = bridge_model("gpt2")
    state = capture(model, TOKENS)
    r = attention_received(state)
    n = state.n_pos
    A = torch.stack([state.pattern(layer) for layer in range(state.n_layers)]).double()
    for j in (0, 3, n - 2):  # brute force: the mean over every later query of every head
        assert float(r[j]) == pytest.approx(float(A[:, :, j + 1 :, j].mean()), abs=1e-12)
    assert float(r[-1]) == 0.0
    t = float(r.max())
    assert detect_sinks(state, t) == [int(r.argmax())]
    assert detect_sinks(state, 1.0) == ([] if t < 1 else [int(r.argmax())])
    assert sink_positions(state, "include") == [] and sink_positions(state, "first") == [0]
    assert set(sink_positions(state, "auto")) >= {0}
    with pytest.raises(ArgumentError, match="sink"):
        sink_positions(state, "exclude-all")
    with pytest.raises(ArgumentError, match="threshold"):
        detect_sinks(state, 0.0)


def _image_data(fig):
    return fig.axes[0].images[0].get_array()


def test_a_sink_column_does_not_set_the_colour_scale():
    g = torch.Generator().manual_seed(0)
    n = len(TOK)
    M = torch.tril(torch.rand(n, n, generator=g))
    M[:, 0] = 1000.0  # an attention sink
    fig = plotting.plot_map(M, TOK, apart=[0])
    norm = fig.axes[0].images[0].norm
    assert norm.vmax == pytest.approx(float(torch.tril(M)[:, 1:].max()))  # the rest sets the scale
    assert plotting.plot_map(M, TOK).axes[0].images[0].norm.vmax == pytest.approx(1000.0)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels[0] == plotting.SINK_MARK + "<bos>" and labels[1] == "␣the" and labels[3] == "↵"
    assert labels[4] == "\\$x\\$"  # escaped: no mathtext
    # the stacked rows: each row scaled without the sink, the sink's multiple written in its cell
    maps = {"a": M, "b": -M}
    row = _image_data(plotting.plot_method_comparison(maps, TOK, position=-1, apart=[0]))
    assert bool(row.mask[:, 0].all()) or bool(torch.isnan(torch.as_tensor(row.data[:, 0])).all())
    assert float(abs(row[:, 1:]).max()) == pytest.approx(1.0)
    texts = [t.get_text() for t in plotting.plot_method_comparison(maps, TOK, position=-1, apart=[0]).axes[0].texts]
    expected = 1000.0 / float(M[-1, 1:].max())
    assert f"{expected:+.2g}×" in texts
    whole = _image_data(plotting.plot_method_comparison(maps, TOK, position=-1))
    assert float(abs(whole[:, 1:]).max()) < 0.01  # without: everything else is washed out


def test_explain_keeps_sink_values_in_json(tmp_path):
    model = bridge_model("gpt2")
    rep = explain(model, TOKENS, tmp_path / "r", methods=["tensor_norm", "tensor_in_class"], interactive=False)
    assert rep.sinks[0] == 0
    data = json.loads((tmp_path / "r" / "maps.json").read_text())
    assert data["sinks"]["mode"] == "auto" and data["sinks"]["positions"] == list(rep.sinks)
    p = rep.position
    for name, M in rep.maps.items():
        assert data["maps"][name][p][0] == pytest.approx(float(M[p, 0]))  # the map is unchanged
        assert data["sinks"]["at_position"][name]["0"] == pytest.approx(float(M[p, 0]))
    html = (tmp_path / "r" / "index.html").read_text()
    assert "Drawn apart" in html and '"sinks": [0' in html
    rep2 = explain(model, TOKENS, tmp_path / "s", methods=["tensor_norm"], interactive=False, sink="include")
    assert rep2.sinks == ()
    with pytest.raises(ArgumentError, match="sink"):
        explain(model, TOKENS, tmp_path / "t", methods=["tensor_norm"], sink="nope")


# ------------------------------------------------------------------------------------ head view
def test_head_summary_shows_the_contributions(tmp_path):
    model = bridge_model("gpt2")
    rep = explain(model, TOKENS, tmp_path / "r", methods=["tensor_norm"], interactive=False, top_heads=3)
    data = json.loads((tmp_path / "r" / "maps.json").read_text())
    hc = head_contributions(model, TOKENS, position=rep.position, token=data["head_contributions"]["token"])
    assert torch.allclose(torch.tensor(data["head_contributions"]["contributions"]).double(), hc.contributions)
    assert [(t["layer"], t["head"]) for t in data["head_contributions"]["top"]] == [(a, b) for a, b, _ in hc.top(3)]
    assert [(a, b) for a, b, _ in rep.top_heads] == [(a, b) for a, b, _ in hc.top(3)]
    fig = plotting.plot_head_summary(hc.contributions, highlight=[(a, b) for a, b, _ in hc.top(3)])
    drawn = torch.as_tensor(_image_data(fig).data)
    assert torch.allclose(drawn.double(), hc.contributions)
    labels = [
        t.get_text()
        for t in plotting.plot_top_heads(hc.by_source[:1, 0], rep.tokens, labels=["x"]).axes[0].get_yticklabels()
    ]
    assert labels == ["x"]
    assert {"head_summary.png", "top_heads.png", "heads.png"} <= set(rep.files)


def test_many_layers_get_per_layer_head_pages(tmp_path):
    n_layers = PAGED_LAYERS + 1
    model = _tiny_bridge(n_layers)
    out = tmp_path / "r"
    rep = explain(model, torch.arange(1, 11), out, methods=["tensor_norm"], per_layer=False, interactive=False)
    pages = sorted(p.name for p in (out / "heads").glob("*.png"))
    assert pages == [f"layer_{i:02d}.png" for i in range(n_layers)]
    assert "heads.png" not in rep.files and "head_summary.png" in rep.files
    html = (out / "index.html").read_text()
    assert html.count("<details>") == n_layers and "src='heads/layer_00.png'" in html
    import matplotlib.image as mpimg

    for png in [*out.glob("*.png"), *(out / "heads").glob("*.png")]:
        h, w = mpimg.imread(png).shape[:2]
        assert h <= 2500 and w <= 2500, (png.name, h, w)


def test_display_label():
    assert plotting.display_label(" Paris") == "␣Paris"
    assert plotting.display_label("'\\n'") == "↵"  # token_labels' repr of a blank token
    assert plotting.display_label("a" * 30).endswith("…") and len(plotting.display_label("a" * 30)) == 14


# ------------------------------------------------------------------------------------ real model
@pytest.mark.llm
def test_explain_smollm2_report_is_bounded(tmp_path):
    from tl_tensorlens.cli import main
    from tl_tensorlens.subjects import llm

    missing = llm.missing_packages("smollm2")
    if missing:
        pytest.skip(f"smollm2: packages {missing} not installed ({' && '.join(llm.INSTALL_COMMANDS)})")
    import matplotlib.image as mpimg

    out = tmp_path / "r"
    t0 = time.perf_counter()
    argv = ["explain", "--model", "smollm2", "--prompt", "The Eiffel Tower is in the city of", "--out", str(out)]
    assert main([*argv, "--backend", "bridge", "--no-interactive", "--methods", "tensor_norm,tensor_in_class"]) == 0
    elapsed = time.perf_counter() - t0
    data = json.loads((out / "maps.json").read_text())
    assert data["prediction"][-1].strip() == "Paris"
    assert 0 in data["sinks"]["positions"]
    assert len(data["head_contributions"]["contributions"]) == 30
    assert len(list((out / "heads").glob("layer_*.png"))) == 30 and not (out / "heads.png").exists()
    for png in [*out.glob("*.png"), *(out / "heads").glob("*.png")]:
        h, w = mpimg.imread(png).shape[:2]
        assert h <= 2500 and w <= 2500, (png.name, h, w)
    assert (out / "index.html").stat().st_size < 3_000_000
    print(f"explain on smollm2: {elapsed:.0f} s wall")  # no bound: the CI machine is shared
