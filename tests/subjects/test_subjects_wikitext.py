"""The WikiText subject: article split, vocabulary, windows, seeded training, loading, exact replay."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tl_tensorlens._backend import has_hooked_transformer
from tl_tensorlens.errors import TensorLensError
from tl_tensorlens.replay import verify_replay
from tl_tensorlens.subjects import (
    WikiTextConfig,
    build_wikitext_subject,
    evaluate_wikitext,
    heldout_windows,
    load_local,
    load_subject,
    load_wikitext,
    train_wikitext,
    wikitext_cache_dir,
)
from tl_tensorlens.subjects.wikitext import BOS_ID, UNK_ID, encode_articles, split_articles, wikitext_tokenizer, windows

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
BACKENDS = ["bridge", "hooked"] if has_hooked_transformer() else ["bridge"]
TINY = WikiTextConfig(steps=6, d_model=16, n_heads=2, vocab_size=200, n_ctx=16, eval_every=3, eval_windows=8)

# The raw file's layout: titles " = T = " (with a trailing space), sections " = = S = = ", blank lines.
TEXT = "\n".join(
    [
        " = First = ",
        " Alpha beta beta .",
        " ",
        " = = Section = = ",
        " Gamma beta .",
        " = Second =",
        " Delta alpha .",
        " = Third = ",
        " Epsilon .",
    ]
)


def _corpus_or_skip(config: WikiTextConfig = TINY):
    try:
        return load_wikitext(config)
    except TensorLensError as e:
        pytest.skip(f"../shared/data unavailable: {e}")


def test_split_articles_by_title_lines():
    c = split_articles(TEXT, heldout_every=2)
    # articles 0 (First, with its sub-section) and 2 (Third) are held out
    assert [a[:3] for a in c.heldout_articles] == [["=", "first", "="], ["=", "third", "="]]
    assert c.heldout_articles[0][3:] == [
        "alpha",
        "beta",
        "beta",
        ".",
        "=",
        "=",
        "section",
        "=",
        "=",
        "gamma",
        "beta",
        ".",
    ]
    assert c.train_articles == [["=", "second", "=", "delta", "alpha", "."]]
    with pytest.raises(TensorLensError, match="heldout_every"):
        split_articles(TEXT, heldout_every=1)


def test_vocabulary_is_the_most_frequent_words_of_the_given_articles():
    c = split_articles(TEXT, heldout_every=2)
    # Build from the two held-out articles: '=' 8, '.' 3, 'beta' 3, the rest once.
    specials = {"<bos>", "<eos>", "<pad>", "<unk>"}
    tok = wikitext_tokenizer(c.heldout_articles, vocab_size=4 + 3)
    assert set(tok.get_vocab()) == specials | {"=", ".", "beta"}
    tok = wikitext_tokenizer(c.heldout_articles, vocab_size=4 + 2)  # the tie at 3 goes alphabetically
    assert set(tok.get_vocab()) == specials | {"=", "."}
    ids = encode_articles(tok, c.train_articles)  # = second = delta alpha .
    assert ids.tolist().count(UNK_ID) == 3 and ids.shape == (6,)  # second, delta, alpha
    with pytest.raises(TensorLensError, match="vocab_size"):
        wikitext_tokenizer(c.train_articles, vocab_size=4)


def test_windows_are_bos_prefixed_and_drop_the_tail():
    w = windows(torch.arange(10, 20), n_ctx=4)
    assert w.tolist() == [[BOS_ID, 10, 11, 12], [BOS_ID, 13, 14, 15], [BOS_ID, 16, 17, 18]]
    with pytest.raises(TensorLensError, match="no window"):
        windows(torch.arange(2), n_ctx=4)


def test_real_split_is_disjoint_and_deterministic():
    c = _corpus_or_skip(WikiTextConfig())
    assert len(c.train_articles) + len(c.heldout_articles) == 62 and len(c.heldout_articles) == 7
    titles = lambda arts: {" ".join(a[: a.index("=", 1) + 1]) for a in arts}  # noqa: E731
    assert not titles(c.train_articles) & titles(c.heldout_articles)
    assert sum(map(len, c.train_articles)) > 200_000
    assert load_wikitext(WikiTextConfig()).heldout_articles == c.heldout_articles


def test_tiny_training_is_deterministic():
    _corpus_or_skip()
    a, b = train_wikitext(TINY), train_wikitext(TINY)
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert a.metrics["heldout_loss"] == b.metrics["heldout_loss"]
    assert 0 < a.metrics["heldout_unk_rate"] < 1 and a.metrics["heldout_windows"] == 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_script_build_loads_reproduces_metrics_and_replays_exactly(tmp_path: Path, backend: str):
    _corpus_or_skip()
    spec = importlib.util.spec_from_file_location("train_wikitext", REPO / "scripts" / "train_wikitext.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "wikitext"
    args = ["--out", str(out), "--steps", "6", "--d-model", "16", "--vocab-size", "200", "--n-ctx", "16"]
    assert script.main([*args, "--eval-windows", "8"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "| step |" in (out / "README.md").read_text() and len(metrics["curve"]) >= 1
    model = load_local(out, backend=backend, dtype=torch.float64)
    tokens = heldout_windows(model.tokenizer, TINY)[:8]
    got = evaluate_wikitext(model, tokens)
    assert got["loss"] == pytest.approx(metrics["heldout_loss"], rel=1e-4)
    assert got["unk_rate"] == metrics["heldout_unk_rate"]
    assert all(c.ok for c in verify_replay(model, tokens[:1], outputs=("resid_post", "logits")))


def test_load_subject_needs_a_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TL_TENSORLENS_CACHE", str(tmp_path))
    assert wikitext_cache_dir() == tmp_path / "subjects" / "wikitext"
    with pytest.raises(TensorLensError, match="train_wikitext.py"):
        load_subject("wikitext")
    _corpus_or_skip()
    build_wikitext_subject(config=TINY)
    s = load_subject("wikitext", backend="bridge")
    assert s.model.cfg.d_model == 16 and s.metrics["heldout_windows"] == 8
