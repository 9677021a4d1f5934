#!/usr/bin/env bash
# Everything a GPU session needs to check and time, in one command (about 2 minutes on an H200):
#   bash benchmarks/gpu_session.sh OUT_DIR
# 1. the CUDA-only tests (tests/gpu: every dispatch path against float64, no host sync,
#    CUDA-graph capture of generation) and the Triton kernel tests;
# 2. the full block benchmark on CUDA (JSON + log), including the Triton inference variant.
# Then, on a machine with the repo: python benchmarks/bench_mole.py --render OUT_DIR/gpu.json
# It uses the python3 on PATH with PYTHONPATH=src (no install needed where torch is present).
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu_session.sh OUT_DIR}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/adapters/test_dispatch.py 2>&1 | tee "$out/tests.log" | tail -5
timeout 420 python3 benchmarks/bench_mole.py --device cuda --json "$out/gpu.json" --no-append 2>&1 | tee "$out/bench.log" | tail -40
