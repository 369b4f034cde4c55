"""errors.report: which rank prints a UserError, and in which form (one line, `error: `)."""
import io
import time

import pytest

from streaming_muloco.errors import (CheckpointError, ConfigError, DataError, NonFiniteError, PeerFailureError,
                                     UserError, launch_rank, report)


def _report(e, rank, grace_s=0.3):
    out = io.StringIO()
    t0 = time.perf_counter()
    report(e, rank, stream=out, grace_s=grace_s)
    return out.getvalue(), time.perf_counter() - t0


def test_every_rank_error_is_printed_by_rank_0_at_once():
    text, waited = _report(ConfigError("streaming_muloco.sync_every (0) must be >= 1"), 0, grace_s=30)
    assert text == "error: streaming_muloco.sync_every (0) must be >= 1\n" and waited < 5


def test_other_ranks_wait_then_print_it_themselves_naming_the_rank():
    # Under a launcher rank 0's exit gets this rank killed during the wait; alive afterwards means
    # rank 0 did not raise it (say a data file missing on one node), so this rank must say it.
    text, waited = _report(DataError("data path 'x.bin' does not exist"), 3, grace_s=0.3)
    assert text == "error: rank 3: data path 'x.bin' does not exist\n" and waited >= 0.3


@pytest.mark.parametrize("e, line", [
    (NonFiniteError("rank 1 (replica 1) inner step 5: the loss is nan"),
     "error: rank 1 (replica 1) inner step 5: the loss is nan\n"),
    (PeerFailureError("a collective failed during outer sync"), "error: rank 2: a collective failed during outer sync\n"),
    (CheckpointError("DeepSpeed could not load 'c/replica1'", every_rank=False),
     "error: rank 2: DeepSpeed could not load 'c/replica1'\n"),
])
def test_rank_local_errors_are_printed_at_once_by_the_rank_that_raised_them(e, line):
    text, waited = _report(e, 2, grace_s=30)
    assert text == line and waited < 5


def test_a_multi_line_message_is_printed_as_one_line():
    text, _ = _report(ConfigError("first\nsecond"), 0)
    assert text == "error: first second\n"


def test_exit_codes_and_defaults():
    assert [c.exit_code for c in (ConfigError, DataError, CheckpointError, NonFiniteError, PeerFailureError)] == \
        [2, 2, 2, 3, 1]
    assert UserError.every_rank and not NonFiniteError.every_rank and not PeerFailureError.every_rank
    assert ConfigError("x", every_rank=False).every_rank is False and ConfigError("x").every_rank is True


@pytest.mark.parametrize("env, rank", [({}, 0), ({"RANK": "3"}, 3), ({"OMPI_COMM_WORLD_RANK": "5"}, 5),
                                       ({"PMI_RANK": "2"}, 2), ({"RANK": ""}, 0)])
def test_launch_rank_reads_every_launchers_variable(monkeypatch, env, rank):
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert launch_rank() == rank
