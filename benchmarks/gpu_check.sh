#!/usr/bin/env bash
# The GPU checks in one go, on a machine with a CUDA device (what proved the GPU path):
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # logs in OUT_DIR (default gpu-check-out)
#
# 1. the GPU tests: statistics on CUDA against the CPU float64 reference and against the CPU
#    path, and a whole scan on CUDA against the same scan on the CPU;
# 2. scan throughput: one worker on the GPU beside one on the CPU (fused kernels) and a raw
#    read of the same files, page cache warm and cold;
# 3. geometry: base-once geometry on the GPU against float64 SVDs, with the accuracy reached.
# Needs torch with CUDA, numpy, numba, pyarrow, safetensors, pydantic, pyyaml, scipy and
# pytest; not Ray (the workers run in-process). About 3 minutes on an H200 machine.
set -u
OUT=${1:-gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
start=$(date +%s)
step() { echo "=== [$(($(date +%s) - start)) s] $*"; }
step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
step "GPU tests"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider -s tests/stats/test_gpu.py \
    tests/engine/test_gpu_worker.py tests/stats/test_kernels.py 2>&1 | tee "$OUT/tests.log" | tail -8
step "scan throughput"
timeout 600 "$PY" benchmarks/scan_throughput.py --layers 2 --device cuda \
    --kinds raw,worker,worker_cpu --dir "$OUT/bench" 2>&1 | tee "$OUT/throughput.log"
step "geometry"
timeout 600 "$PY" benchmarks/geometry.py --model qwen3-8b --runs 2 --sft --device cuda \
    --threads 16 2>&1 | tee "$OUT/geometry.log" | tail -16
timeout 600 "$PY" benchmarks/geometry.py --model llama-70b --only q_proj gate_proj --runs 2 \
    --device cuda --threads 16 2>&1 | tee "$OUT/geometry_70b.log" | tail -12
step "done"
