"""The TOML job config: parsing, CLI overrides, error messages, validation, round trip."""

import os
import textwrap
import tomllib

import pytest

from moonlight.parallel.mesh import ParallelDims
from moonlight.errors import ConfigError
from moonlight.train.config import (
    SECTIONS,
    JobConfig,
    load_config,
    parse_args,
)
from tests.helpers import ROOT


def write(tmp_path, text, name="job.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_defaults_are_valid_and_have_the_required_keys():
    cfg = load_config(None, []).validate()
    required = {
        "job": ["dump_folder", "description"],
        "model": ["name", "hf_config", "kernels", "overrides"],
        "training": [
            "steps",
            "seed",
            "global_batch_size",
            "local_batch_size",
            "seq_len",
            "max_norm",
            "dtype",
            "mixed_precision_param",
            "mixed_precision_reduce",
            "gc_freq",
            "deterministic",
            "on_nonfinite",
        ],
        "optimizer": [
            "name",
            "lr",
            "beta1",
            "beta2",
            "eps",
            "weight_decay",
            "momentum",
            "nesterov",
            "ns_steps",
            "precision_aware",
        ],
        "lr_scheduler": ["warmup_steps", "decay_type", "decay_ratio", "min_lr_ratio"],
        "parallelism": [
            "dp_replicate",
            "dp_shard",
            "cp",
            "tp",
            "sequence_parallel",
            "ep",
            "pp",
            "pp_schedule",
            "pp_layout",
            "pp_virtual_stages",
            "pp_microbatches",
            "fsdp_reshard_after_forward",
        ],
        "activation_checkpoint": ["mode"],
        "data": ["format", "path", "text_key", "tokenizer", "on_bad_line", "add_eos"],
        "checkpoint": ["enable", "interval", "keep_latest_k", "folder", "load_step", "initial_load_hf", "export_hf"],
        "metrics": ["log_freq", "enable_tensorboard", "device_peak_flops", "profile_start", "profile_steps"],
        "moe": ["bias_update_rate", "aux_loss_coeff"],
        "lora": ["enable", "rank", "alpha", "dora", "dropout", "targets", "export_adapter", "init_adapter"],
        "validation": ["enable", "path", "format", "interval", "steps"],
    }
    d = cfg.to_dict()
    assert set(d) == set(required) == set(SECTIONS)
    for sec, keys in required.items():
        for k in keys:
            assert k in d[sec], f"{sec}.{k}"
    assert cfg.optimizer.momentum == 0.95 and cfg.optimizer.nesterov and cfg.optimizer.ns_steps == 5
    assert cfg.moe.bias_update_rate is None and cfg.moe.aux_loss_coeff == 0.001
    assert cfg.moe.bias_rate(lora=False) == 1e-3 and cfg.moe.bias_rate(lora=True) == 0.0
    assert cfg.parallelism.dp_shard == -1 and cfg.checkpoint.load_step == -1
    assert os.path.isdir(os.path.join(ROOT, cfg.data.path)), "default data.path must be the shipped corpus"


def test_toml_file_and_overrides(tmp_path):
    path = write(
        tmp_path,
        """
        [job]
        description = "t"
        [training]
        steps = 50
        max_norm = 2          # int accepted for a float key
        [optimizer]
        name = "muon"
        [parallelism]
        pp = 2
        pp_layout = [14, 13]
        [model.overrides]
        num_layers = 4
        dim = 64
    """,
    )
    cfg = load_config(
        path,
        [
            "--training.steps=20",
            "--parallelism.tp",
            "2",
            "--training.deterministic",  # bare flag = true for a bool
            "--optimizer.lr",
            "-1e-3",  # a negative value is a value, not a flag
            "--training.dtype=bfloat16",
            "--parallelism.sequence_parallel=false",
            "--model.overrides.num_layers=3",
            "--model.overrides.name=tiny",
        ],
    )
    assert cfg.job.description == "t"
    assert cfg.training.steps == 20
    assert cfg.training.max_norm == 2.0 and isinstance(cfg.training.max_norm, float)
    assert cfg.optimizer.name == "muon" and cfg.optimizer.lr == -1e-3
    assert cfg.parallelism.tp == 2 and cfg.parallelism.pp == 2 and cfg.parallelism.pp_layout == [14, 13]
    assert cfg.training.deterministic is True and cfg.parallelism.sequence_parallel is False
    assert cfg.training.dtype == "bfloat16"
    assert cfg.model.overrides == {"num_layers": 3, "dim": 64, "name": "tiny"}


@pytest.mark.parametrize("text", ["14,13", "[14,13]", "[14, 13]", " 14 , 13 "])
def test_cli_list_forms(text):
    assert load_config(None, [f"--parallelism.pp_layout={text}"]).parallelism.pp_layout == [14, 13]


def test_cli_empty_list_and_table():
    cfg = load_config(None, ["--parallelism.pp_layout=[]", "--model.overrides={num_layers = 2}"])
    assert cfg.parallelism.pp_layout == [] and cfg.model.overrides == {"num_layers": 2}


def test_parse_args_with_config_flag(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 70\n")
    assert parse_args(["--config", path, "--training.seed=3"]).training.steps == 70
    cfg = parse_args([f"--config={path}", "--training.seed", "3"])
    assert cfg.training.steps == 70 and cfg.training.seed == 3


# ------------------------------------------------------------------ error paths


def test_unknown_section_toml(tmp_path):
    path = write(tmp_path, "[trainig]\nsteps = 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, [])
    msg = str(e.value)
    assert "[trainig]" in msg and "did you mean 'training'" in msg and path in msg
    assert "valid sections: job, model, training" in msg


def test_unknown_section_cli():
    # a British spelling on purpose: the section is [optimizer]
    with pytest.raises(ConfigError, match=r"unknown config section \[optimiser\].*did you mean 'optimizer'"):
        load_config(None, ["--optimiser.lr=1"])


def test_unknown_key_toml_lists_valid_keys(tmp_path):
    path = write(tmp_path, "[training]\nstpes = 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, [])
    msg = str(e.value)
    assert "'training.stpes'" in msg and "did you mean 'training.steps'?" in msg
    assert "valid keys of [training]: steps, seed, global_batch_size" in msg


def test_unknown_key_cli():
    with pytest.raises(ConfigError, match=r"'parallelism.pp_layuot'.*did you mean 'parallelism.pp_layout'"):
        load_config(None, ["--parallelism.pp_layuot=1,2"])
    with pytest.raises(ConfigError, match="unknown config key 'training.steps.x'"):
        load_config(None, ["--training.steps.x=1"])


@pytest.mark.parametrize(
    "toml,match",
    [
        ('[training]\nsteps = "ten"\n', r"'training.steps' expects int, got str 'ten'"),
        ("[training]\nsteps = 1.5\n", r"'training.steps' expects int, got float"),
        ("[training]\nsteps = true\n", r"'training.steps' expects int, got bool"),
        ("[training]\ndeterministic = 1\n", r"'training.deterministic' expects bool"),
        ('[optimizer]\nlr = "1e-3"\n', r"'optimizer.lr' expects float"),
        ('[optimizer]\nname = "adamv"\n', r"'optimizer.name' expects one of 'adamw', 'muon'.*did you mean 'adamw'"),
        ('[parallelism]\npp_layout = [1, "2"]\n', r"'parallelism.pp_layout' expects list\[int\]"),
        ("[parallelism]\npp_layout = 3\n", r"'parallelism.pp_layout' expects list\[int\]"),
        ("[model]\noverrides = 3\n", r"'model.overrides' expects table"),
        ("training = 3\n", r"config entry 'training'.*must be a \[training\] table"),
    ],
)
def test_wrong_type_toml(tmp_path, toml, match):
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError, match=match):
        load_config(path, [])


@pytest.mark.parametrize(
    "arg,match",
    [
        ("--training.steps=abc", r"'training.steps' expects int, got str 'abc' \(from command line"),
        ("--training.steps=1.5", r"'training.steps' expects int"),
        ("--training.deterministic=maybe", r"'training.deterministic' expects bool"),
        ("--optimizer.lr=fast", r"'optimizer.lr' expects float"),
        ("--data.format=parquet", r"'data.format' expects one of 'jsonl', 'hf', 'megatron'"),
        ("--parallelism.pp_schedule=1f1b", r"did you mean '1F1B'"),
        ("--parallelism.pp_layout=1,x", r"'parallelism.pp_layout' expects list\[int\]"),
        ("--training.steps", r"needs a value"),
        ("training.steps=3", r"unexpected command-line argument"),
        ("--steps=3", r"expected --section.key=value"),
    ],
)
def test_wrong_type_cli(arg, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [arg])


def test_missing_file_and_bad_syntax(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.toml"), [])
    with pytest.raises(ConfigError, match="TOML syntax error"):
        load_config(write(tmp_path, "[training\n"), [])


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["--training.steps=0"], "training.steps must be > 0"),
        (["--training.seq_len=0"], "training.seq_len must be > 0"),
        (["--training.global_batch_size=0"], "training.global_batch_size must be > 0"),
        (["--training.local_batch_size=-1"], "training.local_batch_size must be > 0"),
        (
            ["--training.global_batch_size=10", "--training.local_batch_size=4"],
            r"global_batch_size \(10\) must be a multiple of training.local_batch_size \(4\)",
        ),
        (["--training.max_norm=-1"], "training.max_norm must be >= 0"),
        (["--training.gc_freq=-1"], "training.gc_freq must be >= 0"),
        (["--training.max_consecutive_nonfinite=0"], "max_consecutive_nonfinite must be >= 1"),
        (["--optimizer.lr=0"], "optimizer.lr must be > 0"),
        (["--optimizer.beta1=1"], r"optimizer.beta1 must be in \[0, 1\)"),
        (["--optimizer.beta2=-0.1"], r"optimizer.beta2 must be in \[0, 1\)"),
        (["--optimizer.eps=0"], "optimizer.eps must be > 0"),
        (["--optimizer.weight_decay=-1"], "optimizer.weight_decay must be >= 0"),
        (["--optimizer.momentum=1.0"], "optimizer.momentum must be in"),
        (["--optimizer.ns_steps=0"], "optimizer.ns_steps must be >= 1"),
        (["--lr_scheduler.warmup_steps=-1"], "warmup_steps must be >= 0"),
        (
            ["--training.steps=10", "--lr_scheduler.warmup_steps=11"],
            r"warmup_steps \(11\) must be <= training.steps \(10\)",
        ),
        (["--lr_scheduler.min_lr_ratio=1.5"], r"min lr <= optimizer.lr"),
        (["--lr_scheduler.decay_ratio=2"], r"decay_ratio must be in \[0, 1\]"),
        (
            [
                "--lr_scheduler.decay_type=wsd",
                "--training.steps=100",
                "--lr_scheduler.warmup_steps=90",
                "--lr_scheduler.decay_ratio=0.2",
            ],
            r"warmup_steps \(90\) \+ decay steps",
        ),
        (["--parallelism.tp=0"], "parallelism.tp must be >= 1"),
        (["--parallelism.ep=0"], "parallelism.ep must be >= 1"),
        (["--parallelism.pp=0"], "parallelism.pp must be >= 1"),
        (["--parallelism.dp_replicate=0"], "parallelism.dp_replicate must be >= 1"),
        (["--parallelism.dp_shard=0"], "dp_shard must be -1"),
        (["--parallelism.pp_microbatches=-1"], "pp_microbatches must be >= 0"),
        (["--parallelism.pp_virtual_stages=2"], "runs one stage per rank"),
        (["--parallelism.pp_schedule=ZBVZeroBubble", "--parallelism.pp=2"], "needs pp_virtual_stages=2"),
        (["--parallelism.pp=2", "--parallelism.pp_layout=5,4,3"], r"pp_layout \[5, 4, 3\] has 3 entries but pp=2"),
        (["--parallelism.pp=2", "--parallelism.pp_layout=5,0"], r"pp_layout \[5, 0\] has an empty stage"),
        (["--checkpoint.interval=0"], "checkpoint.interval must be >= 1"),
        (["--checkpoint.keep_latest_k=-1"], "keep_latest_k must be >= 0"),
        (["--checkpoint.load_step=-2"], "load_step must be -1"),
        (
            ["--model.overrides.first_k_dense_replace=x"],
            "model.overrides.first_k_dense_replace expects int, got str 'x'",
        ),
        (["--model.overrides.num_hidden_layers=true"], "model.overrides.num_hidden_layers expects int, got bool True"),
        (["--model.overrides.rope_theta=fast"], "model.overrides.rope_theta expects float, got str 'fast'"),
        (
            ["--checkpoint.enable=false", "--checkpoint.load_step=6"],
            "load_step = 6 resumes .* checkpoint.enable = true",
        ),
        (["--checkpoint.folder="], "checkpoint.folder must not be empty"),
        (["--metrics.log_freq=0"], "metrics.log_freq must be >= 1"),
        (["--metrics.device_peak_flops=-1"], "device_peak_flops must be >= 0"),
        (["--metrics.profile_steps=3"], "needs metrics.profile_start >= 1"),
        (["--metrics.profile_start=-1"], "profile_start must be >= 0"),
        (["--moe.bias_update_rate=-1e-3"], "moe.bias_update_rate must be >= 0"),
        (["--moe.aux_loss_coeff=-1"], "moe.aux_loss_coeff must be >= 0"),
        (["--data.path="], "data.path must not be empty"),
        (["--job.dump_folder="], "job.dump_folder must not be empty"),
    ],
)
def test_validation_errors(overrides, match):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


def test_validation_reports_every_problem():
    cfg = load_config(None, ["--training.steps=0", "--optimizer.lr=0"])
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert "training.steps" in str(e.value) and "optimizer.lr" in str(e.value)


def test_dump_folder_inside_the_data_is_refused(tmp_path):
    """Fault: a dump folder in (or equal to) the data directory: the next run read metrics.jsonl as data."""
    (tmp_path / "corpus").mkdir()
    for dump in ("corpus", "corpus/run"):
        cfg = load_config(None, [f"--data.path={tmp_path / 'corpus'}", f"--job.dump_folder={tmp_path / dump}"])
        with pytest.raises(ConfigError, match=r"job.dump_folder = .* lies inside data.path = .*corpus'"):
            cfg.validate()
    cfg = load_config(
        None,
        [
            f"--data.path={tmp_path / 'corpus'}",
            f"--job.dump_folder={tmp_path / 'corpus/run'}",
            "--validation.enable=true",
            f"--validation.path={tmp_path}",
            "--data.path=data/corpus",
        ],
    )
    with pytest.raises(ConfigError, match=r"lies inside validation.path"):
        cfg.validate()
    load_config(None, [f"--data.path={tmp_path / 'corpus'}", f"--job.dump_folder={tmp_path}"]).validate()


def test_valid_pipeline_combinations():
    load_config(None, ["--parallelism.pp=2", "--parallelism.pp_layout=14,13"]).validate()
    load_config(
        None,
        [
            "--parallelism.pp=2",
            "--parallelism.pp_schedule=Interleaved1F1B",
            "--parallelism.pp_virtual_stages=2",
            "--parallelism.pp_layout=7,7,7,6",
        ],
    ).validate()
    load_config(
        None, ["--parallelism.pp=2", "--parallelism.pp_schedule=ZBVZeroBubble", "--parallelism.pp_virtual_stages=2"]
    ).validate()


def _dims(p, world_size):
    return ParallelDims(
        dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp, ep=p.ep, pp=p.pp, world_size=world_size
    )


def test_world_size_helpers():
    # the job config's degrees are resolved against the world by ParallelDims, their one owner
    p = load_config(None, ["--parallelism.tp=2"]).parallelism
    assert _dims(p, 8).dp_shard == 4
    with pytest.raises(ConfigError, match="does not divide world_size=7"):
        _dims(p, 7)
    p = load_config(None, ["--parallelism.tp=2", "--parallelism.dp_shard=2"]).parallelism
    assert _dims(p, 4).dp_shard == 2
    with pytest.raises(ConfigError, match="but world_size = 8"):
        _dims(p, 8)
    cfg = load_config(None, ["--training.global_batch_size=16", "--training.local_batch_size=4"])
    assert cfg.grad_accum_steps(1) == 4 and cfg.grad_accum_steps(2) == 2 and cfg.grad_accum_steps(4) == 1
    with pytest.raises(ConfigError, match="local_batch_size \\* data-parallel degree"):
        cfg.grad_accum_steps(3)


def test_to_toml_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            '--job.description=quote " backslash \\ tab\t unicode é 中',
            "--parallelism.pp_layout=14,13",
            "--optimizer.lr=3e-4",
            "--model.overrides.num_layers=4",
            "--model.overrides.rope_theta=50000.0",
            "--model.overrides.name=x",
            "--checkpoint.export_hf=end",
        ],
    )
    text = cfg.to_toml()
    tomllib.loads(text)  # valid TOML
    p = tmp_path / "config.toml"
    p.write_text(text)
    again = load_config(str(p), [])
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert again.to_toml() == text
    assert JobConfig() == load_config(None, [])


