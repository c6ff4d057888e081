"""`python -m moonlight.convert hf-to-dcp | dcp-to-hf`: bit-exact round trips, agreement with the
trainer's checkpoints (both directions), clear errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from moonlight.hf import load_hf
from moonlight.convert import main
from moonlight.checkpoint.format import list_checkpoints, read_meta
from moonlight.checkpoint.export import export_hf
from moonlight.checkpoint.state import Checkpointer
from moonlight.train.build import load_initial_weights
from moonlight.train.config import CheckpointSection
from tests.hf_reference import make_hf_model
from tests.helpers import read_safetensors_dir
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "model"
    make_hf_model("moonlight", seed=0, dtype=torch.float32).save_pretrained(path)
    return path


def _same(a, b):
    ta, tb = read_safetensors_dir(a), read_safetensors_dir(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def test_hf_dcp_hf_round_trip_is_bit_exact(hf_dir, tmp_path):
    main(["hf-to-dcp", "--hf", str(hf_dir), "--out", str(tmp_path / "dcp")])
    meta = read_meta(str(tmp_path / "dcp"))
    assert meta["contents"] == ["model"] and meta["step"] == 0
    main(["dcp-to-hf", "--dcp", str(tmp_path / "dcp"), "--out", str(tmp_path / "hf"), "--max-shard-size", "200KB"])
    _same(hf_dir, tmp_path / "hf")
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    with open(hf_dir / "config.json") as f, open(tmp_path / "hf" / "config.json") as g:
        a, b = json.load(f), json.load(g)
    for key in ("hidden_size", "n_routed_experts", "num_hidden_layers", "kv_lora_rank", "vocab_size"):
        assert a[key] == b[key]


def test_bf16_round_trip_keeps_dtypes(tmp_path):
    src = tmp_path / "bf16"
    make_hf_model("moonlight", seed=1, dtype=torch.bfloat16).save_pretrained(src)
    main(["hf-to-dcp", "--hf", str(src), "--out", str(tmp_path / "dcp")])
    main(["dcp-to-hf", "--dcp", str(tmp_path / "dcp"), "--out", str(tmp_path / "hf")])
    _same(src, tmp_path / "hf")
    main(["dcp-to-hf", "--dcp", str(tmp_path / "dcp"), "--out", str(tmp_path / "f32"), "--dtype", "float32"])
    t = read_safetensors_dir(tmp_path / "f32")
    assert t["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == torch.float32


def test_module_entry_point(hf_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-m", "moonlight.convert", "hf-to-dcp", "--hf", str(hf_dir), "--out", str(tmp_path / "dcp")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "dcp")
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "moonlight.convert",
            "dcp-to-hf",
            "--dcp",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "nope does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_trainer_checkpoint_to_hf_and_hf_to_trainer(hf_dir, tmp_path):
    from moonlight.train.optim import build_optimizers
    from moonlight.train.schedule import LRSchedulerSection

    # hf-to-dcp -> a run folder's step-0: the trainer resumes the weights from it
    main(["hf-to-dcp", "--hf", str(hf_dir), "--out", str(tmp_path / "run" / "checkpoint" / "step-0")])
    model = load_hf(hf_dir, kernels="torch")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opts = build_optimizers(model.named_parameters(), "adamw", lr=1e-3)
    scheds = LRSchedulerSection(warmup_steps=1).build(opts, total_steps=10)
    cfg = CheckpointSection(enable=True, interval=1, keep_latest_k=0)
    ck = Checkpointer(cfg, tmp_path / "run", [model], opts, scheds, None)
    assert ck.load() == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k
    # ... or starts from it through checkpoint.initial_load_hf
    other = load_hf(hf_dir, kernels="torch")
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    cfg2 = CheckpointSection(
        enable=True, folder="run2", initial_load_hf=str(tmp_path / "run" / "checkpoint" / "step-0")
    )
    assert load_initial_weights(Checkpointer(cfg2, tmp_path / "run", [other], None, None, None), cfg2.initial_load_hf)
    for k, v in other.state_dict().items():
        assert torch.equal(v, reference[k]), k

    # a trainer checkpoint (with optimizer state) -> HF equals the trainer's own export
    model(torch.randint(0, model.args.vocab_size, (2, 8))).float().pow(2).mean().backward()
    opts.step()
    ck.save(5)
    ck.save(7)
    export_hf([model], tmp_path / "export", dtype=torch.float32)
    main(["dcp-to-hf", "--dcp", str(tmp_path / "run" / "checkpoint"), "--out", str(tmp_path / "latest")])
    _same(tmp_path / "export", tmp_path / "latest")
    main(["dcp-to-hf", "--dcp", str(tmp_path / "run" / "checkpoint"), "--step", "0", "--out", str(tmp_path / "s0")])
    _same(hf_dir, tmp_path / "s0")
    assert sorted(list_checkpoints(tmp_path / "run" / "checkpoint")) == [0, 5, 7]


def _err(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, match",
    [
        ([], "required: command (see python -m moonlight.convert --help)"),
        (["hf-to-pt"], "invalid choice: 'hf-to-pt'"),
        (["hf-to-dcp", "--hf", "x"], "required: --out (see python -m moonlight.convert hf-to-dcp --help)"),
        (["dcp-to-hf", "--dcp", "x", "--out", "y", "--step", "last"], "--step: invalid int value: 'last'"),
    ],
)
def test_bad_arguments_are_one_error_line(argv, match, capsys):
    err = _err(capsys, argv)
    assert err.count("\n") == 1 and err.startswith("error: ") and match in err, err


def test_clear_errors(hf_dir, tmp_path, capsys):
    assert "--hf" in _err(capsys, ["hf-to-dcp", "--hf", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    assert "no model.safetensors" in _err(
        capsys, ["hf-to-dcp", "--hf", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]
    )
    main(["hf-to-dcp", "--hf", str(hf_dir), "--out", str(tmp_path / "dcp")])
    taken = _err(capsys, ["hf-to-dcp", "--hf", str(hf_dir), "--out", str(tmp_path / "dcp")])
    assert "not empty; pass --overwrite to replace it" in taken and "overwrite=True" not in taken  # the CLI's flag
    main(["hf-to-dcp", "--hf", str(hf_dir), "--out", str(tmp_path / "dcp"), "--overwrite"])
    err = _err(
        capsys, ["dcp-to-hf", "--dcp", str(tmp_path / "dcp"), "--out", str(tmp_path / "h"), "--model-preset", "debug"]
    )
    assert "lacks" in err and "hidden_size=64 but the given config has hidden_size=128" in err
    missing = ["dcp-to-hf", "--dcp", str(tmp_path / "nope"), "--out", str(tmp_path / "h")]
    assert "does not exist" in _err(capsys, missing)
    assert "no complete checkpoint" in _err(
        capsys, ["dcp-to-hf", "--dcp", str(tmp_path / "empty"), "--out", str(tmp_path / "h")]
    )
    os.remove(tmp_path / "dcp" / "COMPLETE")
    assert "incomplete" in _err(capsys, ["dcp-to-hf", "--dcp", str(tmp_path / "dcp"), "--out", str(tmp_path / "h")])
    assert "--config" in _err(
        capsys,
        [
            "dcp-to-hf",
            "--dcp",
            str(tmp_path / "dcp"),
            "--out",
            str(tmp_path / "h"),
            "--config",
            str(tmp_path / "nope.json"),
        ],
    )


def _modes(root):
    """{relative path: permission bits} of a directory and everything in it."""
    out = {".": os.stat(root).st_mode & 0o777}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = os.stat(p).st_mode & 0o777
    return out


def test_outputs_get_the_umask_modes_not_the_temporary_ones(hf_dir, tmp_path):
    """Outputs are built in a mkdtemp directory (0700) and safetensors writes 0600; once published
    they must read like anything else the user writes (here umask 027: dirs 0750, files 0640)."""
    old = os.umask(0o027)
    try:  # the umask is read by moonlight.outputs at import: run the writers in a fresh process
        code = (
            "import sys; from moonlight.convert import main; from moonlight.hf import load_hf, save_hf; "
            "from moonlight.hf_peft import save_peft_adapter; from tests.helpers import lora_model; "
            "d = sys.argv[1]; main(['hf-to-dcp', '--hf', sys.argv[2], '--out', d + '/dcp']); "
            "main(['dcp-to-hf', '--dcp', d + '/dcp', '--out', d + '/hf']); "
            "m = load_hf(sys.argv[2]); save_hf(m, d + '/sharded', max_shard_size='100KB'); "
            "save_peft_adapter(lora_model(m.args, True), m.args, {'rank': 4, 'alpha': 8.0, 'dora': True}, "
            "d + '/adapter')"
        )
        subprocess.run([sys.executable, "-c", code, str(tmp_path), str(hf_dir)], check=True, cwd=ROOT)
    finally:
        os.umask(old)
    for out in ("dcp", "hf", "sharded", "adapter"):
        modes = _modes(tmp_path / out)
        assert len(modes) > 2, out
        for name, mode in modes.items():
            want = 0o750 if (tmp_path / out / name).is_dir() else 0o640
            assert mode == want, (out, name, oct(mode))
