# Sourced by quickstart.sh and test.sh: make ./.venv (if missing or older than pyproject.toml) and activate it.
# torch is pinned to 2.13.0 so that a CPU-only machine with a local wheel takes it instead of downloading CUDA
# packages; elsewhere the same pin installs the normal PyTorch build.
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
if [ ! -f .venv/.neurallm-installed ] || [ pyproject.toml -nt .venv/.neurallm-installed ]; then
    pip install torch==2.13.0 -e ".[dev]"
    touch .venv/.neurallm-installed
fi
