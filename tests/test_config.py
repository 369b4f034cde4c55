"""The strict `streaming_muloco` section: every bad value names its key and the fix."""
import json
import subprocess
import sys

import numpy as np
import pytest

from multirank import REPO, base_env
from streaming_muloco.config import ConfigError, parse_section, split_config

BAD_SECTIONS = [
    ({"sync_evrey": 3}, r"streaming_muloco\.sync_evrey is not a known key; did you mean 'sync_every'"),
    ({"sync_every": "30"}, r"streaming_muloco\.sync_every must be an integer"),
    ({"sync_every": 0}, r"streaming_muloco\.sync_every \(0\) must be >= 1"),
    ({"num_replicas": 0}, r"streaming_muloco\.num_replicas \(0\) must be >= 1"),
    ({"num_fragments": 0}, r"streaming_muloco\.num_fragments \(0\) must be >= 1"),
    ({"sync_every": 4, "num_fragments": 5}, r"num_fragments \(5\) must be <= sync_every \(4\)"),
    ({"sync_every": 6, "num_fragments": 3, "sync_delay": 2},
     r"streaming_muloco\.sync_delay \(2\) must be < sync_every/num_fragments \(2\)"),
    ({"sync_delay": -1}, r"sync_delay \(-1\) must be >= 0"),
    ({"mix_alpha": 1.5}, r"streaming_muloco\.mix_alpha \(1\.5\) must be in \[0, 1\]"),
    ({"outer_lr": 0}, r"streaming_muloco\.outer_lr \(0\.0\) must be > 0"),
    ({"outer_momentum": 1.0}, r"streaming_muloco\.outer_momentum \(1\.0\) must be in \[0, 1\)"),
    ({"outer_nesterov": 1}, r"streaming_muloco\.outer_nesterov must be true or false"),
    ({"fragment_strategy": "random"}, r"streaming_muloco\.fragment_strategy \('random'\) must be one of"),
    ({"compression": {"method": "linear", "bits": 3}}, r"streaming_muloco\.compression\.bits \(3\) must be 2, 4 or 8"),
    ({"compression": {"mehtod": "linear"}}, r"streaming_muloco\.compression\.mehtod is not a known key; did you mean 'method'"),
    ({"compression": {"method": "e3m0", "bits": 2}}, r"compression\.bits \(2\) must be 4 for method 'e3m0'"),
    ({"compression": {"ef_beta": 0}}, r"compression\.ef_beta \(0\.0\) must be in \(0, 1\]"),
    ({"compression": {"topk_fraction": 2}}, r"compression\.topk_fraction \(2\.0\) must be in \(0, 1\]"),
    ({"comm": {"backend": "nccl"}}, r"streaming_muloco\.comm\.backend \('nccl'\) must be one of \['torch', 'mpi'\]"),
    ({"comm": {"timeout_s": -1}}, r"comm\.timeout_s \(-1\.0\) must be > 0"),
    ({"comm": 3}, r"streaming_muloco\.comm must be a JSON object"),
    ({"inner": {"muon_update_scale": "keller"}}, r"inner\.muon_update_scale \('keller'\) must be one of"),
]


@pytest.mark.parametrize("section, message", BAD_SECTIONS)
def test_bad_section_raises_naming_the_key(section, message):
    with pytest.raises(ConfigError, match=message):
        parse_section(section)


def test_defaults_are_the_papers():
    cfg = parse_section({})
    assert (cfg.outer_lr, cfg.outer_momentum, cfg.sync_every, cfg.num_fragments, cfg.sync_delay, cfg.mix_alpha) == \
        (0.7, 0.9, 30, 1, 0, 0.0)


def test_missing_section_means_plain_data_parallel():
    ds, cfg = split_config({"train_micro_batch_size_per_gpu": 1})
    assert not cfg.enabled and ds == {"train_micro_batch_size_per_gpu": 1}


def test_section_is_removed_from_what_deepspeed_sees():
    ds, cfg = split_config({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
                            "streaming_muloco": {"num_replicas": 2}})
    assert "streaming_muloco" not in ds and cfg.num_replicas == 2


@pytest.mark.parametrize("zero, shown", [({}, "0"), ({"zero_optimization": {"stage": 3}}, "3")])
def test_outer_loop_needs_zero_stage_1_or_2(zero, shown):
    with pytest.raises(ConfigError, match=rf"zero_optimization\.stage \({shown}\) must be 1 or 2 with the "
                                          rf"streaming_muloco outer loop"):
        split_config({**zero, "streaming_muloco": {"num_replicas": 2}})


@pytest.mark.parametrize("world, section, message", [
    (6, {"num_replicas": 4}, r"num_replicas \(4\) x ranks_per_replica \(\?\) must equal the world size \(6\)"),
    (4, {"num_replicas": 2, "ranks_per_replica": 3}, r"num_replicas \(2\) x ranks_per_replica \(3\) must equal the world size \(4\)"),
])
def test_topology_that_does_not_factor_the_world_is_rejected(world, section, message):
    with pytest.raises(ConfigError, match=message):
        parse_section(section).topology(world)


def test_topology_derives_ranks_per_replica():
    assert parse_section({"num_replicas": 2}).topology(8) == (2, 4)


