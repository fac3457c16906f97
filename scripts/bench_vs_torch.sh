#!/usr/bin/env bash
# jaxad's DDAD training step beside the PyTorch peer, in one command
# (PERFORMANCE.md: ratios only hold when taken side by side). Runs each
# twice, interleaved, so drift on a shared machine shows.
#
#   scripts/bench_vs_torch.sh [cpu|cuda] [TORCH_PYTHON]
#
# TORCH_PYTHON is a Python with torch (default: python3). The peer is
# ../shared/bench/torch_ddad_reference.py.
set -euo pipefail
cd "$(dirname "$0")/.."
device="${1:-cpu}"
torch_python="${2:-python3}"
peer=../shared/bench/torch_ddad_reference.py
for round in 1 2; do
  echo "== round $round: jaxad.bench (configs/ddad.py, refine on)"
  python -m jaxad.bench --config configs/ddad.py \
    --config.refine.enabled=True --json "/tmp/jaxad_bench_$round.json" \
    2>/dev/null | grep -v "^  input"
  echo "== round $round: PyTorch peer, AE step (one member) and ASR step"
  "$torch_python" "$peer" --device "$device"
  "$torch_python" "$peer" --device "$device" --net asr
done
