"""The test_prompt-style prediction summary (viz/summary.py) and ``explain --answer``."""

import json

import pytest
import torch

from tests.models import TOKENS, bridge_model
from tl_tensorlens.capture import capture
from tl_tensorlens.cli import main
from tl_tensorlens.errors import ArgumentError, UnsupportedModelError
from tl_tensorlens.subjects import load_subject
from tl_tensorlens.viz.summary import prediction_summary

PROMPT = "<bos> t83 t94 t12 t35 t43 t80 t27 t83 t94 t12"


@pytest.fixture(scope="module")
def induction():
    return load_subject("induction", backend="bridge", dtype=torch.float64).model


def test_top_k_and_answer_rank(induction):
    model = induction
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        logits = model(tokens)[0, -1]
    probs = logits.softmax(-1)
    s = prediction_summary(model, PROMPT, k=5, answer=" t35 t43")
    assert list(s.top_ids) == logits.topk(5).indices.tolist()
    torch.testing.assert_close(
        torch.tensor(s.top_probs, dtype=torch.float64), probs[list(s.top_ids)], rtol=1e-9, atol=0
    )
    assert all(a >= b for a, b in zip(s.top_probs, s.top_probs[1:], strict=False))
    first, second = s.answer_ranks
    assert first.token_id == model.to_single_token(" t35") and first.position == tokens.shape[-1] - 1
    assert first.rank == int((logits > logits[first.token_id]).sum())
    # the second answer token is read after the first (teacher forcing)
    ext = torch.cat([tokens, torch.tensor([[first.token_id]])], dim=-1)
    with torch.no_grad():
        nxt = model(ext)[0, -1]
    assert second.rank == int((nxt > nxt[second.token_id]).sum())
    assert second.prob == pytest.approx(float(nxt.softmax(-1)[second.token_id]), rel=1e-9)
    assert "rank" in s.format() and "Top 5" in s.format()
    # a capture's logits give the same summary without a forward
    s2 = prediction_summary(model, capture(model, tokens), k=5)
    assert s2.top_ids == s.top_ids


def test_refusals(induction):
    with pytest.raises(ArgumentError, match="answer"):
        prediction_summary(induction, PROMPT, answer="")
    with pytest.raises(ArgumentError, match="answer"):
        prediction_summary(bridge_model("gpt2"), TOKENS[0], answer=" x")  # no tokenizer
    with pytest.raises(ArgumentError, match="k"):
        prediction_summary(induction, PROMPT, k=0)
    with pytest.raises(UnsupportedModelError):
        prediction_summary(bridge_model("bert"), TOKENS[0])


def test_explain_answer_flag(tmp_path, capsys):
    out = tmp_path / "rep"
    argv = ["explain", "--out", str(out), "--no-heads", "--no-layers", "--no-interactive", "--methods", "tensor_norm"]
    assert main([*argv, "--answer", " t27"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "maps.json").read_text())
    summary = data["prediction_summary"]
    (rank,) = summary["answer_ranks"]
    assert rank["token"].strip() == "t27" and f"rank {rank['rank']}" in printed
    assert len(summary["top"]) == 10 and summary["top"][0]["prob"] >= summary["top"][-1]["prob"]
    page = (out / "index.html").read_text()
    assert "Top predictions" in page and "t27" in page
    assert main([*argv, "--answer", ""]) == 2
