"""End to end: the training entry point on real ranks, DeepSpeed on CPU with gloo."""
import json

import pytest

from multirank import run_ranks

pytestmark = pytest.mark.multirank


def _train(tmp_path, n, config, *extra, timeout=400):
    out = tmp_path / "run"
    res = run_ranks(n, ["-m", "streaming_muloco.train", "--ds-config", config, "--out-dir", str(out), *extra],
                    timeout=timeout)
    assert res.ok, res.describe()
    return res, json.loads((out / "result.json").read_text()), out


def test_two_rank_data_parallel_adamw_loss_falls_and_logs_tensorboard(tmp_path):
    res, result, out = _train(tmp_path, 2, "ds_configs/dp_adamw_cpu.json", "--steps", "40", "--eval-every", "20",
                              "--log-every", "10")
    losses = [loss for _, loss in result["history"]["train_loss"]]
    assert losses[-1] < losses[0] - 1.0, losses
    assert result["history"]["eval_loss"][-1][1] < 3.0
    assert list((out / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file written"
    ckpt = out / "checkpoints" / "step40"
    assert (ckpt / "manifest.json").is_file() and (ckpt / "replica0").is_dir(), sorted(ckpt.parent.iterdir())
    assert (out / "checkpoints" / "latest").read_text().strip() == "step40"
    assert "eval loss" in res.outputs[0] and "tok/s" in res.outputs[0] and "ETA" in res.outputs[0]
