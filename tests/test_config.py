"""The strict `streaming_muloco` section: every bad value names its key and the fix."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from multirank import REPO, base_env
from streaming_muloco.config import ConfigError, parse_json, parse_section, read_json, resolve, split_config
from streaming_muloco.ds_checks import DEEPSPEED_OPTIMIZERS, DEEPSPEED_SCHEDULERS, MUON_PARAMS, check_batch_keys

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
    ({"sync_every": 6, "num_fragments": 2, "sync_delay": 3}, r"or set streaming_muloco\.eager_updates to true"),
    ({"sync_every": 6, "sync_delay": 7, "eager_updates": True},
     r"streaming_muloco\.sync_delay \(7\) must be <= sync_every \(6\) with streaming_muloco\.eager_updates"),
    ({"eager_updates": True, "mix_alpha": 0.5},
     r"streaming_muloco\.mix_alpha \(0\.5\) must be 0 with streaming_muloco\.eager_updates"),
    ({"eager_updates": True, "sync_every": 6, "num_fragments": 2, "sync_delay": 3,
      "compression": {"method": "statistical", "bits": 2, "collective": "two_phase"}},
     r"compression\.collective 'two_phase' with streaming_muloco\.eager_updates needs sync_delay \(3\) < "),
    ({"eager_updates": "yes"}, r"streaming_muloco\.eager_updates must be true or false"),
    ({"eager_updates": True, "fault_tolerance": {"enabled": True, "lighthouse": "h:1"}},
     r"streaming_muloco\.eager_updates does not work with streaming_muloco\.fault_tolerance\.enabled yet"),
    ({"mix_alpha": 1.5}, r"streaming_muloco\.mix_alpha \(1\.5\) must be in \[0, 1\]"),
    ({"outer_lr": 0}, r"streaming_muloco\.outer_lr \(0\.0\) must be > 0"),
    ({"outer_momentum": 1.0}, r"streaming_muloco\.outer_momentum \(1\.0\) must be in \[0, 1\)"),
    ({"outer_nesterov": 1}, r"streaming_muloco\.outer_nesterov must be true or false"),
    ({"fragment_strategy": "random"}, r"streaming_muloco\.fragment_strategy \('random'\) must be one of"),
    ({"compression": {"method": "linear", "bits": 3}}, r"streaming_muloco\.compression\.bits \(3\) must be 2, 4 or 8"),
    ({"compression": {"mehtod": "linear"}}, r"streaming_muloco\.compression\.mehtod is not a known key; did you mean 'method'"),
    ({"compression": {"method": "e3m0", "bits": 2}}, r"compression\.bits \(2\) must be 4 for method 'e3m0'"),
    ({"compression": {"ef_beta": 0}}, r"compression\.ef_beta \(0\.0\) must be in \(0, 1\]"),
    ({"compression": {"method": "sparse", "bits": 4}}, r"compression\.bits \(4\) must be 2 for method 'sparse'"),
    ({"compression": {"stat_clip": 0}}, r"compression\.stat_clip \(0\.0\) must be a positive number"),
    ({"compression": {"method": "topk", "granularity": "row"}},
     r"compression\.granularity \('row'\) needs a block method.*method \"sparse\""),
    ({"compression": {"granularity": "rows"}}, r"compression\.granularity"),
    ({"compression": {"topk_fraction": 2}}, r"compression\.topk_fraction \(2\.0\) must be in \(0, 1\]"),
    ({"comm": {"backend": "nccl"}}, r"streaming_muloco\.comm\.backend \('nccl'\) must be one of \['torch', 'mpi'\]"),
    ({"comm": {"timeout_s": -1}}, r"comm\.timeout_s \(-1\.0\) must be > 0"),
    ({"comm": 3}, r"streaming_muloco\.comm must be a JSON object"),
    ({"inner": {"muon_update_scale": "keller"}}, r"inner\.muon_update_scale \('keller'\) must be one of"),
    # fault tolerance (docs/design.md §6)
    ({"num_replicas": 2, "fault_tolerance": {"enabled": True, "replica_id": 0, "lighthouse": "h:1"},
      "comm": {"backend": "mpi"}},
     r"streaming_muloco\.comm\.backend \('mpi'\) cannot change membership, which "
     r"streaming_muloco\.fault_tolerance\.enabled needs"),
    ({"num_replicas": 2, "fault_tolerance": {"enabled": True, "replica_id": 2, "lighthouse": "h:1"}},
     r"fault_tolerance\.replica_id \(2\) must be in \[0, streaming_muloco\.num_replicas = 2\)"),
    ({"num_replicas": 2, "fault_tolerance": {"enabled": True, "replica_id": 0}},
     r"fault_tolerance\.lighthouse is not set: pass --lighthouse HOST:PORT"),
    ({"num_replicas": 2, "fault_tolerance": {"enabled": True, "replica_id": 0, "lighthouse": "h:1",
                                             "min_replicas": 3}},
     r"fault_tolerance\.min_replicas \(3\) must be <= streaming_muloco\.num_replicas \(2\)"),
    ({"fault_tolerance": {"min_replicas": 0}}, r"fault_tolerance\.min_replicas \(0\) must be >= 1"),
    ({"fault_tolerance": {"timeout_s": 0}}, r"fault_tolerance\.timeout_s \(0\.0\) must be > 0"),
    ({"fault_tolerance": {"lighthouse": 5}}, r"fault_tolerance\.lighthouse must be a string, got 5"),
]


@pytest.mark.parametrize("section, message", BAD_SECTIONS)
def test_bad_section_raises_naming_the_key(section, message):
    with pytest.raises(ConfigError, match=message):
        parse_section(section)


def test_a_replica_job_is_one_replica_of_world_size_ranks():
    section = {"num_replicas": 3, "fault_tolerance": {"enabled": True, "replica_id": 1, "lighthouse": "h:1"}}
    assert parse_section(section).topology(2) == (3, 2)
    with pytest.raises(ConfigError, match=r"ranks_per_replica \(4\) must equal the ranks of this replica job \(2\)"):
        parse_section({**section, "ranks_per_replica": 4}).topology(2)


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


@pytest.mark.parametrize("zero, shown", [({}, "0"), ({"zero_optimization": {"stage": 0}}, "0")])
def test_outer_loop_needs_a_zero_stage(zero, shown):
    with pytest.raises(ConfigError, match=rf"zero_optimization\.stage \({shown}\) must be 1, 2 or 3 with the "
                                          rf"streaming_muloco outer loop"):
        split_config({**zero, "streaming_muloco": {"num_replicas": 2}})


def test_outer_loop_refuses_optimizer_state_swapped_to_nvme():
    with pytest.raises(ConfigError, match=r"zero_optimization\.offload_optimizer\.device 'nvme' cannot be used"):
        split_config({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}},
                      "streaming_muloco": {"num_replicas": 2}})


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
    ({"optimizer": {"type": "Muon"}, "gradient_clipping": 1.0},
     r"gradient_clipping \(1\.0\) with the Muon optimizer needs zero_optimization\.stage 1, 2 or 3 \(got 0\)"),
    ({"optimizer": {"type": "Muon"}}, r"gradient_clipping \(1\.0\) with the Muon"),  # DeepSpeed's default is 1.0
    ({"optimizer": {"type": "Muon"}, "gradient_clipping": 1.0,
      "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
     r"gradient_clipping \(1\.0\) with the Muon optimizer cannot be combined with zero_optimization\.offload_optimizer"),
    ({"optimizer": {"type": "Muon"}, "gradient_clipping": 0, "zero_optimization": {"stage": 2, "reduce_scatter": True}},
     r"reduce_scatter must be false with the Muon optimizer"),
])
def test_deepspeed_settings_known_to_break_muon_are_refused(ds, message):
    with pytest.raises(ConfigError, match=message):
        split_config(ds)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_clipping_with_muon_is_accepted_on_zero_1_2_and_3(stage):
    ds, _ = split_config({"optimizer": {"type": "Muon"}, "gradient_clipping": 1.0,
                          "zero_optimization": {"stage": stage, "reduce_scatter": False,
                                                "offload_optimizer": {"device": "none"}}})
    assert ds["gradient_clipping"] == 1.0  # initialize hands DeepSpeed 0 and clips before Muon itself


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
    (lambda t: ["--ds-config", "ds_configs/muloco_cpu.json", "--steps", "0"], "error: --steps (0) must be >= 1 (see --help)"),
    (lambda t: ["--ds-config", "ds_configs/muloco_cpu.json", "--n-layer", "0"], "error: model.n_layer (0) must be >= 1"),
    (lambda t: ["--ds-config", "ds_configs/muloco_cpu.json", "--steps", "-5"], "--steps (-5) must be >= 1"),
    (lambda t: ["--ds-config", "ds_configs/muloco_cpu.json", "--steps", "ten"],
     "error: argument --steps: invalid int value: 'ten' (see --help)"),
    (lambda t: ["--ds-config", "ds_configs/muloco_cpu.json", "--set", "streaming_muloco.sync_delay=30"],
     "error: streaming_muloco.sync_delay (30) must be < sync_every/num_fragments (30)"),
    (lambda t: ["--ds-config", "ds_configs/muloco_cpu.json", "--set", "streaming_muloco.num_fragments=40"],
     "error: streaming_muloco.num_fragments (40) must be <= sync_every (30)"),
    (lambda t: ["--ds-config", "ds_configs/muloco_cpu.json", "--data", _token_file(t, [1, 2, 300] * 2000)],
     "holds token id 300 >= model.vocab_size 256; check --data-dtype (uint16)"),
    (lambda t: ["--ds-config", "ds_configs/muloco_cpu.json", "--data", _token_file(t, [1, 2, 3] * 2000),
                "--data-dtype", "int8"], "error: --data-dtype 'int8' is not supported"),
    (lambda t: ["--ds-config", _raw_file(t, "{not json")], "is not valid JSON"),
    (lambda t: ["--ds-config", "ds_configs/muloco_cpu.json", "--replica-id", "0"],
     "error: --replica-id and --lighthouse go together: a fault-tolerant replica job needs both (see --help)"),
    (lambda t: ["--ds-config", "ds_configs/streaming_muloco_cpu.json", "--replica-id", "0", "--lighthouse", "h:1",
                "--set", "streaming_muloco.comm.backend=mpi"],
     "error: streaming_muloco.comm.backend ('mpi') cannot change membership"),
])
def test_cli_prints_one_error_line_and_exits_2_before_any_process_group(tmp_path, make_args, message):
    proc = _train_cli(tmp_path, *make_args(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error")]) == 1
    assert "usage:" not in proc.stderr


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


# --- One boundary for user errors: every bad input below stops pre-flight (before any process
# group, which with WORLD_SIZE=4 and no rendezvous would never form) with one `error:` line, exit 2.

MULOCO_PATH = "ds_configs/muloco_cpu.json"
MULOCO = json.loads((REPO / MULOCO_PATH).read_text())


def _edited(tmp_path, edit, name="c.json"):
    """muloco_cpu.json after `edit(config)`; json.dumps writes float('nan') as NaN, as a user would."""
    cfg = json.loads(json.dumps(MULOCO))
    edit(cfg)
    path = tmp_path / name
    path.write_text(json.dumps(cfg, indent=1))
    return str(path)


def _set(cfg, dotted, value):
    *parents, last = dotted.split(".")
    for part in parents:
        cfg = cfg[part]
    cfg[last] = value


def _setting(dotted, value):
    return lambda cfg: _set(cfg, dotted, value)


def _dropping(*keys):
    return lambda cfg: [cfg.pop(k) for k in keys]


def _duplicated(tmp_path, old, new):
    text = (REPO / MULOCO_PATH).read_text()
    assert old in text
    return _raw_file(tmp_path, text.replace(old, new, 1))


def _empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    return str(path)


def _step_dir_without_manifest(tmp_path):
    step = tmp_path / "o" / "checkpoints" / "step6"
    (step / "replica0").mkdir(parents=True)
    return str(step)


def _dangling_latest(tmp_path):
    ckpt = tmp_path / "o" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "latest").write_text("step9")
    return str(ckpt / "step9")


def _cfg(*args):
    return ["--ds-config", MULOCO_PATH, *args]


PREFLIGHT_CASES = [
    pytest.param(lambda t: _cfg("--data", _empty_file(t, "empty.bin")),
                 "is empty (0 bytes); point --data at a non-empty .txt or token file", id="empty-token-file"),
    pytest.param(lambda t: _cfg("--data", _empty_file(t, "empty.txt")), "is empty (0 bytes)", id="empty-text-file"),
    pytest.param(lambda t: ["--ds-config", _raw_file(t, "[1, 2]")],
                 "must hold a JSON object ({\"train_micro_batch_size_per_gpu\": ..., ...}) at the top level, got a list",
                 id="top-level-list"),
    pytest.param(lambda t: ["--ds-config", _edited(t, _setting("streaming_muloco.comm", {"timeout_s": math.nan}))],
                 "error: streaming_muloco.comm.timeout_s is NaN: only finite numbers are accepted", id="timeout-nan"),
    pytest.param(lambda t: ["--ds-config", _edited(t, _setting("streaming_muloco.outer_lr", math.inf))],
                 "error: streaming_muloco.outer_lr is Infinity: only finite numbers are accepted", id="outer-lr-inf"),
    pytest.param(lambda t: ["--ds-config", _edited(t, _setting("optimizer.params.eps", math.nan))],
                 "error: optimizer.params.eps is NaN", id="deepspeed-key-nan"),
    pytest.param(lambda t: _cfg("--set", "streaming_muloco.mix_alpha=NaN"),
                 "error: streaming_muloco.mix_alpha is NaN", id="set-nan"),
    pytest.param(lambda t: ["--ds-config", _edited(t, _setting("optimizer.params.muon_lr", "0.02"))],
                 "error: optimizer.params.muon_lr must be a number, got '0.02' (a JSON string: write 0.02 without "
                 "quotes)", id="muon-lr-string-in-json"),
    pytest.param(lambda t: _cfg("--set", "optimizer.params.muon_lr=abc"),
                 "error: optimizer.params.muon_lr must be a number, got 'abc'", id="muon-lr-set-abc"),
    pytest.param(lambda t: ["--ds-config", "ds_configs/dp_adamw_cpu.json", "--set", 'optimizer.params.lr="3e-3"'],
                 "error: optimizer.params.lr must be a number, got '3e-3'", id="adamw-lr-string"),
    pytest.param(lambda t: _cfg("--set", "optimizer.params.betas=0.9"),
                 "error: optimizer.params.betas must be a list of two numbers, e.g. [0.9, 0.95], got 0.9",
                 id="betas-not-a-pair"),
    pytest.param(lambda t: _cfg("--set", "scheduler.params.warmup_num_steps=ten"),
                 "error: scheduler.params.warmup_num_steps must be an integer, got 'ten'", id="scheduler-param-string"),
    pytest.param(lambda t: _cfg("--set", "+scheduler.params.warmup_steps=5"),
                 "error: scheduler.params.warmup_steps is not a parameter of DeepSpeed's WarmupCosineLR; did you "
                 "mean 'warmup_num_steps'?", id="scheduler-unknown-param"),
    pytest.param(lambda t: _cfg("--set", "scheduler.type=CosineLR"),
                 "error: scheduler.type 'CosineLR' is not a scheduler DeepSpeed can build", id="unknown-scheduler"),
    pytest.param(lambda t: ["--ds-config", _edited(t, lambda c: (_set(c, "zero_optimization.stage", 3),
                                                                 c.pop("streaming_muloco")))],
                 "error: zero_optimization.reduce_scatter must be false with the Muon optimizer on ZeRO stage 3",
                 id="zero3-muon-reduce-scatter"),
    pytest.param(lambda t: _cfg("--set", 'zero_optimization.stage="1"'),
                 "error: zero_optimization.stage must be 0, 1, 2 or 3, got '1'", id="zero-stage-string"),
    pytest.param(lambda t: _cfg("--set", "+train_batch_size=64"),
                 "error: train_batch_size (64) is the global batch micro (16) x accumulation (1) x world size (4), "
                 "but each of the 2 replicas is its own DeepSpeed data-parallel group of D=2 ranks, so DeepSpeed "
                 "needs the batch of one replica: set \"train_batch_size\": 32 (= 16 x 1 x 2)", id="global-batch"),
    pytest.param(lambda t: _cfg("--set", "+train_batch_size=40"),
                 "error: train_batch_size (40) must equal train_micro_batch_size_per_gpu (16) x "
                 "gradient_accumulation_steps (1) x D (2) = 32", id="batch-keys-disagree"),
    pytest.param(lambda t: _cfg("--set", "train_micro_batch_size_per_gpu=0"),
                 "error: train_micro_batch_size_per_gpu (0) must be >= 1", id="micro-batch-zero"),
    pytest.param(lambda t: _cfg("--set", "train_micro_batch_size_per_gpu=-4"),
                 "error: train_micro_batch_size_per_gpu (-4) must be >= 1", id="micro-batch-negative"),
    pytest.param(lambda t: ["--ds-config", _edited(t, _dropping("train_micro_batch_size_per_gpu"))],
                 "error: train_micro_batch_size_per_gpu is missing (and so is train_batch_size)",
                 id="batch-keys-missing"),
    pytest.param(lambda t: ["--ds-config", _edited(t, lambda c: (c.pop("train_micro_batch_size_per_gpu"),
                                                                 c.update(train_batch_size=31)))],
                 "error: train_batch_size (31) must be a multiple of gradient_accumulation_steps (1) x D (2) = 2",
                 id="train-batch-not-a-multiple"),
    pytest.param(lambda t: _cfg("--set", "optimizer.type=Muonn"),
                 "error: optimizer.type 'Muonn' is not an optimizer DeepSpeed can build; did you mean 'Muon'? Use "
                 "one of Adam, AdamW, Adagrad, Lamb, Lion, Muon, MuAdam, MuAdamW, MuSGD (any case), or the exact "
                 "name of a torch.optim class such as SGD or RMSprop", id="unknown-optimizer-type"),
    pytest.param(lambda t: _cfg("--set", "optimizer.type=SGD"),
                 "error: optimizer.params.muon_lr is not a parameter of torch.optim.SGD", id="torch-optimizer-params"),
    pytest.param(lambda t: ["--ds-config", _duplicated(t, '"muon_lr": 0.02,', '"muon_lr": 0.02, "muon_lr": 0.05,')],
                 "error: optimizer.params.muon_lr appears twice in --ds-config '", id="duplicate-key-nested"),
    pytest.param(lambda t: ["--ds-config", _duplicated(t, '"sync_every": 30,', '"sync_every": 30, "sync_every": 3,')],
                 "error: streaming_muloco.sync_every appears twice in --ds-config '", id="duplicate-key-section"),
    pytest.param(lambda t: ["--ds-config", _duplicated(t, '"gradient_clipping": 0.0,',
                                                       '"gradient_clipping": 0.0, "gradient_clipping": 1.0,')],
                 "error: gradient_clipping appears twice in --ds-config '", id="duplicate-key-top-level"),
    pytest.param(lambda t: _cfg("--set", "optimizer.params.mun_lr=0.03"),
                 "error: --set optimizer.params.mun_lr=0.03: optimizer.params.mun_lr is not in the config; did you "
                 "mean muon_lr? (to add a new key on purpose, write --set +optimizer.params.mun_lr=0.03)",
                 id="set-creates-unknown-key"),
    pytest.param(lambda t: _cfg("--set", "zero_optimisation.stage=2"),
                 "error: --set zero_optimisation.stage=2: zero_optimisation is not in the config; did you mean "
                 "zero_optimization?", id="set-unknown-parent"),
    pytest.param(lambda t: _cfg("--set", "+optimizer.params.mun_lr=0.03"),
                 "error: optimizer.params.mun_lr is not a parameter of DeepSpeed's Muon (it would be ignored "
                 "silently); did you mean 'muon_lr'?", id="set-plus-adds-then-muon-refuses"),
    pytest.param(lambda t: ["--ds-config", _edited(t, _setting("optimizer.params.mun_lr", 0.03))],
                 "error: optimizer.params.mun_lr is not a parameter of DeepSpeed's Muon", id="muon-typo-in-json"),
    pytest.param(lambda t: _cfg("--set", "sync_every"), "error: --set 'sync_every' must look like dotted.key=value",
                 id="set-without-value"),
    pytest.param(lambda t: ["--ds-config", _edited(t, _setting("streaming_muloco", None))],
                 "error: streaming_muloco is null: for plain DeepSpeed data parallel remove the section, or write "
                 "\"streaming_muloco\": {\"enabled\": false}", id="section-null"),
    pytest.param(lambda t: [], "error: the following arguments are required: --ds-config (see --help)",
                 id="no-ds-config"),
    pytest.param(lambda t: _cfg("--resume", _step_dir_without_manifest(t)),
                 "has no manifest.json: it is incomplete (the save that wrote it did not finish)",
                 id="resume-without-manifest"),
    pytest.param(lambda t: _cfg("--resume", str(t / "nowhere")), "is not a directory; pass a checkpoint step",
                 id="resume-not-a-directory"),
    pytest.param(lambda t: _cfg("--resume") if _dangling_latest(t) else [],
                 "step9' named by '", id="resume-latest-names-missing-checkpoint"),
    pytest.param(lambda t: _cfg("--set", "streaming_muloco.num_fragments=3"),
                 "error: streaming_muloco.num_fragments (3) ", id="more-fragments-than-blocks"),
]


@pytest.mark.parametrize("make_args, message", PREFLIGHT_CASES)
def test_bad_input_prints_one_error_line_and_exits_2_preflight(tmp_path, make_args, message):
    proc = _train_cli(tmp_path, *make_args(tmp_path))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout and "usage:" not in proc.stderr
    assert "[streaming_muloco] model" not in proc.stdout  # printed once DeepSpeed is up: never reached


# --- The config checks themselves, without a process.

def _with_steps(cfg):
    sched = (cfg.get("scheduler") or {}).get("params") or {}
    if sched.get("total_num_steps") == "auto":
        sched["total_num_steps"] = 100
    return cfg


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_config_passes_every_check(path):
    cfg = _with_steps(read_json(path))
    K = (cfg.get("streaming_muloco") or {}).get("num_replicas", 1)
    ds, section, k, d = resolve(cfg, 2 * K)
    assert (k, d) == ((K, 2) if section.enabled else (1, 2 * K))


def test_auto_total_num_steps_is_refused_outside_the_cli():
    with pytest.raises(ConfigError, match=r"scheduler\.params\.total_num_steps is \"auto\", which only"):
        resolve(read_json(REPO / MULOCO_PATH), 4)


@pytest.mark.parametrize("keys, world, K", [
    ({"train_micro_batch_size_per_gpu": 4}, 4, 2),
    ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 4, 2),
    ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 4, 2),
    ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4}, 4, 2),  # DeepSpeed derives accumulation 2
    ({"train_batch_size": 8, "gradient_accumulation_steps": 2}, 4, 2),  # micro 2
    ({"train_batch_size": 8}, 4, 2),  # micro 4
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 4, 1),
])
def test_batch_keys_deepspeed_accepts_pass(keys, world, K):
    check_batch_keys(keys, K, world // K)


@pytest.mark.parametrize("keys, message", [
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2},
     r"is the global batch micro \(4\) x accumulation \(2\) x world size \(4\), but each of the 2 replicas is its "
     r"own DeepSpeed data-parallel group of D=2 ranks, so DeepSpeed needs the batch of one replica: set "
     r"\"train_batch_size\": 16 \(= 4 x 2 x 2\)"),
    ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4},
     r"train_batch_size \(10\) must be a multiple of train_micro_batch_size_per_gpu \(4\) x D \(2\) = 8"),
    ({"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4},
     r"train_batch_size \(4\) must be a multiple of train_micro_batch_size_per_gpu \(4\) x D \(2\) = 8"),
    ({"train_batch_size": 6, "gradient_accumulation_steps": 2},
     r"train_batch_size \(6\) must be a multiple of gradient_accumulation_steps \(2\) x D \(2\) = 4"),
    ({"gradient_accumulation_steps": 2}, r"train_micro_batch_size_per_gpu is missing \(and so is train_batch_size\)"),
    ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 0},
     r"gradient_accumulation_steps \(0\) must be >= 1"),
    ({"train_micro_batch_size_per_gpu": 2.5}, r"train_micro_batch_size_per_gpu must be an integer, got 2\.5"),
    ({"train_batch_size": "16"}, r"train_batch_size must be an integer, got '16' \(a JSON string: write 16 without"),
])
def test_batch_keys_deepspeed_would_refuse_are_refused_with_the_fix(keys, message):
    with pytest.raises(ConfigError, match=message):
        check_batch_keys(keys, 2, 2)


def test_scheduler_table_matches_deepspeeds_constructors():
    import inspect

    from deepspeed.runtime import lr_schedules

    assert set(DEEPSPEED_SCHEDULERS) == set(lr_schedules.VALID_LR_SCHEDULES)
    for name, table in DEEPSPEED_SCHEDULERS.items():
        params = list(inspect.signature(getattr(lr_schedules, name).__init__).parameters)[2:]
        assert set(table) == set(params), name


def test_optimizer_lists_match_what_deepspeed_reads():
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS as ds_names
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert set(DEEPSPEED_OPTIMIZERS) == set(ds_names)
    muon_reads = set(DeepSpeedEngine._MUON_HALF_KEYS) | set(DeepSpeedEngine._ADAM_HALF_KEYS) | {"muon_lr", "adam_lr"}
    assert muon_reads <= set(MUON_PARAMS)


@pytest.mark.parametrize("ds, message", [
    ({"optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": "0.9"}}},
     r"optimizer\.params\.momentum must be a number, got '0\.9'"),
    ({"optimizer": {"type": "SGD", "params": {"lr": 0.1, "nesterov": 1}}},
     r"optimizer\.params\.nesterov must be true or false, got 1"),
    ({"optimizer": {"type": "sgd"}}, r"optimizer\.type 'sgd' is not an optimizer DeepSpeed can build"),
    ({"optimizer": {"params": {"lr": 0.1}}}, r"optimizer\.type is missing"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "max_grad_norm": 1.0}}},
     r"optimizer\.params\.max_grad_norm is not supported by DeepSpeed; remove it and set the top-level"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": "yes"}}},
     r"optimizer\.params\.torch_adam must be true or false, got 'yes'"),
    ({"optimizer": {"type": "AdamW", "params": [0.1]}}, r"optimizer\.params must be a JSON object"),
    ({"scheduler": {"type": "StepLR", "params": {}}}, r"scheduler\.params\.step_size is missing"),
    ({"scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 3}}},
     r"scheduler\.params\.total_num_steps is missing: DeepSpeed's WarmupCosineLR needs it"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cosine"}}},
     r"scheduler\.params\.warmup_type must be 'log' or 'linear', got 'cosine'"),
    ({"gradient_clipping": "0"}, r"gradient_clipping must be a number, got '0' \(a JSON string: write 0 without"),
    ({"optimizer": {"type": "Adam", "params": {"betas": [0.9, math.inf]}}},
     r"optimizer\.params\.betas\[1\] is Infinity"),
])
def test_deepspeed_keys_are_checked_naming_the_dotted_key(ds, message):
    with pytest.raises(ConfigError, match=message):
        split_config(ds)


def test_torch_optimizer_and_scheduler_types_are_accepted():
    ds, _ = split_config({"optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True}},
                          "scheduler": {"type": "StepLR", "params": {"step_size": 10, "gamma": 0.5}}})
    assert ds["optimizer"]["type"] == "SGD"


def test_nan_in_the_section_is_refused_even_without_split_config():
    with pytest.raises(ConfigError, match=r"streaming_muloco\.comm\.timeout_s is NaN"):
        parse_section({"comm": {"timeout_s": math.nan}})


def test_set_needs_plus_to_add_a_key_and_section_keys_need_none():
    from streaming_muloco.train import apply_overrides

    cfg = {"optimizer": {"type": "Muon", "params": {"muon_lr": 0.02}}}
    apply_overrides(cfg, ["optimizer.params.muon_lr=0.03", "+gradient_clipping=0", "+zero_optimization.stage=1",
                          "streaming_muloco.compression.bits=4", "+optimizer.params.muon_lr=0.04",
                          "optimizer.type=AdamW"])
    assert cfg == {"optimizer": {"type": "AdamW", "params": {"muon_lr": 0.04}}, "gradient_clipping": 0,
                   "zero_optimization": {"stage": 1}, "streaming_muloco": {"compression": {"bits": 4}}}
    with pytest.raises(ConfigError, match=r"--set gradient_clippin=0: gradient_clippin is not in the config; did you "
                                          r"mean gradient_clipping\? \(to add a new key on purpose, write --set "
                                          r"\+gradient_clippin=0\)"):
        apply_overrides(cfg, ["gradient_clippin=0"])
    with pytest.raises(ConfigError, match=r"--set optimizer\.type\.x=1: optimizer\.type is \"AdamW\", not a JSON "
                                          r"object"):
        apply_overrides(cfg, ["optimizer.type.x=1"])


def test_duplicate_keys_are_named_with_their_path_inside_lists():
    with pytest.raises(ConfigError, match=r"^a\[1\]\.b appears twice in x\.json"):
        parse_json('{"a": [{"b": 1}, {"b": 1, "b": 2}]}', "x.json")
    assert parse_json('{"a": [{"b": 1}], "c": {"d": null}}', "x.json") == {"a": [{"b": 1}], "c": {"d": None}}
    assert type(parse_json('{"c": {"d": 1}}', "x.json")["c"]) is dict
