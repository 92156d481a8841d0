"""Relation decoding: data loading, prompt alignment, the mean tensor (Eq. 26) and the LRE baseline."""

import json
from pathlib import Path

import pytest
import torch

from tl_tensorlens._backend import has_hooked_transformer
from tl_tensorlens.errors import ArgumentError
from tl_tensorlens.evaluation.relations import (
    PromptAlignmentError,
    PromptFormat,
    PromptTokenizer,
    Relation,
    RelationDataError,
    RelationSample,
    RelationStudyConfig,
    WordTokenizer,
    align_sample,
    align_samples,
    build_prompt,
    comparison_table,
    decoding_metrics,
    default_data_dir,
    item_scores,
    load_relation,
    load_relations,
    load_results,
    make_split,
    most_common_length,
    results_table,
    run_relation_study,
    stack_tokens,
    summarize_results,
)
from tl_tensorlens.methods.relations import MeanTensor, read_model, unembed
from tl_tensorlens.viz.plots import plot_relation_results

needs_hooked = pytest.mark.skipif(not has_hooked_transformer(), reason="HookedTransformer needs TransformerLens < 4")
LRE_DIR = default_data_dir() / "relations"


def tiny_model(decoder, seed: int = 0, d_vocab: int = 50):
    """A tiny LN decoder from the ``decoder`` fixture (HookedTransformer on TL 3.x, boot_native on both)."""
    return decoder(None, d_vocab=d_vocab, n_ctx=32, normalization_type="LN", seed=seed)


def write_relation(path: Path, name: str, samples: list[tuple[str, str]], **extra) -> Path:
    data = {
        "name": name,
        "prompt_templates": ["{} is in"],
        "prompt_templates_zs": ["Where is {}? It is in"],
        "properties": {"relation_type": "toy"},
        "samples": [{"subject": s, "object": o} for s, o in samples],
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


TOY = Relation(
    "toy city",
    ("{} is in",),
    (),
    tuple(RelationSample(f"c{i}", f"k{i % 4}") for i in range(12)),
)


# --------------------------------------------------------------------------- data
def test_loader_synthetic_file_and_folder(tmp_path):
    write_relation(tmp_path / "a" / "city_country.json", "city country", [("Paris", "France"), ("Rome", "Italy")])
    write_relation(tmp_path / "b" / "x.json", "word first letter", [("apple", "a")], few_shot_separator=" . ")
    one = load_relation(tmp_path / "a" / "city_country.json")
    assert one.name == "city country" and one.key == "city_country" and len(one) == 2
    assert one.relation_type == "toy" and one.few_shot_separator is None
    both = load_relations(tmp_path)
    assert [r.key for r in both] == ["city_country", "word_first_letter"]
    assert both[1].few_shot_separator == " . "
    assert [r.key for r in load_relations(tmp_path, names=["word first letter"])] == ["word_first_letter"]
    with pytest.raises(RelationDataError, match="not found"):
        load_relations(tmp_path, names=["nope"])
    with pytest.raises(RelationDataError, match="no relation data"):
        load_relations(tmp_path / "missing")


def test_loader_rejects_malformed(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "prompt_templates": ["no slot"], "samples": []}))
    with pytest.raises(RelationDataError, match="has no"):
        load_relation(bad)
    bad.write_text(json.dumps({"name": "x", "prompt_templates": ["{} is"], "samples": [{"subject": "a"}]}))
    with pytest.raises(RelationDataError, match="needs 'subject' and 'object'"):
        load_relation(bad)
    bad.write_text("{not json")
    with pytest.raises(RelationDataError, match="cannot read"):
        load_relation(bad)


def test_loader_decodes_double_escaped_unicode(tmp_path):
    path = tmp_path / "u.json"
    # The LRE files hold e.g. "Bras\\u00edlia": json.load gives a literal backslash-u sequence.
    path.write_text(
        '{"name": "u", "prompt_templates": ["{} is"], "samples": [{"subject": "x", "object": "Bras\\\\u00edlia"}]}'
    )
    assert load_relation(path).samples[0].object == "Brasília"


@pytest.mark.skipif(not LRE_DIR.is_dir(), reason=f"LRE relation data not found at {LRE_DIR}")
def test_loader_real_lre_files():
    relations = load_relations(LRE_DIR)
    assert len(relations) == 47
    assert sum(len(r) for r in relations) == 11089
    assert {r.relation_type for r in relations} == {"bias", "commonsense", "factual", "linguistic"}
    capital = load_relations(LRE_DIR, names=["country capital city"])[0]
    assert capital.prompt_templates[0] == "The capital city of {} is"
    assert RelationSample("France", "Paris") in capital.samples
    assert any(s.object == "Brasília" for s in capital.samples)
    assert all("\\u" not in s.subject + s.object for r in relations for s in r.samples)
    age = load_relations(LRE_DIR, names=["occupation_age"], relation_types=["bias"])[0]
    assert {s.object for s in age.samples} == {"young", "old"}


