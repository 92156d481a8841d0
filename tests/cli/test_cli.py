"""The tl-tensorlens command, in-process: every subcommand, the report, and one-line errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from tests.viz.test_plotting import check_png  # noqa: E402
from tl_tensorlens._backend import has_hooked_transformer  # noqa: E402
from tl_tensorlens.cli import main  # noqa: E402

QUICK = ["--no-heads", "--no-interactive"]


def run_bad(argv, capsys, match):
    """A user mistake: exit 2, one line on stderr naming the problem, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # model loading may print progress bars (transformers) or notes (TransformerLens) before the error
    err = [line for line in err if not line.startswith(("Moving model", "Loading weights")) and "it/s]" not in line]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    assert err[0].startswith("tl-tensorlens"), err[0]
    assert match in err[0], err[0]


def _only_under(out: Path, before: set[Path], root: Path) -> None:
    new = {p for p in root.rglob("*") if p not in before}
    assert all(out in p.parents or p == out for p in new), sorted(new)


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "tensor_in_out" in out and "attn_rollout" in out and "induction" in out and "default" in out
    assert main(["list", "models"]) == 0
    assert "methods:" not in capsys.readouterr().out


def test_explain_default_model(tmp_path, capsys):
    out = tmp_path / "report"
    before = set(tmp_path.rglob("*"))
    assert main(["explain", "--out", str(out), *QUICK]) == 0
    printed = capsys.readouterr().out
    assert "predicts 't27'" in printed  # the induction answer of the default prompt
    _only_under(out, before, tmp_path)
    files = {p.name for p in out.iterdir()}
    assert {"methods.png", "relevance.png", "layers.png", "logit_lens.png", "maps.json", "index.html"} <= files
    for png in out.glob("*.png"):
        check_png(png)
    data = json.loads((out / "maps.json").read_text())
    n = len(data["tokens"])
    assert set(data["maps"]) >= {"tensor_norm", "tensor_in_out", "tensor_in_class"}
    assert all(len(m) == n and len(m[0]) == n for m in data["maps"].values())
    assert data["logit_lens"]["max_error_vs_transformer_lens"] < 1e-3  # float32 model
    # the tensor points at the induction source: the token after the earlier occurrence of 't80'
    row = data["maps"]["tensor_in_class"][-1]
    assert data["tokens"][max(range(n), key=lambda j: row[j])] == "t27"
    html = (out / "index.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html


def test_explain_tokens_and_checkpoint_folder(tmp_path, capsys):
    from tl_tensorlens.subjects import subject_path

    out = tmp_path / "r"
    argv = [
        "explain",
        "--model",
        str(subject_path("induction")),
        "--tokens",
        "0 10 11 12 10 11",
        "--out",
        str(out),
        "--methods",
        "tensor_in_out",
        "--no-layers",
        *QUICK,
    ]
    assert main(argv) == 0
    assert json.loads((out / "maps.json").read_text())["token_ids"] == [0, 10, 11, 12, 10, 11]
    assert "wrote" in capsys.readouterr().out


def test_explain_bad_inputs(tmp_path, capsys):
    out = str(tmp_path / "o")
    run_bad([], capsys, "choose a command")
    run_bad(["frobnicate"], capsys, "invalid choice")
    run_bad(["explain"], capsys, "--out")
    run_bad(["explain", "--out", out, "--methods", "nope"], capsys, "registered methods")
    run_bad(["explain", "--out", out, "--tokens", "1 x"], capsys, "integers")
    run_bad(["explain", "--out", out, "--tokens", "1 5000"], capsys, "outside the vocabulary")
    run_bad(["explain", "--out", out, "--tokens", " ".join(["5"] * 65)], capsys, "n_ctx=64")
    run_bad(["explain", "--out", out, "--prompt", " ".join(["t01"] * 80)], capsys, "longer than the model's context")
    run_bad(["explain", "--out", out, "--prompt", "a", "--tokens", "1"], capsys, "not both")
    run_bad(["explain", "--out", out, "--position", "40"], capsys, "out of range")
    run_bad(["explain", "--out", out, "--dtype", "int8"], capsys, "invalid choice")
    (tmp_path / "file").write_text("x")
    run_bad(["explain", "--out", str(tmp_path / "file")], capsys, "not a folder")
    (tmp_path / "empty").mkdir()
    run_bad(["explain", "--model", str(tmp_path / "empty"), "--out", out], capsys, "no config.json")
    run_bad(["explain", "--model", "no such model!", "--out", out], capsys, "unknown model")
    if has_hooked_transformer():  # TL 3.x checks hub names against its list of models without the network
        run_bad(["explain", "--model", "definitely-not-a-model-xyz", "--out", out], capsys, "unknown model")
    assert not (tmp_path / "o").exists()  # nothing written on error


@pytest.mark.parametrize("command", ["perturb", "relations"])
def test_study_bad_inputs(command, tmp_path, capsys):
    out = str(tmp_path / "s")
    run_bad([command], capsys, "--out")
    owned = "--work-dir" if command == "perturb" else "--results"
    run_bad([command, "--out", out, "--", owned, "/elsewhere"], capsys, "set by --out")
    run_bad([command, "--out", out, "--", "--no-such-flag"], capsys, "unrecognized arguments")
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_perturb_quick(tmp_path, capsys):
    if not has_hooked_transformer():
        pytest.skip("the perturbation study loads its subjects with backend='hooked' (TL 3.x)")
    out = tmp_path / "p"
    assert main(["perturb", "--out", str(out), "--quick"]) == 0
    assert "tensor_in_class" in capsys.readouterr().out
    assert list(out.glob("*.jsonl")) and (out / "perturbation.md").exists()
    check_png(out / "perturbation_induction.png")


@pytest.mark.slow
def test_relations_quick(tmp_path, capsys):
    from tl_tensorlens.subjects import subject_path

    if not (subject_path("relations") / "config.json").exists():
        pytest.skip("the relations subject checkpoint is not in this checkout yet")
    out = tmp_path / "r"
    assert main(["relations", "--out", str(out), "--quick"]) == 0
    assert (out / "relations.jsonl").exists() and (out / "relations.md").exists()


def test_study_defaults_follow_the_checkout(tmp_path):
    """Installed, the studies default under the current directory (the package knows no checkout);
    the checkout's wrapper scripts pass the repository's paths themselves."""
    from tl_tensorlens.studies import perturbation, relations

    installed = perturbation.build_parser().parse_args([])
    assert Path(installed.work_dir) == Path("perturbation") and installed.docs is None
    repo = Path(__file__).resolve().parents[2]
    assert not Path(relations.build_parser().parse_args([]).results).is_absolute()
    # the wrappers run from anywhere (COLUMNS: no wrapped help lines)
    env = {**os.environ, "COLUMNS": "1000"}
    for script, default in (
        ("run_perturbation_study.py", ""),
        ("run_relations_study.py", ""),
    ):
        r = subprocess.run(
            [sys.executable, str(repo / "scripts" / script), "--help"],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            env=env,
        )
        assert r.returncode == 0 and "--no-progress" in r.stdout and str(default) in r.stdout, r.stderr[-2000:]


def test_python_dash_m_help():
    r = subprocess.run(
        [sys.executable, "-m", "tl_tensorlens", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert r.returncode == 0 and "explain" in r.stdout


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_html_opens_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium on this machine (CI installs it)")
    out = tmp_path / "report"
    assert (
        main(["explain", "--out", str(out), "--methods", "tensor_in_out,tensor_in_class", "--no-layers", *QUICK]) == 0
    )
    r = subprocess.run(
        [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
            "--dump-dom",
            (out / "index.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'data-rendered="ok"' in r.stdout, "the page's script did not finish"
    assert 'class="tok' in r.stdout  # the explorer drew the token strip
    errors = [line for line in r.stderr.splitlines() if "Uncaught" in line or ("CONSOLE" in line and "rror" in line)]
    assert not errors, errors
