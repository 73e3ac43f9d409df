# Sourced by quickstart.sh and test.sh: make ./.venv (if missing) and activate it, then install neurallm into it
# if it is not installed yet or pyproject.toml changed since.
#   quickstart.sh (the main job): only what training and generating need   pip install torch==2.13.0 -e .
#   test.sh (tests, CI, the docs): the dev extra, everything tests and docs need   pip install torch==2.13.0 -e ".[dev]"
# torch is pinned to 2.13.0 so that a CPU-only machine with a local wheel takes it instead of downloading CUDA
# packages; elsewhere the same pin installs the normal PyTorch build. Set NEURALLM_INSTALL=dev before sourcing
# for the dev install.
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
# a dev install holds the main job's too, so quickstart.sh after test.sh installs nothing
dev_stamp=.venv/.neurallm-installed-dev
main_stamp=.venv/.neurallm-installed
if [ "${NEURALLM_INSTALL:-main}" = dev ]; then
    if [ ! -f "$dev_stamp" ] || [ pyproject.toml -nt "$dev_stamp" ]; then
        pip install torch==2.13.0 -e ".[dev]"
        touch "$dev_stamp" "$main_stamp"
    fi
elif { [ ! -f "$main_stamp" ] || [ pyproject.toml -nt "$main_stamp" ]; } && \
     { [ ! -f "$dev_stamp" ] || [ pyproject.toml -nt "$dev_stamp" ]; }; then
    pip install torch==2.13.0 -e .
    touch "$main_stamp"
fi
