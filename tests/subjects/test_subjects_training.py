"""Ground-truth generators and seeded retraining of the project-trained subjects, at tiny sizes."""

import importlib.util
import json
import random
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tl_tensorlens._backend import has_hooked_transformer
from tl_tensorlens.errors import TensorLensError
from tl_tensorlens.subjects import (
    InductionConfig,
    RelationConfig,
    evaluate_induction,
    few_shot_prompt,
    induction_batch,
    load_local,
    load_relation_specs,
    make_facts,
    relation_specs,
    train_induction,
    train_relations,
)
from tl_tensorlens.subjects.relation_model import RELATIONS, _training_sequence, relation_tokenizer, templates

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
BACKENDS = ["bridge", "hooked"] if has_hooked_transformer() else ["bridge"]
TINY_INDUCTION = InductionConfig(steps=12, d_model=16, n_ctx=16, eval_every=6, eval_seq_lens=(9, 15), eval_n=16)
TINY_RELATIONS = RelationConfig(steps=6, n_layers=1, d_model=16, n_ctx=48, n_entities=6, eval_every=3)


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_induction_batch_ground_truth():
    b = induction_batch(8, 21, seed=3)
    seg = 10
    assert b.tokens.shape == (8, 21) and (b.tokens[:, 0] == 0).all()
    assert torch.equal(b.tokens[:, 1 : seg + 1], b.tokens[:, seg + 1 :])
    for row in b.tokens[:, 1 : seg + 1]:
        assert len(set(row.tolist())) == seg  # distinct: the earlier occurrence is unique
    m = b.is_repeat
    assert m.sum() == 8 * (seg - 1)
    # the answer at a repeat position is the token after the earlier occurrence of the current token
    src_tokens = b.tokens.gather(1, b.src_pos.clamp(min=0))
    assert torch.equal(src_tokens[m], b.targets[m])
    prev = b.tokens.gather(1, (b.src_pos - 1).clamp(min=0))
    assert torch.equal(prev[m], b.tokens[m])
    assert (b.src_pos[~m] == -1).all()


def test_induction_batch_seeded_and_validated():
    assert torch.equal(induction_batch(4, 11, seed=1).tokens, induction_batch(4, 11, seed=1).tokens)
    assert not torch.equal(induction_batch(4, 11, seed=1).tokens, induction_batch(4, 11, seed=2).tokens)
    for bad in (10, 3, 2 * 96 + 3):
        with pytest.raises(TensorLensError, match="seq_len"):
            induction_batch(1, bad, seed=0)


def test_induction_retraining_is_deterministic():
    a, b = train_induction(TINY_INDUCTION), train_induction(TINY_INDUCTION)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    strip = lambda m: {k: v for k, v in m.items() if k != "train_seconds"}  # noqa: E731
    assert strip(a.metrics) == strip(b.metrics)
    assert [r["train_loss"] for r in a.log.curve] == [r["train_loss"] for r in b.log.curve]


def test_facts_and_templates():
    facts = make_facts(0)
    assert len(facts) == 48 * len(RELATIONS) and facts == make_facts(0) and facts != make_facts(1)
    held = set()
    for k in range(len(RELATIONS)):
        train, heldout = templates(k)
        assert train[0].startswith("{}") and len(heldout) == 1 and heldout[0] not in train
        held.add(heldout[0].split("{}")[0])
    assert len(held) == 3  # each modifier is held out for some relation and trained with others
    assert few_shot_prompt("{} speaks", [("Abo", "Welsh"), ("Bixa", "Basque")], "Cadu") == (
        "Abo speaks Welsh . Bixa speaks Basque . Cadu speaks"
    )
    with pytest.raises(TensorLensError, match="n_entities"):
        make_facts(0, n_entities=1000)


def test_relation_training_sequences_are_true_and_scored_right():
    tok = relation_tokenizer()
    vocab = tok.get_vocab()
    facts = make_facts(0)
    truth = {(f.subject, f.object) for f in facts}
    ids, scored = _training_sequence(random.Random(0), vocab, facts, RelationConfig())
    words = tok.convert_ids_to_tokens(ids)
    objects = {o for _, _, objs in RELATIONS.values() for o in objs}
    subjects = {f.subject for f in facts}
    for i, w in enumerate(words):
        if w in objects:
            subject = next(words[j] for j in range(i - 1, -1, -1) if words[j] in subjects)
            assert (subject, w) in truth
            assert i - 1 in scored
        if w in subjects:
            assert i - 1 not in scored  # subjects are random draws: not scored


def test_relation_retraining_is_deterministic():
    a, b = train_relations(TINY_RELATIONS), train_relations(TINY_RELATIONS)
    strip = lambda m: {k: v for k, v in m.items() if k != "train_seconds"}  # noqa: E731
    assert strip(a.metrics) == strip(b.metrics)
    for va, vb in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        assert torch.equal(va, vb)


def test_relation_specs_lre_layout():
    specs = relation_specs(make_facts(0, n_entities=6))
    assert [s["name"] for s in specs] == list(RELATIONS)
    assert all(len(s["samples"]) == 6 for s in specs)
    assert specs[0]["properties"] == {
        "relation_type": "synthetic",
        "domain_name": "person",
        "range_name": "city",
        "symmetric": False,
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_induction_script_writes_loadable_checkpoint(tmp_path: Path, backend: str):
    out = tmp_path / "induction"
    assert _script("train_induction").main(["--out", str(out), "--steps", "4", "--d-model", "16"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "repeat_acc_31" in metrics and "| step |" in (out / "README.md").read_text()
    model = load_local(out, backend=backend)
    got = evaluate_induction(model, seq_len=31, n=256, seed=10_031)
    assert got["repeat_acc"] == pytest.approx(metrics["repeat_acc_31"], abs=1e-3)


def test_train_relations_script_writes_relation_json(tmp_path: Path):
    out = tmp_path / "relations"
    assert _script("train_relations").main(["--out", str(out), "--steps", "2"]) == 0
    specs = load_relation_specs(out)
    assert len(specs) == len(RELATIONS) and len(specs[0]["samples"]) == 48
    assert load_local(out, backend="bridge").tokenizer.convert_tokens_to_ids("Oslo") > 3
