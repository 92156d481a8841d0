"""The relation study's command line (studies.relations.main) end to end on a random model."""

import pytest

from tests.evaluation.test_relations import write_relation
from tl_tensorlens._backend import has_hooked_transformer


def test_cli_smoke_random_model(tmp_path):
    """The study runs end to end on a random-init model with a made-up tokenizer."""
    from tl_tensorlens.studies.relations import main

    if not has_hooked_transformer():
        pytest.skip("the random-tiny model is a HookedTransformer (TransformerLens < 4)")
    rel = write_relation(tmp_path / "rel" / "toy.json", "toy", [(f"c{i}", f"k{i % 3}") for i in range(10)])
    out = tmp_path / "out"
    code = main(
        [
            "--model",
            "random-tiny",
            "--relations",
            str(rel.parent),
            "--n-train",
            "3",
            "--n-splits",
            "2",
            "--betas",
            "1",
            "2.25",
            "--results",
            str(out / "r.jsonl"),
            "--table",
            str(out / "table.md"),
            "--plot",
            str(out / "plot.png"),
            "--no-progress",
        ]
    )
    assert code == 0
    assert "mean_tensor" in (out / "table.md").read_text()
    assert (out / "plot.png").stat().st_size > 0
