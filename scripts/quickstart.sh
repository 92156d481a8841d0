#!/usr/bin/env bash
# The README's main job on a fresh machine: build .venv (TL 3.9) if missing, then run
# `tl-tensorlens explain` on the embedded default model into ./out/quickstart (no network needed).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/tl-tensorlens ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -c constraints/tl39.txt torch
  .venv/bin/pip install -q -c constraints/tl39.txt -e ".[dev]"
fi
exec .venv/bin/tl-tensorlens explain --out out/quickstart "$@"
