#!/usr/bin/env bash
# Everything a GPU session needs to check and time, in one command (planned <= 10 minutes on an H200):
#   bash benchmarks/gpu_session.sh OUT_DIR            # on the GPU machine
#   bash benchmarks/gpu_session.sh OUT_DIR --smoke    # here, on CPU at tiny sizes (tests run it)
# 1. the CUDA-only tests (tests/gpu: every dispatch path against float64, no host sync,
#    CUDA-graph capture of generation) and the Triton kernel tests;             (<= 2 min)
# 2. the block benchmark on CUDA (JSON + log), including the Triton inference variant;  (<= 2.5 min)
# 3. the end-to-end benchmark (bench_e2e.py): a LLaVA-1.5-7B-shaped training step for PEFT LoRA,
#    this package's LoRA and MoLE (K=3 r=32, K=8 r=128), and decoding at batch 1/8/64 with a
#    static cache and CUDA graphs (batches 1 and 8 first: the goal lines); the goal ratios of
#    issue 23 with PASS/FAIL.                                                    (<= 3.5 min)
# 4. the training engines on GPU (tests/train/test_distributed_cuda.py, bf16, NCCL): DeepSpeed
#    ZeRO-3 on one GPU; with 2+ GPUs ZeRO-3 and FSDP2 on 2 ranks, against one GPU. (<= 2 min)
# Each step has its own timeout and writes under OUT_DIR whatever it finished.
# Then, on a machine with the repo: python benchmarks/bench_mole.py --render OUT_DIR/gpu.json
# It uses the python3 on PATH with PYTHONPATH=src (no install needed where torch is present).
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu_session.sh OUT_DIR [--smoke]}"
smoke="${2:-}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$smoke" = "--smoke" ]; then
  python3 -c "import torch; print('torch', torch.__version__, '(smoke, cpu)')" | tee "$out/gpu.txt"
  timeout 120 python3 benchmarks/bench_e2e.py --smoke --decode --device cpu --json "$out/e2e.json" \
    --tmp "$out/e2e-runs" 2>&1 | tee "$out/e2e.log" | tail -12
  exit "${PIPESTATUS[0]}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/adapters/test_dispatch.py 2>&1 | tee "$out/tests.log" | tail -5
timeout 150 python3 benchmarks/bench_mole.py --device cuda --json "$out/gpu.json" --no-append 2>&1 | tee "$out/bench.log" | tail -40
timeout 120 python3 benchmarks/bench_e2e.py --device cuda --json "$out/e2e-train.json" --tmp "$out/e2e-runs" 2>&1 | tee "$out/e2e-train.log" | grep -v "it/s" | tail -20
timeout 90 python3 benchmarks/bench_e2e.py --device cuda --no-train --decode --json "$out/e2e-decode.json" 2>&1 | tee "$out/e2e-decode.log" | grep -v "it/s" | tail -20
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/train/test_distributed_cuda.py 2>&1 | tee "$out/distributed.log" | tail -5
