#!/usr/bin/env bash
# A fault-tolerant run on this machine, for trying it out: a coordinator (lighthouse) and K replica
# jobs of D ranks each, every job its own mpirun. Kill one (kill -9 its mpirun or a rank) and watch
# the others carry on; start it again with the command printed below and it rejoins.
#   bash launch/ft_local.sh 3 1 ds_configs/streaming_muloco_cpu.json --steps 300 --out-dir runs/ft
# Environment: MIN_REPLICAS (default 1), LIGHTHOUSE_PORT (default: a free port).
set -euo pipefail
source "$(dirname "$0")/env.sh"
usage="usage: ft_local.sh NUM_REPLICAS RANKS_PER_REPLICA DS_CONFIG [train args...]"
K=${1:?$usage}
D=${2:?$usage}
CONFIG=${3:?$usage}
shift 3
cd "$REPO"
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
PORT=${LIGHTHOUSE_PORT:-$(free_port)}
python -m streaming_muloco.lighthouse --port "$PORT" --min-replicas "${MIN_REPLICAS:-1}" &
LH=$!
pids=()
cleanup() { kill "${pids[@]}" "$LH" 2>/dev/null || true; }
trap cleanup EXIT INT TERM
sleep 1
for ((k = 0; k < K; k++)); do
  echo "[ft_local] replica $k: bash launch/mpirun_local.sh $D $CONFIG --replica-id $k --lighthouse localhost:$PORT $*"
  MASTER_PORT=$(free_port) bash launch/mpirun_local.sh "$D" "$CONFIG" --replica-id "$k" --lighthouse "localhost:$PORT" \
    --set streaming_muloco.num_replicas="$K" --set streaming_muloco.fault_tolerance.min_replicas="${MIN_REPLICAS:-1}" \
    "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do
  wait "$pid" || rc=$?
done
exit "$rc"
