#!/usr/bin/env bash
# Install chatlearn (pinned CPU stack, into .venv) and run the main job on the embedded tiny default:
# a tiny Llama-style model and tokenizer built locally, an SFT warm start and a reward model fit on
# Megatron, then PPO through RLHFEngine (vLLM sampling, Megatron training, Ray, weight sync every
# episode), with held-out reward and accuracy printed from before training to the end.
# Extra arguments go to examples/megatron/main_tiny.py (e.g. --algo grpo, --output-dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV=${CHATLEARN_VENV:-.venv}
exec "$VENV/bin/python" examples/megatron/main_tiny.py "$@"
