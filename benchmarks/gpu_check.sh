#!/usr/bin/env bash
# The GPU checks in one go, on a machine with a CUDA device (what proved the GPU path):
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # logs in OUT_DIR (default gpu-check-out)
#
# 1. the GPU tests: statistics on CUDA against the CPU float64 reference and against the CPU
#    path, and a whole scan on CUDA against the same scan on the CPU;
# 2. scan throughput: one worker on the GPU beside one on the CPU (fused kernels) and a raw
#    read of the same files, page cache warm and cold;
# 3. geometry: base-once geometry on the GPU against float64 SVDs, with the accuracy reached;
# 4. the lab on CUDA: the paper preset (512 wide, 8 blocks) trained for a few steps with
#    --device cuda (qwen2 only), then scanned like any sweep; its wall time per phase.
# Needs torch with CUDA, numpy, numba, pyarrow, safetensors, pydantic, pyyaml, scipy and
# pytest; steps 1-3 not Ray (the workers run in-process); step 4 transformers, Ray and duckdb
# (the rlvr_ray dependencies). About 5 minutes on an H200 machine.
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
step "lab on cuda (paper preset, a few steps)"
timeout 600 "$PY" -m rlvr_ray.cli lab --preset paper --device cuda --archs qwen2 \
    --pretrain-steps 50 --rl-steps 6 --sft-steps 6 --jobs 1 --out "$OUT/lab" 2>&1 \
    | tee "$OUT/lab.log" | tail -8
"$PY" -c "import json, sys; m = json.load(open(sys.argv[1])); print('device', m['device'], \
    'wall_s', m['wall_s'])" "$OUT/lab/manifest.json"
timeout 600 "$PY" -m rlvr_ray.cli scan "$OUT/lab/sweep.yaml" --out "$OUT/lab-results" \
    --num-cpus 8 2>&1 | tee "$OUT/lab-scan.log" | tail -6
"$PY" -m rlvr_ray.cli sql "SELECT s.run, s.algorithm, s.sparsity, s.ulp1_share, g.erased_share \
    FROM summary s LEFT JOIN run_precision_gate g USING (group_name, run) ORDER BY 2, 1" \
    --out "$OUT/lab-results" 2>&1 | tee "$OUT/lab-summary.log" | tail -20
step "done"
