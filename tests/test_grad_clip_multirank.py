"""`gradient_clipping` with Muon under ZeRO 1, 2 and 3 (grad_clip.py), on 2 real ranks (one replica, D=2).

The clip must act on the replica's raw gradient, over all ZeRO partitions, before Muon's
momentum and Newton-Schulz: after a spiked first step, every optimizer moment is
(1 - beta) x (the torch gradient scaled to norm 1.0), for Muon's matrices and AdamW's
parameters alike, with gradient accumulation 1 and 2. Without a spike (a clip that is never
reached) training is bit-identical to no clipping.
"""
import pytest
import torch

from multirank import run_and_load

pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip")
    return run_and_load(2, ["tests/workers/clip_worker.py", str(out)], out, timeout=500)


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("gas", [1, 2])
def test_a_spike_is_clipped_to_norm_c_before_muon_and_adamw_see_it(runs, stage, gas):
    r = runs[f"spike_z{stage}_gas{gas}"]
    grad = r["grad"]
    norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grad.values())).item()
    assert norm > 100  # the spike: far above the clip of 1.0
    assert r["norm"] == pytest.approx(norm, rel=1e-5)  # the replica-wide norm, all partitions
    assert r["clipped"] == 1
    assert r["muon"] and set(r["muon"]) < set(grad)  # both optimizers are in play
    received_sq = 0.0
    for name, moment in r["moments"].items():
        received = moment / (1 - r["beta"][name])  # the gradient this optimizer received
        expected = grad[name] * (1.0 / ((norm + 1e-6) / 1.0))
        torch.testing.assert_close(received, expected, rtol=2e-4, atol=1e-7, msg=name)
        received_sq += received.double().pow(2).sum().item()
    assert received_sq ** 0.5 == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_without_a_spike_training_is_bit_identical_to_no_clipping(runs, stage):
    loose, off = runs[f"loose_z{stage}"], runs[f"off_z{stage}"]
    assert len(loose) == len(off) == 3
    for a, b in zip(loose, off):
        for name in a:
            assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(loose[0][n], loose[-1][n]) for n in loose[0])  # it did train