@pytest.mark.parametrize("ds, message", [
    ({"optimizer": {"type": "Muon"}, "gradient_clipping": 1.0}, r"gradient_clipping \(1\.0\) must be 0 with the Muon"),
    ({"optimizer": {"type": "Muon"}}, r"gradient_clipping \(1\.0\) must be 0"),  # DeepSpeed's default is 1.0
    ({"optimizer": {"type": "Muon"}, "gradient_clipping": 0, "zero_optimization": {"stage": 2, "reduce_scatter": True}},
     r"reduce_scatter must be false with the Muon optimizer"),
])
def test_deepspeed_settings_known_to_break_muon_are_refused(ds, message):
    with pytest.raises(ConfigError, match=message):
        split_config(ds)


def _train_cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "streaming_muloco.train", "--out-dir", str(tmp_path / "o"), *args],
                          cwd=REPO, env=base_env({"WORLD_SIZE": "4"}), capture_output=True, text=True, timeout=120)


def _token_file(tmp_path, ids):
    path = tmp_path / "tokens.bin"
    np.array(ids, dtype=np.uint16).tofile(path)
    return str(path)


def _raw_file(tmp_path, text):
    path = tmp_path / "raw.json"
    path.write_text(text)
    return str(path)


def _config_file(tmp_path, section):
    base = json.loads((REPO / "ds_configs" / "muloco_cpu.json").read_text())
    base["streaming_muloco"] = section
    path = tmp_path / "c.json"
    path.write_text(json.dumps(base))
    return str(path)


@pytest.mark.parametrize("make_args, message", [
    (lambda t: ["--ds-config", _config_file(t, {"num_replicas": 2, "sync_evrey": 3})],
     "error: streaming_muloco.sync_evrey is not a known key; did you mean 'sync_every'?"),
    (lambda t: ["--ds-config", _config_file(t, {"num_replicas": 3})],
     "error: streaming_muloco.num_replicas (3) x ranks_per_replica (?) must equal the world size (4)"),
    (lambda t: ["--ds-config", str(t / "nope.json")], "error: --ds-config"),
    (lambda t: ["--ds-config", "ds_configs/muloco_cpu.json", "--data", str(t / "missing.bin")],
     "does not exist or is not a file"),
    (lambda t: ["--ds-config", "ds_configs/muloco_cpu.json", "--set", "streaming_muloco.sync_every=0"],
     "error: streaming_muloco.sync_every (0) must be >= 1 inner step"),
    (lambda t: ["--ds-config", "ds_configs/muloco_cpu.json", "--model", "huge"], "error: model preset 'huge' is unknown"),
    (lambda t: ["--ds-config", "ds_configs/muloco_cpu.json", "--steps", "0"], "--steps (0) must be >= 1"),
    (lambda t: ["--ds-config", "ds_configs/muloco_cpu.json", "--n-layer", "0"], "error: model.n_layer (0) must be >= 1"),
    (lambda t: ["--ds-config", "ds_configs/muloco_cpu.json", "--steps", "-5"], "--steps (-5) must be >= 1"),
    (lambda t: ["--ds-config", "ds_configs/muloco_cpu.json", "--steps", "ten"], "invalid int value: 'ten'"),
    (lambda t: ["--ds-config", "ds_configs/muloco_cpu.json", "--set", "streaming_muloco.sync_delay=30"],
     "error: streaming_muloco.sync_delay (30) must be < sync_every/num_fragments (30)"),
    (lambda t: ["--ds-config", "ds_configs/muloco_cpu.json", "--set", "streaming_muloco.num_fragments=40"],
     "error: streaming_muloco.num_fragments (40) must be <= sync_every (30)"),
    (lambda t: ["--ds-config", "ds_configs/muloco_cpu.json", "--data", _token_file(t, [1, 2, 300] * 2000)],
     "holds token id 300 >= model.vocab_size 256; check --data-dtype (uint16)"),
    (lambda t: ["--ds-config", "ds_configs/muloco_cpu.json", "--data", _token_file(t, [1, 2, 3] * 2000),
                "--data-dtype", "int8"], "error: --data-dtype 'int8' is not supported"),
    (lambda t: ["--ds-config", _raw_file(t, "{not json")], "is not valid JSON"),
])
def test_cli_prints_one_error_line_and_exits_2_before_any_process_group(tmp_path, make_args, message):
    proc = _train_cli(tmp_path, *make_args(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error")]) == 1 or \
        "usage:" in proc.stderr


@pytest.mark.parametrize("text, message", [
    ("localhost slots=2\nnode-b slot=2\n", "line 2: 'node-b slot=2' must look like '<hostname> slots=<N>'"),
    ("localhost slots=0\n", "line 1: slots must be >= 1"),
    ("a slots=2\na slots=2\n", "line 2: host 'a' is listed twice"),
    ("# only a comment\n", "lists no hosts"),
])
def test_bad_hostfile_gets_one_error_line_and_exit_2(tmp_path, text, message):
    path = tmp_path / "hostfile"
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "streaming_muloco.hostfile", str(path)], cwd=REPO, env=base_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_example_hostfile_is_valid():
    proc = subprocess.run([sys.executable, "-m", "streaming_muloco.hostfile", "launch/hostfile.example", "--summary"],
                          cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.split() == ["1", "2", "localhost"]
