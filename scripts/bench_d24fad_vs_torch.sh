#!/usr/bin/env bash
# jaxad's D²4FAD training step beside the PyTorch peer, in one command
# (PERFORMANCE.md: ratios only hold when taken side by side), at the
# paper's shapes: full Wide-ResNet-50-2 teacher (random weights: timing
# does not depend on them), de-WRN-50-2 decoder, batch 16, 128 px, K
# supports. Runs each side twice, interleaved, so drift shows; jaxad in
# both BatchNorm modes that keep the original's maths or batch the slices.
#
#   scripts/bench_d24fad_vs_torch.sh [cpu|cuda] [TORCH_PYTHON] [K] [STEPS]
#
# TORCH_PYTHON is a Python with torch and torchvision (default: python3).
# Needs ../shared (the peer script; :shared names the real sets, which
# the synthetic-data benchmark never reads).
# The peer is ../shared/bench/torch_d24fad_reference.py.
set -euo pipefail
cd "$(dirname "$0")/.."
device="${1:-cpu}"
torch_python="${2:-python3}"
shots="${3:-4}"
steps="${4:-3}"
peer=../shared/bench/torch_d24fad_reference.py
for round in 1 2; do
  for bn in parallel fast; do
    echo "== round $round: jaxad.bench (configs/d24fad.py:shared,offline, bn_mode=$bn, K=$shots)"
    python -m jaxad.bench --config configs/d24fad.py:shared,offline \
      --config.model.bn_mode="$bn" --config.data.shots="$shots" \
      --steps "$steps" --repeats 2 --warmup 1 \
      --json "/tmp/jaxad_d24fad_bench_${bn}_$round.json" \
      2>&1 | grep -v "^  input\|^[IW][0-9]"
  done
  echo "== round $round: PyTorch peer (K + 1 teacher and decoder forwards)"
  "$torch_python" "$peer" --device "$device" --shots "$shots" \
    --steps "$steps" --warmup 1
done
