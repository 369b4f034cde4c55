"""DeepSpeed's Muon really orthogonalises under ZeRO-1/2 (2 real ranks), and our scale option works.

Newton-Schulz maps a matrix to (approximately) the nearest semi-orthogonal one: all singular
values of the update come out close to each other, whereas a plain SGD step keeps the
gradient's wildly uneven spectrum.
"""
import pytest
import torch

from multirank import run_and_load
from streaming_muloco.inner import moonlight_scale

pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("muon")
    return run_and_load(2, ["tests/workers/muon_worker.py", str(out)], out, timeout=400)


@pytest.mark.parametrize("stage", [1, 2])
def test_update_singular_values_are_nearly_equal_unlike_the_gradient(steps, stage):
    s = steps[f"muon_z{stage}_deepspeed"]
    assert len(s["before"]) == 8  # qkv, proj, fc, proj x 2 blocks
    for name in s["before"]:
        update = (s["before"][name] - s["after"][name]) / s["lr"]
        rows, cols = update.shape
        sv = torch.linalg.svdvals(update / max(1.0, rows / cols) ** 0.5)
        grad_sv = torch.linalg.svdvals(s["grad"][name])
        # A small batch gives a low-rank gradient, and NS keeps zero directions at zero, so
        # compare the directions holding >= 2% of the top singular value (5 NS steps lift
        # sigma by at most ~3.4^5, so fainter ones are still on their way to 1).
        r = int((grad_sv > 2e-2 * grad_sv[0]).sum())
        assert r >= 8, (name, r)
        sv, grad_sv = sv[:r], grad_sv[:r]
        assert sv.max() / sv.min() < 3.0, (name, sv)
        assert grad_sv.max() / grad_sv.min() > 10 * (sv.max() / sv.min()), (name, grad_sv)
        # Newton-Schulz lands singular values in roughly [0.7, 1.2], not on the gradient's scale.
        assert 0.5 < sv.mean() < 1.3, (name, sv.mean())


@pytest.mark.parametrize("stage", [1, 2])
def test_update_is_not_a_plain_sgd_step(steps, stage):
    s = steps[f"muon_z{stage}_deepspeed"]
    for name in s["before"]:
        update = (s["before"][name] - s["after"][name]).flatten()
        cos = torch.nn.functional.cosine_similarity(update, s["grad"][name].flatten(), dim=0)
        assert 0.05 < cos < 0.95, (name, cos)  # aligned with the gradient, but not parallel to it


@pytest.mark.parametrize("stage", [1, 2])
def test_moonlight_scale_gives_update_rms_near_0_2(steps, stage):
    ds, ml = steps[f"muon_z{stage}_deepspeed"], steps[f"muon_z{stage}_moonlight"]
    for name in ml["before"]:
        update = (ml["before"][name] - ml["after"][name]) / ml["lr"]
        rms = update.pow(2).mean().sqrt().item()
        assert 0.12 < rms < 0.28, (name, rms)
        # Same direction as DeepSpeed's scale, only the per-matrix factor differs.
        ds_update = (ds["before"][name] - ds["after"][name]) / ds["lr"]
        rows, cols = update.shape
        ratio = moonlight_scale(rows, cols) / max(1.0, rows / cols) ** 0.5
        assert torch.allclose(update, ds_update * ratio, rtol=1e-3, atol=1e-5), name
