"""The fine-tuned polarity subject: the recipe end to end on a tiny random BERT (save/load round trip,
resume after a kill, atomic writes), and, when the real build is in the cache, its accuracy and the
exactness of TL and of the lens on it."""

import json
from pathlib import Path

import pytest
import torch

from tl_tensorlens._backend import has_hooked_transformer
from tl_tensorlens.errors import TensorLensError
from tl_tensorlens.replay import verify_replay
from tl_tensorlens.subjects import (
    FinetuneConfig,
    final_hidden_hook,
    list_subjects,
    load_polarity_data,
    load_subject,
    subject_path,
    train_polarity_finetuned,
)
from tl_tensorlens.subjects.polarity import PolarityHead
from tl_tensorlens.subjects.polarity_finetuned import (
    HEAD_FILENAME,
    _trainable,
    cls_states,
    finetuned_cache_dir,
    is_built,
    load_finetuned_head,
    save_polarity_finetuned,
)

torch.set_num_threads(1)

BACKENDS = ["bridge", "hooked"] if has_hooked_transformer() else ["bridge"]
ADJ = {
    "pos": ["good", "great", "fun", "moving", "warm", "witty"],
    "neg": ["bad", "dull", "boring", "flat", "tired", "weak"],
}
NOUNS = ["movie", "film", "story", "cast", "plot"]
TINY = FinetuneConfig(epochs=2, batch_size=8, lr=1e-3, head_lr=1e-2, eval_batch_size=16, bucket=2)


class _Killed(Exception):
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random 2-layer BERT (d_model 32) with a word-level WordPiece vocabulary, and a polarity
    data folder of 60 template sentences (30 per class) in the corpus' layout."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny_bert")
    data = root / "data"
    data.mkdir()
    for label, adjs in ADJ.items():
        lines = [f"a {a} {n} ." for a in adjs for n in NOUNS]
        (data / f"rt-polarity.{label}").write_text("\n".join(lines) + "\n", encoding="latin-1")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", ".", *ADJ["pos"], *ADJ["neg"], *NOUNS]
    base = root / "base"
    base.mkdir()
    (base / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(base / "vocab.txt")).save_pretrained(str(base))
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=160,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(base))
    return base, data


def _hf_logits(model, tokenizer, head: PolarityHead, sentences: list[str]) -> torch.Tensor:
    return head.logits(cls_states(model, tokenizer, sentences, max_len=64, batch_size=16))


def test_registered_and_missing_build_says_how_to_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TL_TENSORLENS_CACHE", str(tmp_path))
    assert "polarity_ft" in [s.name for s in list_subjects()]
    assert subject_path("polarity_ft") == tmp_path / "subjects" / "polarity_ft" == finetuned_cache_dir()
    with pytest.raises(TensorLensError, match=r"scripts/train_polarity_finetuned\.py.*build=True"):
        load_subject("polarity_ft")
    (tmp_path / "subjects" / "polarity_ft").mkdir(parents=True)  # an empty folder is no build either
    with pytest.raises(TensorLensError, match="holds no build"):
        load_subject("polarity_ft")


