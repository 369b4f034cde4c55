# Sourced by the launch scripts: CPU vs GPU accelerator, Open MPI as root, quiet logs.
# On a machine without NVIDIA GPUs, DeepSpeed runs on its CPU accelerator with gloo.
if [[ -z "${DS_ACCELERATOR:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    export DS_ACCELERATOR=cuda
  else
    export DS_ACCELERATOR=cpu
  fi
fi
if [[ "$(id -u)" == "0" ]]; then  # Open MPI refuses root unless told
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# Open MPI's memory patcher hooks free/munmap for RDMA registration caches, which TCP does not
# use; it is switched off so that only torch's allocator manages host memory.
export OMPI_MCA_memory=${OMPI_MCA_memory:-^patcher}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning,ignore::UserWarning}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -x "$REPO/.venv/bin/python" && -z "${VIRTUAL_ENV:-}" ]]; then
  export PATH="$REPO/.venv/bin:$PATH"
fi
