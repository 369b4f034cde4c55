#!/usr/bin/env bash
# Set up a CPU-only environment in .venv: the CPU torch wheel, DeepSpeed, mpi4py and Open MPI's
# mpirun from PyPI, torchft for fault-tolerant runs, and this package (editable). Safe to re-run; a no-op when already done.
# GPU users: `pip install -e .` into an environment that already has their CUDA torch instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.streaming_muloco_setup"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[cpu,test,ft]"
  touch "$stamp"
fi
# DeepSpeed JIT-builds its shm comm op on the first init_distributed (~90 s on 2 cores); build it
# once here, cached under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions).
DS_ACCELERATOR=cpu "$VENV/bin/python" - <<'PY'
import contextlib, io
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is not None:
    with contextlib.redirect_stdout(io.StringIO()):
        builder.load(verbose=False)
print("setup_cpu: ready (.venv)")
PY