def test_shipped_train_toml_is_valid():
    load_config(os.path.join(ROOT, "train.toml"), []).validate()


def test_several_problems_are_numbered_on_one_line():
    with pytest.raises(ConfigError) as one:
        load_config(None, ["--training.steps=0", "--lr_scheduler.warmup_steps=0"]).validate()
    assert str(one.value) == "invalid config: training.steps must be > 0 (got 0)"
    with pytest.raises(ConfigError) as two:
        load_config(None, ["--training.steps=-3", "--lr_scheduler.warmup_steps=20"]).validate()
    assert str(two.value) == (
        "invalid config, 2 problems: (1) training.steps must be > 0 (got -3); "
        "(2) lr_scheduler.warmup_steps (20) must be <= training.steps (-3)"
    )


def test_relative_paths_are_the_working_directorys_and_a_config_elsewhere_is_explained(tmp_path, monkeypatch):
    """data.path = "data/corpus" is read from where the run starts (documented); run from another folder,
    the error names both places instead of a bare missing file."""
    (tmp_path / "data" / "corpus").mkdir(parents=True)
    config = tmp_path / "job.toml"
    config.write_text('[data]\npath = "data/corpus"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_config(str(config)).data.path == "data/corpus"  # found here: the working directory's
    monkeypatch.chdir(elsewhere)
    with pytest.raises(
        ConfigError,
        match=r"data.path = 'data/corpus' .* read from the working directory .*"
        r"run from .*, or set data.path to '.*/data/corpus'",
    ):
        load_config(str(config))
    assert load_config(str(config), ["--data.path=data/other"]).data.path == "data/other"  # the command line's
