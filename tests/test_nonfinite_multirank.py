"""NaN/inf in a loss or a pseudo-gradient: skipped without poisoning the other replica, or a stop."""

import pytest
import torch

from multirank import run_ranks

pytestmark = pytest.mark.multirank


def finite(d):
    return all(bool(torch.isfinite(t).all()) for t in d.values())


@pytest.fixture(scope="module")
def skipped(tmp_path_factory):
    out = tmp_path_factory.mktemp("nan")
    res = run_ranks(2, ["tests/workers/nan_worker.py", str(out), "skip"], timeout=300)
    assert res.ok, res.describe()
    assert "non-finite loss" in res.outputs[1] and "NaN/inf pseudo-gradient" in res.outputs[1]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_nan_loss_is_skipped_and_leaves_weights_finite(skipped):
    r1 = skipped[1]
    assert r1["loss_skipped"] >= 1
    assert finite(r1["snapshots"][1]) and finite(r1["snapshots"][3])  # steps 2 and 4


def test_nan_pseudo_gradient_does_not_reach_the_other_replica_and_is_healed_by_the_sync(skipped):
    r0, r1 = skipped
    assert not finite(r1["snapshots"][5])  # step 6: replica 1 still holds the corrupted weights
    assert finite(r0["snapshots"][5]) and finite(r0["snapshots"][7])
    # The step-8 outer sync sent zeros for replica 1: the global params stay finite, and with
    # mix_alpha = 0 replica 1 restarts from them, identical to replica 0.
    assert bool(torch.isfinite(r0["theta_g"]).all()) and torch.equal(r0["theta_g"], r1["theta_g"])
    assert finite(r1["snapshots"][7])
    assert all(torch.equal(r0["snapshots"][7][n], r1["snapshots"][7][n]) for n in r0["snapshots"][7])


def test_error_policy_stops_with_a_clear_message(tmp_path):
    res = run_ranks(2, ["tests/workers/nan_worker.py", str(tmp_path), "error"], timeout=300)
    assert res.returncodes[1] != 0
    assert "the loss is nan (streaming_muloco.nonfinite_policy='error')" in res.outputs[1]
