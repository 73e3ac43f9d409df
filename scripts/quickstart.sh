#!/usr/bin/env bash
# The README's first command: set everything up (./.venv, neurallm, torch 2.13.0) and run the main job:
# train a character LSTM on Tiny Shakespeare (about 3 minutes on two CPU cores: --max-time 180 bounds the training),
# then sample from it. It installs only what the main job needs (no server, ONNX, test or documentation tools).
# The run goes to runs/shakespeare (replaced if it exists); extra arguments are passed to `neurallm train`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup-venv.sh

neurallm train --data tinyshakespeare --level char --emsize 128 --nhid 256 --dropout 0.1 --batch-size 32 --bptt 100 \
    --optimizer adamw --lr 3e-3 --epochs 3 --max-time 180 --out runs/shakespeare --force "$@"
neurallm generate runs/shakespeare --prompt "ROMEO:" --tokens 300
