"""Leaving a process that trained with torch.distributed: without the interpreter's teardown.

At interpreter teardown a gloo worker thread may still be dropping the last collective's work;
dropping its tensors takes the GIL, CPython ends a thread that asks for the GIL during teardown
with pthread_exit, and that unwinds into a noexcept destructor: std::terminate, "terminate
called without an active exception", SIGABRT on a random rank after training has finished
(pytorch/pytorch#190489; 8 of 80 two-rank jobs here, 0 of 80 leaving through `exit_process`:
benchmarks/abort_loop.py). A barrier does not close the window (its work holds the works before
it). After an error, teardown can also block forever on a process group whose peer died.
"""
from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn


def exit_process(code: int = 0, *, finished: bool = True) -> NoReturn:
    """End this process now with `code`, skipping the interpreter's teardown.

    `finished` (a normal end) first runs the atexit hooks (the MPI backend's drain, logging's
    flush, TensorBoard writers) and MPI_Finalize, which mpi4py would otherwise call during the
    teardown (mpirun reports a rank that skips it as exiting improperly). After an error pass
    `finished=False`: those hooks may wait on a dead peer.
    """
    if finished:
        atexit._run_exitfuncs()  # CPython's own runner; the atexit module has no public one
        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
            mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
