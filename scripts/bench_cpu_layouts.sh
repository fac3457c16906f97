#!/usr/bin/env bash
# DDAD's ensembles step under several CPU device layouts, beside the
# PyTorch peer, in one command (PERFORMANCE.md: ratios hold only when taken
# side by side). Every round runs the peer and then each layout, in reverse
# order on even rounds, so drift on a shared machine shows and averages out.
#
#   scripts/bench_cpu_layouts.sh [TORCH_PYTHON]
#
# TORCH_PYTHON: a Python with torch (default python3). Environment:
#   ROUNDS=2             rounds (each: the peer + every layout)
#   BENCH_LOCK=FILE      run every measurement under `flock FILE` (a machine
#                        shared with other benchmarks)
#   PYTHON=python        the Python with jaxad
#
# Layouts (jaxad.bench --phases ensembles, the settings bench_vs_torch.sh
# uses; K = members per module, so a step trains 2K members):
#   1dev            one CPU device (jax's default), K=3: the shipped layout
#   2dev-data       two CPU devices, each half of every batch, K=3
#   1dev/2dev-member K=2 and K=4: the members split over two CPU devices
#                   (config.mesh.member=2 needs an even K), beside one device
#                   at the same K
#   2dev-member-1t  as 2dev-member K=2, with XLA's Eigen intra-op threading
#                   off (--xla_cpu_multi_thread_eigen=false)
# The devices are set with JAX_NUM_CPU_DEVICES (jax_num_cpu_devices).
# Prints one table: member-images/s per round and the ratio to the peer of
# the same round.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_python="${1:-python3}"
python="${PYTHON:-python}"
rounds="${ROUNDS:-2}"
lock="${BENCH_LOCK:-}"
peer=../shared/bench/torch_ddad_reference.py
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

# name|CPU devices|XLA_FLAGS|config overrides (space-separated)
layouts=(
  "1dev K=3|1||"
  "2dev-data K=3|2||--config.mesh.data=2 --config.mesh.member=1"
  "1dev K=2|1||--config.model.num_members=2"
  "2dev-member K=2|2||--config.model.num_members=2 --config.mesh.member=2"
  "2dev-member-1t K=2|2|--xla_cpu_multi_thread_eigen=false|--config.model.num_members=2 --config.mesh.member=2"
  "1dev K=4|1||--config.model.num_members=4"
  "2dev-member K=4|2||--config.model.num_members=4 --config.mesh.member=2"
)

locked() {
  if [[ -n "$lock" ]]; then
    flock "$lock" "$@"
  else
    "$@"
  fi
}

measure() { # round, layout index
  local name devices xla overrides
  IFS='|' read -r name devices xla overrides <<<"${layouts[$2]}"
  local -a args=()
  read -ra args <<<"$overrides"
  echo "   $name" >&2
  if ! locked env JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES="$devices" \
    XLA_FLAGS="$xla" "$python" -m jaxad.bench --config configs/ddad.py \
    --config.refine.enabled=True "${args[@]}" --phases ensembles \
    --noscoring --json "$out/$2_$1.json" >/dev/null 2>"$out/err"; then
    tail -n 20 "$out/err" >&2
    echo "error: layout $name failed (above)" >&2
    exit 1
  fi
}

echo "== $(date -u '+%Y-%m-%d %H:%M UTC'), $(lscpu | sed -n \
  's/^Model name: *//p'), $(nproc) CPUs"
"$python" -c 'import jax; print(f"== jax {jax.__version__}")'
"$torch_python" -c 'import torch; print(f"== torch {torch.__version__}")'
for ((round = 1; round <= rounds; round++)); do
  echo "== round $round/$rounds" >&2
  echo "   PyTorch peer (one AE member)" >&2
  locked "$torch_python" "$peer" --device cpu | tail -n 1 >"$out/peer_$round.json"
  order=("${!layouts[@]}")
  if ((round % 2 == 0)); then
    for ((i = ${#layouts[@]} - 1; i >= 0; i--)); do measure "$round" "$i"; done
  else
    for i in "${order[@]}"; do measure "$round" "$i"; done
  fi
done

names="$(printf '%s\n' "${layouts[@]}" | cut -d'|' -f1)"
"$python" - "$out" "$rounds" "$names" <<'EOF'
import json, statistics, sys

out, rounds, names = sys.argv[1], int(sys.argv[2]), sys.argv[3].splitlines()
peer = [
  json.load(open(f"{out}/peer_{r}.json"))["member_images_per_s"]
  for r in range(1, rounds + 1)
]
head = "".join(f"  round {r:<2}" for r in range(1, rounds + 1))
print(f"{'layout':<22}{head}   median   x peer")
print(
  f"{'PyTorch peer':<22}"
  + "".join(f"{p:10.1f}" for p in peer)
  + f"{statistics.median(peer):9.1f}     1.00"
)
for i, name in enumerate(names):
  rates, ratios = [], []
  for r in range(1, rounds + 1):
    result = json.load(open(f"{out}/{i}_{r}.json"))
    (ens,) = [p for p in result["train"] if p["phase"] == "ensembles"]
    rates.append(ens["member_images_per_s"])
    ratios.append(rates[-1] / peer[r - 1])
  print(
    f"{name:<22}"
    + "".join(f"{x:10.1f}" for x in rates)
    + f"{statistics.median(rates):9.1f}"
    + f"{statistics.median(ratios):9.2f}"
  )
print("member-images/s of the ensembles step; x peer: median over the rounds")
print("of (layout / the same round's peer)")
EOF
