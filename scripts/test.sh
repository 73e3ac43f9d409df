#!/usr/bin/env bash
# The README's second command, and what CI runs: set up ./.venv if needed, then the default test suite
# (about 5 minutes on two CPU cores). Extra arguments go to pytest, e.g. `./scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup-venv.sh

python -m pytest "$@"