# --------------------------------------------------------------------------- prompts
def test_most_common_length_ties_and_empty():
    assert most_common_length([3, 4, 4, 3, 5]) == 3
    assert most_common_length([(4, 1), (4, 1), (3, 0)]) == (4, 1)
    with pytest.raises(PromptAlignmentError):
        most_common_length([])


def test_alignment_hand_made_lengths():
    # "New York" and "San Jose" have two-word subjects, the rest one word: the one-word group wins.
    r = Relation(
        "r",
        ("The city {} is in",),
        (),
        (
            RelationSample("Paris", "France"),
            RelationSample("New York", "USA"),
            RelationSample("Rome", "Italy"),
            RelationSample("San Jose", "USA"),
            RelationSample("Oslo", "Norway"),
            RelationSample("Paris", "Texas"),
        ),
    )
    tok = WordTokenizer.from_relations([r], d_vocab=100)
    aligned = align_samples(r, tok, few_shot="shared")
    assert [a.sample.subject for a in aligned] == ["Paris", "Rome", "Oslo"]  # duplicate "Paris" dropped
    assert {a.key for a in aligned} == {(5, 2)}  # "The city X is in": subject's last token at index 2
    # leave-one-out also needs equal demo lengths: nothing changes here (one-word objects).
    assert len(align_samples(r, tok, few_shot="leave_one_out")) == 3


def test_alignment_leave_one_out_filters_demo_length():
    r = Relation(
        "r",
        ("{} is in",),
        (),
        (
            RelationSample("a", "x"),
            RelationSample("b", "x y"),
            RelationSample("c", "z"),
            RelationSample("d", "w"),
        ),
    )
    tok = WordTokenizer.from_relations([r], d_vocab=100)
    assert len(align_samples(r, tok, few_shot="shared")) == 4
    assert [a.sample.subject for a in align_samples(r, tok, few_shot="leave_one_out")] == ["a", "c", "d"]


def test_prompt_positions_and_split_alignment():
    tok = WordTokenizer.from_relations([TOY], d_vocab=100)
    aligned = align_samples(TOY, tok)
    p = build_prompt(aligned[3], aligned[:2], tok)
    # BOS + 2 demos of "cX is in kY \n" (5 tokens each) + "cZ is in": subject at 1 + 10.
    assert p.n_pos == 14 and p.subject_pos == 11 and p.tokens[0] == 0
    assert p.tokens[p.subject_pos] == tok.encode("c3")[0]
    assert p.object_token == tok.encode(" k3")[0]
    for few_shot in ("leave_one_out", "shared"):
        cfg = RelationStudyConfig(n_train=4, few_shot=few_shot)
        split = make_split(aligned, tok, cfg, 0)
        assert split is not None
        prompts = split.train + split.test
        assert len({(q.n_pos, q.subject_pos) for q in prompts}) == 1
        assert stack_tokens(prompts).shape == (len(prompts), prompts[0].n_pos)
        train_subjects = {q.sample.subject for q in split.train}
        assert not train_subjects & {q.sample.subject for q in split.test}
        for q in prompts:  # a prompt never shows its own answer as a demo
            assert q.sample not in q.demos
        if few_shot == "leave_one_out":
            assert all(len(q.demos) == 3 for q in prompts)
        else:
            assert len(split.test) == len(aligned) - 4 - 3
    # seeded: same split twice, another split differs
    cfg = RelationStudyConfig(n_train=4)
    one, two = make_split(aligned, tok, cfg, 1), make_split(aligned, tok, cfg, 2)
    assert one is not None and two is not None
    assert one == make_split(aligned, tok, cfg, 1) and one.train != two.train
    assert make_split(aligned[:4], tok, cfg, 0) is None  # no test sample left


def test_stack_tokens_refuses_misaligned():
    tok = WordTokenizer.from_relations([TOY], d_vocab=100)
    a = align_samples(TOY, tok)
    with pytest.raises(PromptAlignmentError, match="not aligned"):
        stack_tokens([build_prompt(a[0], [], tok), build_prompt(a[1], [a[2]], tok)])