def test_tiny_recipe_saves_a_folder_that_loads_with_bit_identical_logits(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from transformers import AutoTokenizer, BertModel

    base, data = tiny
    result = train_polarity_finetuned(TINY, base=base, data_path=data, progress=False)
    split = load_polarity_data(TINY.seed, path=data)
    m = result.metrics
    assert (m["n_train"], m["n_val"], m["n_test"]) == (48, 6, 6)
    assert [row["epoch"] for row in result.curve] == [1.0, 2.0] and m["best_epoch"] in (1, 2)
    assert m["val_acc"] == max(row["val_acc"] for row in result.curve)  # selected on validation
    assert result.head.W.shape == (32, 2) and result.head.position == 0

    out = save_polarity_finetuned(result, tmp_path / "subjects" / "polarity_ft")
    assert is_built(out)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", HEAD_FILENAME, "metrics.json", "README.md"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]  # safetensors only
    card = (out / "README.md").read_text()
    assert "Apache-2.0" in card and "CC BY 4.0" in card and "| epoch |" in card
    assert json.loads((out / "metrics.json").read_text())["test_acc"] == m["test_acc"]

    # transformers reload: the same weights, so bit-identical logits and the same recorded accuracies
    hf = BertModel.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    head = load_finetuned_head(out)
    assert torch.equal(head.W, result.head.W) and torch.equal(head.b, result.head.b)
    for sentences, labels, key in (
        (split.train.sentences, split.train.labels, "train_acc"),
        (split.test.sentences, split.test.labels, "test_acc"),
    ):
        before = _hf_logits(result.model, result.tokenizer, result.head, sentences)
        after = _hf_logits(hf, tok, head, sentences)
        assert torch.equal(before, after)
        assert (after.argmax(-1) == labels).double().mean().item() == m[key]

    # TransformerLens, through the registry: the head follows dtype, and TL's [CLS] logits are HF's
    monkeypatch.setenv("TL_TENSORLENS_CACHE", str(tmp_path))
    for backend in BACKENDS:
        s = load_subject("polarity_ft", backend=backend, dtype=torch.float64)
        assert s.name == "polarity_ft" and s.path == out and s.metrics["test_acc"] == m["test_acc"]
        assert s.head is not None and s.head.W.dtype == torch.float64
        hook = final_hidden_hook(s.model)
        ref = _hf_logits(
            BertModel.from_pretrained(str(out), dtype=torch.float64).eval(), tok, s.head, split.test.sentences[:3]
        )
        for i, sentence in enumerate(split.test.sentences[:3]):
            ids = s.model.tokenizer(sentence, return_tensors="pt").input_ids
            _, cache = s.model.run_with_cache(ids, names_filter=hook)
            got = s.head.logits(cache[hook][0, 0])
            assert (got - ref[i]).abs().max().item() < 1e-12, backend


def test_a_killed_run_resumes_to_the_same_weights(tiny: tuple[Path, Path], tmp_path: Path):
    base, data = tiny
    whole = train_polarity_finetuned(TINY, base=base, data_path=data, work_dir=tmp_path / "a", progress=False)

    def kill_after_first(row: dict[str, float]) -> None:
        if row["epoch"] == 1:
            raise _Killed

    with pytest.raises(_Killed):
        train_polarity_finetuned(
            TINY, base=base, data_path=data, work_dir=tmp_path / "b", on_epoch_end=kill_after_first
        )
    assert (tmp_path / "b" / "last.safetensors").is_file()
    resumed = train_polarity_finetuned(TINY, base=base, data_path=data, work_dir=tmp_path / "b", progress=False)
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(whole.head.W, resumed.head.W) and torch.equal(whole.head.b, resumed.head.b)
    strip = lambda curve: [{k: v for k, v in r.items() if k != "seconds"} for r in curve]  # noqa: E731
    assert strip(whole.curve) == strip(resumed.curve)
    # the work folder remembers its recipe: another one must not silently continue from it
    with pytest.raises(TensorLensError, match=r"different recipe \(fields \['lr'\]\)"):
        train_polarity_finetuned(
            FinetuneConfig(**{**TINY.__dict__, "lr": 2e-3}), base=base, data_path=data, work_dir=tmp_path / "b"
        )


def test_a_failed_save_leaves_the_previous_build_intact(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import tl_tensorlens.subjects.polarity_finetuned as ft

    base, data = tiny
    result = train_polarity_finetuned(
        FinetuneConfig(**{**TINY.__dict__, "epochs": 1}), base=base, data_path=data, progress=False
    )
    out = save_polarity_finetuned(result, tmp_path / "polarity_ft")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_card(_: object) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(ft, "finetuned_card", broken_card)
    with pytest.raises(OSError, match="disk full"):
        save_polarity_finetuned(result, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["polarity_ft"]  # no temporary folder left behind


def test_trainable_parameters_follow_the_recipe(tiny: tuple[Path, Path]):
    from transformers import BertModel

    model = BertModel.from_pretrained(str(tiny[0]))
    names = {n for n, _ in _trainable(model, FinetuneConfig())}
    assert "embeddings.word_embeddings.weight" not in names and "embeddings.position_embeddings.weight" in names
    assert not any(n.startswith("pooler.") for n in names) and "encoder.layer.0.attention.self.query.weight" in names
    top = {n for n, _ in _trainable(model, FinetuneConfig(train_layers=1))}
    assert top and all(n.startswith("encoder.layer.1.") for n in top)
    assert all(p.requires_grad == (n in top) for n, p in model.named_parameters())
    with pytest.raises(TensorLensError, match=r"train_layers must be in \[1, 2\]"):
        _trainable(model, FinetuneConfig(train_layers=3))


# ---- the real build (built by scripts/train_polarity_finetuned.py into the cache) ----------------


def _real_or_skip() -> Path:
    folder = finetuned_cache_dir()
    if not is_built(folder):
        pytest.skip(f"polarity_ft not built at {folder} (python scripts/train_polarity_finetuned.py, 15-35 min)")
    if json.loads((folder / "metrics.json").read_text())["n_train"] != 8530:
        pytest.skip(f"{folder} holds a reduced build (--n-train), not the documented one")
    return folder


def _real_sentences_or_skip() -> list[str]:
    try:
        test = load_polarity_data(0).test.sentences
    except TensorLensError as e:
        pytest.skip(f"../shared/data unavailable: {e}")
    return test


def _inputs(tokenizer, sentences: list[str]) -> list[torch.Tensor]:
    """Three real test sentences and one 128-token input (test sentences joined, truncated)."""
    ids = [tokenizer(s, return_tensors="pt").input_ids for s in sentences[:3]]
    long = tokenizer(" ".join(sentences[:40]), return_tensors="pt", truncation=True, max_length=128).input_ids
    assert long.shape[1] == 128
    return [*ids, long]


def test_real_build_records_its_accuracy():
    folder = _real_or_skip()
    m = json.loads((folder / "metrics.json").read_text())
    assert m["test_acc"] >= 0.80 and m["n_test"] == 1066 and m["n_val"] == 1066
    assert m["val_acc"] == pytest.approx(max(r["val_acc"] for r in m["curve"]), abs=2 / 1066)
    assert m["test_acc_len128"] >= 0.80
    head = load_finetuned_head(folder)
    assert head.W.shape == (384, 2) and head.metrics["test_acc"] == m["test_acc"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_real_build_tl_reproduces_hf_cls_logits(backend: str, dtype: torch.dtype):
    from transformers import BertModel

    folder = _real_or_skip()
    sentences = _real_sentences_or_skip()
    s = load_subject("polarity_ft", backend=backend, dtype=dtype)
    assert s.head is not None
    hf = BertModel.from_pretrained(str(folder), dtype=dtype, attn_implementation="eager").eval()
    hook = final_hidden_hook(s.model)
    worst = 0.0
    with torch.no_grad():
        for ids in _inputs(s.model.tokenizer, sentences):
            ref = s.head.logits(hf(input_ids=ids).last_hidden_state[0, 0])
            _, cache = s.model.run_with_cache(ids, names_filter=hook)
            worst = max(worst, (s.head.logits(cache[hook][0, 0]) - ref).abs().max().item())
    # measured: float32 2.7e-6 (HookedEncoder), 0 (bridge); float64 8e-15 (HookedEncoder), 0 (bridge)
    assert worst < (1e-4 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_build_lens_is_exact(backend: str):
    from tl_tensorlens import TensorLens

    _real_or_skip()
    sentences = _real_sentences_or_skip()
    s = load_subject("polarity_ft", backend=backend, dtype=torch.float64)
    head = s.head
    assert head is not None
    hook = final_hidden_hook(s.model)
    for ids in _inputs(s.model.tokenizer, sentences)[::2]:  # a short sentence and the 128-token input
        for check in verify_replay(s.model, ids, outputs=("resid_post",)):
            assert check.ok and check.reproduction_error < 1e-12 and check.affine_error < 1e-10, check
        with torch.no_grad():
            _, cache = s.model.run_with_cache(ids, names_filter=hook)
        logits = head.logits(cache[hook][0, 0])
        lens = TensorLens.from_model(s.model, ids, output="resid_post", verify=False)
        for c in range(2):
            d = head.W[:, c]
            total = lens.collapse("in_class", direction=d, positions=[0])[0].sum()
            total = total + lens.collapse_bias("in_class", direction=d)[0] + head.b[c]
            assert abs(total.item() - logits[c].item()) < 1e-10, (c, total.item(), logits[c].item())


@pytest.mark.slow
def test_real_build_reproduces_recorded_test_accuracy():
    from transformers import AutoTokenizer, BertModel

    folder = _real_or_skip()
    test = load_polarity_data(0).test
    head = load_finetuned_head(folder)
    hf = BertModel.from_pretrained(str(folder)).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    logits = head.logits(cls_states(hf, tok, test.sentences, max_len=head.metrics["max_len"]))
    acc = (logits.argmax(-1) == test.labels).double().mean().item()
    assert acc == pytest.approx(head.metrics["test_acc"], abs=1.5 / 1066)  # thread count may flip one tie
