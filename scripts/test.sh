#!/usr/bin/env bash
# Install chatlearn (pinned CPU stack, into .venv) and run the default test suite.
#   bash scripts/test.sh            default suite (slow tests skipped)
#   bash scripts/test.sh -m slow    only the slow tests; any pytest arguments work
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV=${CHATLEARN_VENV:-.venv}
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(-m "not slow")
exec "$VENV/bin/python" -m pytest -q "${args[@]}"