def test_alignment_detects_subject_merge():
    # A toy tokenizer that merges "X is" into one token when X ends with "!".
    def encode(text: str) -> list[int]:
        return [hash(w) % 97 for w in text.replace("! is", "!_is").split()]

    tok = PromptTokenizer(encode=encode, bos_token_id=None)
    with pytest.raises(PromptAlignmentError, match="merged"):
        align_sample(tok, "{} is in", RelationSample("wow!", "x"), PromptFormat())
    assert align_sample(tok, "{} is in", RelationSample("wow", "x"), PromptFormat()).subject_index == 0


def test_separator_from_relation():
    r = Relation("r", ("{} lives in",), (), (RelationSample("A", "X"),), few_shot_separator=" . ")
    fmt = PromptFormat().for_relation(r)
    assert fmt.demo_text("{} lives in", r.samples[0]) == "A lives in X . "
    assert PromptFormat(separator="; ").for_relation(r).separator == "; "


# --------------------------------------------------------------------------- metrics and tables
def test_decoding_metrics_hand_worked():
    approx = torch.tensor([[0.0, 3.0, 2.0, 1.0], [5.0, 0.0, 1.0, 2.0], [0.0, 1.0, 2.0, 3.0]])
    model = torch.tensor([[0.0, 9.0, 0.0, 0.0], [0.0, 9.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
    objects = torch.tensor([2, 0, 1])
    m = decoding_metrics(approx, model, objects, recall_k=2)
    assert m == pytest.approx({"faithfulness": 2 / 3, "accuracy": 1 / 3, "recall@k": 2 / 3})


def test_summary_table_and_plot():
    rows = []
    for split, (a, b) in enumerate([(1.0, 0.5), (0.5, 0.5), (0.75, 0.0)]):
        for method, f in (("mean_tensor", a), ("lre_b1", b)):
            rows.append(
                {
                    "relation": "r",
                    "method": method,
                    "status": "ok",
                    "faithfulness": f,
                    "random": 0.25,
                    "n_test": 4,
                    "split": split,
                }
            )
    rows.append({"relation": "r", "method": "lre_b1", "status": "skipped", "split": 3})
    s = summarize_results(rows)["r"]
    assert s["n_splits"] == 3 and s["random"] == 0.25
    assert s["methods"]["mean_tensor"] == pytest.approx((0.75, 0.25, 3))
    table = results_table(rows)
    assert "| r | 3 | 4.0 | 0.25 | **0.75 ± 0.25** | 0.33 ± 0.29 |" in table
    fig = plot_relation_results(rows, title="t")
    assert type(fig).__name__ == "Figure" and len(fig.axes) == 1


def test_comparison_table_wins_ties_losses_by_paired_bootstrap():
    def row(rel, method, hits, split=0):
        return {
            "relation": rel,
            "relation_type": "t",
            "method": method,
            "status": "ok",
            "split": split,
            "hits": {"faithfulness": hits},
        }

    rows = [
        row("r1", "mean_tensor", "11111"),
        row("r1", "lre_b1", "00000"),
        row("r1", "mean_tensor", "11111", 1),
        row("r1", "lre_b1", "00000", 1),
        row("r2", "mean_tensor", "1010"),
        row("r2", "lre_b1", "1010"),
        row("r3", "mean_tensor", "000000"),
        row("r3", "lre_b1", "111111"),
        {"relation": "r4", "method": "mean_tensor", "status": "ok", "split": 0, "faithfulness": 1.0},  # 0.2 rows
    ]
    assert item_scores(rows)["r1"]["mean_tensor"] == [1.0] * 10  # pooled over splits
    table = comparison_table(rows)
    lines = table.splitlines()
    assert "| r1 | t | 10 | 1.00 [1.00, 1.00] | **+1.00 [+1.00, +1.00]** |" in lines
    assert "| r2 | t | 4 | 0.50 [0.00, 1.00] | +0.00 [+0.00, +0.00] |" in lines
    assert "| r3 | t | 6 | 0.00 [0.00, 0.00] | _-1.00 [-1.00, -1.00]_ |" in lines
    assert not any(line.startswith("| r4 ") for line in lines)  # no per-prompt hits: left out
    assert "| lre_b1 | all | 3 | 1 | 1 | 1 | +0.000 [" in table
    assert "| lre_b1 | t | 3 | 1 | 1 | 1 |" in comparison_table(rows, by_type=True)


# --------------------------------------------------------------------------- study
def test_study_end_to_end_resumable(decoder, tmp_path):
    model = tiny_model(decoder, d_vocab=60)
    tok = WordTokenizer.from_relations([TOY], d_vocab=60)
    cfg = RelationStudyConfig(n_train=3, n_splits=2, top_k_filter=60, betas=(1.0, 2.25), mean_tensor_ablation=True)
    path = tmp_path / "results.jsonl"
    rows = run_relation_study(model, [TOY], cfg, tokenizer=tok, out=path, progress=False, model_name="tiny")
    assert {r["method"] for r in rows} == {"mean_tensor", "mean_tensor_nobias", "lre_b1", "lre_b2.25"}
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    assert all(r["n_test"] == len(align_samples(TOY, tok)) - 3 for r in rows)
    assert all(0.0 <= r["faithfulness"] <= 1.0 for r in rows)
    assert len(load_results(path)) == 8
    # A rerun computes nothing new (the file does not grow) and returns the same rows.
    again = run_relation_study(model, [TOY], cfg, tokenizer=tok, out=path, progress=False, model_name="tiny")
    assert again == rows and len(load_results(path)) == 8
    # Another config is a different study: rows are added, not reused.
    run_relation_study(
        model,
        [TOY],
        RelationStudyConfig(n_train=2, n_splits=1, top_k_filter=60, betas=(1.0,)),
        tokenizer=tok,
        out=path,
        progress=False,
        model_name="tiny",
    )
    assert len(load_results(path)) == 10
    assert "mean_tensor" in results_table(rows)


def test_study_routes_give_the_same_rows(decoder, tmp_path):
    """operators="replay" (apply by replays and JVPs) and "dense" (build T̄ and W̄) score identically."""
    model = tiny_model(decoder, d_vocab=60)
    tok = WordTokenizer.from_relations([TOY], d_vocab=60)
    cfg = RelationStudyConfig(
        n_train=3, n_splits=2, top_k_filter=60, betas=(1.0, 2.25), lre_blocks=(0, 1), mean_tensor_ablation=True
    )
    got = {}
    for route in ("replay", "dense"):
        rows = run_relation_study(model, [TOY], cfg, tokenizer=tok, progress=False, operators=route)
        assert {r["operator"] for r in rows} == {route}
        got[route] = [{k: v for k, v in r.items() if k != "operator"} for r in rows]
    assert got["replay"] == got["dense"]
    with pytest.raises(ArgumentError, match="operators"):
        run_relation_study(model, [TOY], cfg, tokenizer=tok, progress=False, operators="lazy")


def test_study_mean_tensor_exact_when_test_equals_train(decoder):
    """With the test prompt identical to the single training prompt the mean tensor is the model."""
    model = tiny_model(decoder, d_vocab=60)
    r = Relation("same", ("{} is in",), (), tuple(RelationSample("c1", "k1") for _ in range(1)))
    tok = WordTokenizer.from_relations([r], d_vocab=60)
    (a,) = align_samples(r, tok)
    prompt = build_prompt(a, [], tok)
    tokens = stack_tokens([prompt])
    mean = MeanTensor.fit(model, tokens)
    read = read_model(model, tokens, prompt.subject_pos)
    m = decoding_metrics(unembed(model, mean.apply(read.x0)), read.logits, torch.tensor([a.object_token]))
    assert m["faithfulness"] == 1.0


def test_study_skips_small_relations(decoder, tmp_path):
    model = tiny_model(decoder, d_vocab=60)
    small = Relation("small", ("{} is in",), (), (RelationSample("a", "b"), RelationSample("c", "d")))
    tok = WordTokenizer.from_relations([small], d_vocab=60)
    rows = run_relation_study(
        model, [small], RelationStudyConfig(n_train=3, n_splits=1, betas=(1.0,)), tokenizer=tok, progress=False
    )
    assert {r["status"] for r in rows} == {"skipped"}
    assert summarize_results(rows) == {}


def test_study_on_bridge():
    """The whole study runs on a TransformerBridge (the only backend of TransformerLens 4)."""
    from tests.models import bridge_model

    model = bridge_model("gpt2")
    tok = WordTokenizer.from_relations([TOY], d_vocab=int(model.cfg.d_vocab))
    cfg = RelationStudyConfig(n_train=3, n_splits=1, top_k_filter=int(model.cfg.d_vocab), betas=(2.25,))
    rows = run_relation_study(model, [TOY], cfg, tokenizer=tok, progress=False)
    assert [r["method"] for r in rows] == ["mean_tensor", "lre_b2.25"]
    assert all(r["status"] == "ok" and r["n_test"] == 9 for r in rows)
