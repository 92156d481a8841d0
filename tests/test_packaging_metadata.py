"""Package metadata and the README as the package index shows it."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def test_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["authors"] == [{"name": "tl_tensorlens contributors"}]
    assert "transformerlens" in project["keywords"] and "interpretability" in project["keywords"]
    assert any(c.startswith("Topic :: Scientific/Engineering") for c in project["classifiers"])
    assert all(u.startswith("https://") for u in project["urls"].values())
    major_minor = project["requires-python"].removeprefix(">=")
    assert f"Programming Language :: Python :: {major_minor}" in project["classifiers"]


def test_readme_has_no_relative_links():
    """The package index resolves no link relative to the repository: every link is absolute and
    every docs page the README names exists (and ships in the sdist, MANIFEST.in)."""
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"<img[^>]+src=['\"]([^'\"]+)", text)
    assert targets
    relative = [t for t in targets if not t.startswith(("https://", "http://", "#"))]
    assert not relative, relative
    named = set(re.findall(r"`(docs/[\w.-]+\.md)`", text))
    assert named and all((ROOT / p).is_file() for p in named), named
    assert "recursive-include docs *.md" in (ROOT / "MANIFEST.in").read_text()
