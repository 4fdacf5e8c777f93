#!/usr/bin/env bash
# The GPU checks, in the order a short GPU lease should run them; each part fits one
# 10-minute command and writes only under $OUT (default benchmarks/results/gpu).
#
#   bash benchmarks/gpu_session.sh checks     # CUDA/NCCL tests, overhead, train cost, compile (~8 min)
#   bash benchmarks/gpu_session.sh reproduce  # reproduce.py --preset gpu, resumable (9 min a call)
#   bash benchmarks/gpu_session.sh zoo        # zoo_coverage.py --contract, resumable (9 min a call)
#   bash benchmarks/gpu_session.sh tensorrt   # per-scale float and int8 (symmetric Q/DQ) files in TensorRT (~3 min)
#
# The resumable parts read and extend their job files in $OUT: copy the previous call's files
# back into $OUT before the next call. Carry .whl/ (a newer timm wheel, when the GPU host's is
# older) and .devdata/fashion-mnist (the dataset) with the tree.
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore FASHION_MNIST_DIR=${FASHION_MNIST_DIR:-$PWD/.devdata/fashion-mnist}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1

case "${1:-checks}" in
  checks)
    timeout 240 python -m pytest -q -rs tests/test_training.py tests/test_ddp.py -k "cuda or nccl" \
      > "$OUT/pytest_cuda.txt" 2>&1
    (cd benchmarks && timeout 150 python overhead.py --device cuda --repeats 200 --shell) > "$OUT/overhead_gpu.txt" 2>&1
    (cd benchmarks && timeout 90 python train_cost.py --device cuda --batch 64) > "$OUT/train_cost_gpu.txt" 2>&1
    (cd benchmarks && timeout 240 python compile_check.py --device cuda --model resnet50 --counts 1,2,5) \
      > "$OUT/compile_check_gpu.txt" 2>&1
    ;;
  reproduce)
    timeout -s KILL 570 python benchmarks/reproduce.py --preset gpu --workers 15 --deadline 330 \
      --jobs-file "$OUT/reproduce_jobs.jsonl" --out-dir "$OUT" > "$OUT/reproduce_log.txt" 2>&1
    ;;
  zoo)  # continue from the rows already committed (CPU chunks), skipping their models
    [ -f "$OUT/zoo_contract.csv" ] || cp benchmarks/results/zoo_contract.csv "$OUT/" 2>/dev/null
    timeout -s KILL 570 python benchmarks/zoo_coverage.py --contract --device cuda --workers 14 \
      --only @benchmarks/results/zoo_ok_models.txt --out "$OUT/zoo_contract.csv" --deadline 420 --grace 60 \
      > "$OUT/zoo_log.txt" 2>&1
    ;;
  tensorrt)  # stops before the engine build (and says why) where tensorrt is not installed
    timeout 300 python benchmarks/tensorrt_check.py --model resnet18 --scales 224,160 > "$OUT/tensorrt_check.txt" 2>&1
    ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh checks|reproduce|zoo|tensorrt" >&2
    exit 2
    ;;
esac
tail -n 5 "$OUT"/*.txt
