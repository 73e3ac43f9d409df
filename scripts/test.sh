#!/usr/bin/env bash
# The README's second command, and what CI runs: set up ./.venv with the dev extra if needed, run the default
# test suite (everything but the `slow` marker), then build the documentation site as CI checks it
# (mkdocs build --strict: a broken link or a stale generated page fails). Times: docs/development.md.
# Extra arguments go to pytest, and then the docs build is skipped:
#   ./scripts/test.sh -m "not slow and not integration" -n 2   the quick loop (no subprocess-heavy tests, 2 processes)
#   ./scripts/test.sh -m slow                 the full-corpus checks
#   ./scripts/test.sh tests/test_cli.py -x    one file
set -euo pipefail
cd "$(dirname "$0")/.."
NEURALLM_INSTALL=dev . scripts/setup-venv.sh

python -m pytest "$@"
if [ $# -eq 0 ]; then
    NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
fi
