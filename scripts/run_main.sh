#!/usr/bin/env bash
# Install chatlearn (pinned CPU stack, into .venv) and run the main job on the
# embedded tiny default. Extra arguments go to the entry script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV=${CHATLEARN_VENV:-.venv}
exec "$VENV/bin/python" examples/toy/train_rlhf.py -c examples/toy/configs/rlhf.yaml "$@"
