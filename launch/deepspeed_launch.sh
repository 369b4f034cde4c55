#!/usr/bin/env bash
# Multi-node (or single-node) training with the `deepspeed` launcher and a hostfile.
#   bash launch/deepspeed_launch.sh launch/hostfile.example ds_configs/streaming_muloco_cpu.json --steps 300
# Each hostfile line is "<host> slots=<ranks on that host>". On GPUs, slots = GPUs per node and
# ranks reach each other by ssh; on CPU-only hosts DeepSpeed sees no accelerators, so we pass
# --num_accelerators explicitly. For a single localhost entry no ssh is needed.
set -euo pipefail
source "$(dirname "$0")/env.sh"
HOSTFILE=${1:?usage: deepspeed_launch.sh HOSTFILE DS_CONFIG [train args...]}
CONFIG=${2:?usage: deepspeed_launch.sh HOSTFILE DS_CONFIG [train args...]}
shift 2
cd "$REPO"
python -m streaming_muloco.hostfile "$HOSTFILE"  # one clear error for a malformed hostfile
read -r NODES SLOTS FIRST < <(python -m streaming_muloco.hostfile "$HOSTFILE" --summary)
extra=()
if [[ "$DS_ACCELERATOR" == "cpu" ]]; then
  extra+=(--num_accelerators "$SLOTS")
fi
if [[ "$NODES" == "1" && ( "$FIRST" == "localhost" || "$FIRST" == "127.0.0.1" ) ]]; then
  extra+=(--no_ssh_check --master_addr 127.0.0.1)
fi
if [[ -n "${MASTER_PORT:-}" ]]; then  # e.g. several replica jobs of a fault-tolerant run on one host
  extra+=(--master_port "$MASTER_PORT")
fi
exec deepspeed --hostfile "$HOSTFILE" "${extra[@]}" --module streaming_muloco.train --ds-config "$CONFIG" "$@"
