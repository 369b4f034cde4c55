#!/usr/bin/env bash
# Train on this machine with N ranks under mpirun (CPU: gloo; GPU: NCCL, one rank per GPU).
#   bash launch/mpirun_local.sh 4 ds_configs/streaming_muloco_cpu.json --steps 300
set -euo pipefail
source "$(dirname "$0")/env.sh"
N=${1:?usage: mpirun_local.sh NUM_RANKS DS_CONFIG [train args...]}
CONFIG=${2:?usage: mpirun_local.sh NUM_RANKS DS_CONFIG [train args...]}
shift 2
cd "$REPO"
# --oversubscribe: more ranks than cores is fine for the tiny CPU model.
# --bind-to none: let 2-thread ranks share cores instead of pinning all to core 0.
# When a rank exits non-zero, mpirun prints its own "prterun detected that one or more processes
# exited with non-zero status" banner after our one `error:` line; no option removes it without
# also hiding real failures (README, "The launcher's own banner").
# The rendezvous port: a free one unless MASTER_PORT is set, so that several jobs (replica jobs of
# a fault-tolerant run) can share this host.
export MASTER_PORT=${MASTER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
exec mpirun -np "$N" --oversubscribe --bind-to none \
  -x DS_ACCELERATOR -x MASTER_PORT -x PYTHONWARNINGS -x PATH -x OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} \
  python -m streaming_muloco.train --ds-config "$CONFIG" "$@"
