#!/usr/bin/env bash
# The checks that need a GPU, in one run (a lent device's time is short): the CUDA tests, then the overhead tables
# the README quotes for the GPU. Never part of CI.
#
#   bash benchmarks/gpu_checks.sh OUT_DIR      # e.g. "$OUT" on the device machine
#
# Writes OUT_DIR/test_cuda.log and the overhead tables (.md, .csv) under OUT_DIR/preactresnet18_b128,
# OUT_DIR/preactresnet18_b512 and OUT_DIR/smallcnn; each step goes on if the one before failed.
set -u
out="${1:?usage: bash benchmarks/gpu_checks.sh OUT_DIR}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1
python -m pytest -q tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log" | tail -3
table() {  # name, extra arguments
  local name="$1"; shift
  python benchmarks/overhead.py --device cuda --warmup 30 --steps 20 --repeats 3 --out "$out/$name" "$@" \
    > "$out/$name.log" 2>&1 || echo "overhead $name failed (see $out/$name.log)"
  tail -25 "$out/$name.log"
}
table preactresnet18_b128 --model preactresnet18
table preactresnet18_b512 --model preactresnet18 --batch-size 512 \
  --methods none,input-mixup,multimix-1000,multimix-10000,protocol-1000,dense-1000
table smallcnn --model smallcnn
python benchmarks/position_memory.py --device cuda --n 16,64,256,1024,4096 --out "$out/position_memory" \
  > "$out/position_memory.log" 2>&1 || echo "position_memory failed (see $out/position_memory.log)"
tail -12 "$out/position_memory.log"
