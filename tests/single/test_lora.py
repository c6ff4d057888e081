"""LoRA / DoRA fine-tuning in one process: the adapter math against independent formulas, init equals
the base model, only adapters train, merging, the trainer end to end (loss falls, base weights
untouched, resume, HF import and merged HF export that transformers loads), checkpoints without the
frozen base, and config errors."""

import dataclasses
import json
import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moonlight.checkpoint.export import export_hf
from moonlight.errors import CheckpointError, ConfigError
from moonlight.model.lora import (
    DEFAULT_TARGETS,
    LoRALinear,
    apply_lora,
    count_params,
    hide_adapters,
    is_adapter_name,
    lora_scales,
    merge_lora,
    merge_lora_state_dict,
)
from moonlight.train.trainer import Trainer
from tests.helpers import LORA_ARGS, lora_cfg, randomize_adapters, lora_tokens
from tests.helpers import lora_test_model
from tests.helpers import lora_losses

Q_LORA = dataclasses.replace(LORA_ARGS, q_lora_rank=24)


# ------------------------------------------------------------------------------------ the module


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("args", [LORA_ARGS, Q_LORA], ids=["q_proj", "q_lora"])
def test_adapted_model_equals_base_at_init(args, dora):
    model = lora_test_model(args)
    x = lora_tokens(args)
    with torch.no_grad():
        ref = model(x)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = apply_lora(model, DEFAULT_TARGETS, rank=4, alpha=8.0, dora=dora)
    projs = ["q_proj"] if args.q_lora_rank is None else ["q_a_proj", "q_b_proj"]
    expected = [
        f"layers.{i}.attn.{p}"
        for p in projs + ["kv_a_proj", "kv_b_proj", "o_proj"]
        for i in range(args.num_hidden_layers)
    ]
    assert sorted(names) == sorted(expected)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=1e-5)
    # base weights keep their names (and tensors); adapters are the only trainable parameters
    sd = model.state_dict()
    for n, p in base.items():
        assert torch.equal(sd[n], p), n
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    suffixes = ("lora_a.weight", "lora_b.weight") + (("magnitude",) if dora else ())
    assert trainable == {f"{m}.{s}" for m in expected for s in suffixes}
    assert all(is_adapter_name(n) for n in trainable) and not any(is_adapter_name(n) for n in base)
    lin = model.get_submodule(expected[0])
    assert isinstance(lin, LoRALinear) and lin.scale == 2.0
    assert torch.equal(lin.lora_b.weight, torch.zeros_like(lin.lora_b.weight))
    if dora:
        torch.testing.assert_close(lin.magnitude, lin.weight.norm(dim=1))
    n_trainable, n_total = count_params([model])
    assert n_trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert n_total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_only_adapter_params_get_gradients(dora):
    model = lora_test_model().train()
    apply_lora(model, rank=4, alpha=8.0, dora=dora)
    randomize_adapters(model)  # B = 0 would leave A without gradient
    x = lora_tokens()
    F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    for n, p in model.named_parameters():
        if is_adapter_name(n):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lora_linear_matches_independent_formula(dora, bias):
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=bias).double()
    w0 = base.weight.detach().clone()
    lin = LoRALinear(base, rank=3, alpha=5.0, dora=dora).double()
    with torch.no_grad():
        lin.lora_a.weight.normal_()
        lin.lora_b.weight.normal_()
        if dora:
            lin.magnitude.uniform_(0.5, 2.0)
    x = torch.randn(4, 7, 12, dtype=torch.float64)
    s = 5.0 / 3
    a = lin.lora_a.weight.detach().clone().requires_grad_()
    b = lin.lora_b.weight.detach().clone().requires_grad_()
    w = w0 + s * b @ a
    if dora:
        m = lin.magnitude.detach().clone().requires_grad_()
        w = m[:, None] * w / torch.linalg.vector_norm(w, dim=1, keepdim=True).detach()  # the norm is a constant
    ref = x @ w.T + (base.bias if bias else 0)
    out = lin(x)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(lin.lora_a.weight.grad, a.grad)
    torch.testing.assert_close(lin.lora_b.weight.grad, b.grad)
    if dora:
        torch.testing.assert_close(lin.magnitude.grad, m.grad)
    assert lin.weight.grad is None
    with torch.no_grad():
        torch.testing.assert_close(lin.merged_weight(), w)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_lora_gives_a_plain_model_with_the_same_outputs(dora):
    model = lora_test_model()
    apply_lora(model, rank=4, alpha=8.0, dora=dora, targets=list(DEFAULT_TARGETS) + ["ffn.down_proj"])
    randomize_adapters(model)
    x = lora_tokens()
    with torch.no_grad():
        adapted = model(x)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scales = lora_scales(model)
    merged_sd = merge_lora_state_dict(sd, scales)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.layers["1"].attn.q_proj) is nn.Linear
    assert set(model.state_dict()) == set(lora_test_model().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
    plain = lora_test_model(seed=5)
    plain.load_state_dict(merged_sd)  # strict: the state-dict merge gives exactly the plain keys
    with torch.no_grad():
        torch.testing.assert_close(plain(x), adapted, atol=1e-5, rtol=1e-5)


def test_hide_adapters_shows_the_plain_model():
    model = lora_test_model()
    apply_lora(model, dora=True)
    with hide_adapters(model):
        assert set(model.state_dict()) == set(lora_test_model().state_dict())
    assert any(is_adapter_name(k) for k in model.state_dict())
    assert len(list(model.get_submodule("layers.0.attn.q_proj").parameters())) == 4


def test_bad_adapter_arguments_are_named():
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        apply_lora(lora_test_model(), rank=0)
    with pytest.raises(ValueError, match="'attn.qq_proj' matches no module"):
        apply_lora(lora_test_model(), targets=["attn.qq_proj"])
    with pytest.raises(ValueError, match="'attn' matches 'layers.0.attn', a MLA, not an nn.Linear"):
        apply_lora(lora_test_model(), targets=["attn"])
    with pytest.raises(ValueError, match="match no module"):
        apply_lora(lora_test_model(), targets=["attn.q_a_proj"])  # the model has q_proj only


def _base_params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model_parts[0].named_parameters() if not is_adapter_name(n)}


@pytest.mark.parametrize("dora, optimizer", [(False, "muon"), (True, "adamw")], ids=["lora_muon", "dora_adamw"])
def test_trainer_lora_run_lowers_loss_and_keeps_base_weights(tmp_path, capsys, dora, optimizer):
    """Muon: the 2-D adapter matrices go to Muon, DoRA's magnitudes (1-D) to AdamW."""
    # 16 steps: 8 fell by only 0.09 for DoRA + AdamW once the corpus lost its held-out split (data/heldout)
    trainer = Trainer(
        lora_cfg(tmp_path, "--training.steps=16", f"--lora.dora={str(dora).lower()}", f"--optimizer.name={optimizer}")
    )
    assert "DoRA" in capsys.readouterr().out if dora else "trainable" in capsys.readouterr().out
    before = _base_params(trainer)
    opt_params = {id(p) for o in trainer.optimizers for g in o.param_groups for p in g["params"]}
    trainable = {id(p) for p in trainer.model_parts[0].parameters() if p.requires_grad}
    assert opt_params == trainable and len(trainable) == 4 * 4 * (3 if dora else 2)  # 4 layers x 4 attention linears
    trainer.train()
    losses = lora_losses(tmp_path)
    assert (losses[15] + losses[16]) / 2 < (losses[1] + losses[2]) / 2 - 0.2, losses
    after = _base_params(trainer)
    for n, p in before.items():
        assert torch.equal(after[n], p), f"{n} changed"
    b = trainer.model_parts[0].layers["1"].attn.o_proj.lora_b.weight
    assert b.abs().sum() > 0


def test_trainer_lora_resume_and_hf_export(tmp_path):
    """DoRA run with checkpoints: resuming from step 2 gives the straight run's losses bit-exactly, and
    the merged HF export loads in transformers with the adapted model's logits."""
    import transformers

    a, b = tmp_path / "a", tmp_path / "b"
    ckpt = [
        "--training.steps=4",
        "--lora.dora=true",
        "--checkpoint.enable=true",
        "--checkpoint.interval=2",
        "--checkpoint.keep_latest_k=0",
        "--checkpoint.export_hf=end",
    ]
    straight = Trainer(lora_cfg(a, *ckpt))
    straight.train()
    os.makedirs(b / "checkpoint")
    shutil.copytree(a / "checkpoint" / "step-2", b / "checkpoint" / "step-2")
    resumed = Trainer(lora_cfg(b, *ckpt))
    assert resumed.step == 2
    resumed.train()
    la, lb = lora_losses(a), lora_losses(b)
    assert sorted(lb) == [3, 4] and [lb[3], lb[4]] == [la[3], la[4]]
    meta = json.loads((a / "checkpoint" / "step-4" / "meta.json").read_text())
    assert meta["lora"]["dora"] and meta["lora"]["rank"] == 4 and "lora" not in meta["parallelism"]
    ma, mb = straight.model_parts[0].state_dict(), resumed.model_parts[0].state_dict()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k

    hf_dir = a / "hf" / "step-4"
    # the CLI merges the adapters of a trainer checkpoint exactly like the trainer's own export
    from moonlight.convert import dcp_to_hf
    from tests.helpers import read_safetensors_dir

    dcp_to_hf(str(a / "checkpoint"), str(tmp_path / "cli"), dtype=torch.float32)
    exported, cli = read_safetensors_dir(hf_dir), read_safetensors_dir(tmp_path / "cli")
    assert set(cli) == set(exported) and all(torch.equal(cli[k], exported[k]) for k in exported)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model = straight.model_parts[0].eval()
    tokens = lora_tokens(LORA_ARGS, shape=(2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=1e-4, rtol=1e-3)


def test_trainer_lora_starts_from_an_hf_checkpoint(tmp_path):
    """initial_load_hf fills the base weights of a DoRA run (the adapters are not in the HF file) and
    the magnitudes start at the loaded weights' row norms, so the run starts at the HF model."""
    src = lora_test_model(seed=7)
    hf_dir = tmp_path / "hf"
    export_hf([src], hf_dir)
    trainer = Trainer(
        lora_cfg(tmp_path / "run", "--training.steps=1", "--lora.dora=true", f"--checkpoint.initial_load_hf={hf_dir}")
    )
    model = trainer.model_parts[0].eval()
    src_sd = src.state_dict()
    for k, v in model.state_dict().items():
        if not is_adapter_name(k):
            assert torch.equal(v, src_sd[k]), k
    lin = model.layers["2"].attn.kv_b_proj
    torch.testing.assert_close(lin.magnitude, src.layers["2"].attn.kv_b_proj.weight.norm(dim=1))
    x = lora_tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("base_format", ["hf", "dcp"])
def test_lora_checkpoints_leave_the_frozen_base_out_and_resume_exactly(tmp_path, capsys, base_format):
    """A LoRA run from initial_load_hf saves adapters, buffers and optimizer state only (frozen_weights
    "auto"); resuming re-reads the base and gives the straight run's losses and weights bit-exactly,
    and dcp-to-hf merges the adapters onto the base like the trainer's own export."""
    from moonlight.checkpoint import format as fmt
    from moonlight.convert import dcp_to_hf, hf_to_dcp
    from tests.helpers import read_safetensors_dir

    base = tmp_path / "base"
    export_hf([lora_test_model(seed=7)], tmp_path / "hf")
    if base_format == "dcp":
        hf_to_dcp(str(tmp_path / "hf"), str(base))
    else:
        shutil.copytree(tmp_path / "hf", base)
    a, b = tmp_path / "a", tmp_path / "b"
    run = [
        "--training.steps=4",
        "--lora.dora=true",
        "--checkpoint.enable=true",
        "--checkpoint.interval=2",
        "--checkpoint.keep_latest_k=0",
        "--checkpoint.export_hf=end",
        f"--checkpoint.initial_load_hf={base}",
    ]
    straight = Trainer(lora_cfg(a, *run))
    straight.train()
    step2 = a / "checkpoint" / "step-2"
    stored = {k.removeprefix("model.") for k in fmt.stored_tensors(str(step2)) if k.startswith("model.")}
    trainable = {n for n, p in straight.model_parts[0].named_parameters() if p.requires_grad}
    buffers = {n for n, _ in straight.model_parts[0].named_buffers() if n.endswith("expert_bias")}
    assert stored == trainable | buffers  # no frozen weight is written
    assert json.loads((step2 / "meta.json").read_text())["frozen_weights_from"] == str(base)

    os.makedirs(b / "checkpoint")
    shutil.copytree(step2, b / "checkpoint" / "step-2")
    resumed = Trainer(lora_cfg(b, *run))
    assert resumed.step == 2
    resumed.train()
    la, lb = lora_losses(a), lora_losses(b)
    assert [lb[3], lb[4]] == [la[3], la[4]]
    ma, mb = straight.model_parts[0].state_dict(), resumed.model_parts[0].state_dict()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k

    dcp_to_hf(str(a / "checkpoint"), str(tmp_path / "cli"), dtype=torch.float32)
    exported, cli = read_safetensors_dir(a / "hf" / "step-4"), read_safetensors_dir(tmp_path / "cli")
    assert set(cli) == set(exported) and all(torch.equal(cli[k], exported[k]) for k in exported)

    # resuming such a checkpoint without its base is one clear error; "save" keeps the old behaviour
    with pytest.raises(CheckpointError, match="holds only the trained weights.*set checkpoint.initial_load_hf"):
        Trainer(lora_cfg(b, *run[:-1]))
    saved = Trainer(lora_cfg(tmp_path / "c", *run, "--training.steps=2", "--checkpoint.frozen_weights=save"))
    saved.train()
    stored = {k.removeprefix("model.") for k in fmt.stored_tensors(str(tmp_path / "c" / "checkpoint" / "step-2"))}
    assert "layers.0.attn.q_proj.weight" in stored


def test_resuming_with_other_lora_settings_is_refused(tmp_path):
    """Another rank does not fit the saved adapters (it was a DCP traceback); another alpha, DoRA or target
    list would resume them silently changed or dropped. Dropout only affects training: it may change."""
    run = ["--training.steps=2", "--checkpoint.enable=true", "--checkpoint.interval=2"]
    Trainer(lora_cfg(tmp_path, *run)).train()
    for change, saved in [
        ("--lora.rank=2", "lora.rank = 4"),
        ("--lora.alpha=4", "lora.alpha = 16.0"),
        ("--lora.dora=true", "lora.dora = False"),
        ("--lora.targets=attn.o_proj", "lora.targets"),
    ]:
        with pytest.raises(CheckpointError, match=f"step-2 was saved with {re.escape(saved)} .*this run"):
            Trainer(lora_cfg(tmp_path, *run, "--training.steps=4", change))
    assert Trainer(lora_cfg(tmp_path, *run, "--training.steps=4", "--lora.dropout=0.1")).step == 2


def test_a_checkpoint_with_the_old_layout_meta_key_still_loads(tmp_path):
    """meta.json kept the [lora] settings in "layout" before it had "parallelism" and "lora": such a
    checkpoint still gives its adapters' settings, is still refused under other ones, and resumes."""
    from moonlight.checkpoint import format as fmt
    from moonlight.checkpoint.export import load_dcp_adapters

    run = ["--training.steps=2", "--checkpoint.enable=true", "--checkpoint.interval=2"]
    Trainer(lora_cfg(tmp_path, *run)).train()
    step2 = tmp_path / "checkpoint" / "step-2"
    meta = json.loads((step2 / fmt.META).read_text())
    lora = meta.pop("lora")
    meta["layout"] = {**meta.pop("parallelism"), "lora": lora}
    (step2 / fmt.META).write_text(json.dumps(meta))
    marker = json.loads((step2 / fmt.MARKER).read_text())
    marker["files"][fmt.META] = fmt.file_record(str(step2 / fmt.META))
    (step2 / fmt.MARKER).write_text(json.dumps(marker))

    assert lora["rank"] == 4 and load_dcp_adapters(str(step2))[2] == lora
    with pytest.raises(CheckpointError, match=r"step-2 was saved with lora\.rank = 4 .*this run"):
        Trainer(lora_cfg(tmp_path, *run, "--training.steps=4", "--lora.rank=2"))
    with pytest.raises(CheckpointError, match="is a LoRA/DoRA run's: resume it with lora.enable = true"):
        Trainer(lora_cfg(tmp_path, *run, "--training.steps=4", "--lora.enable=false"))
    assert Trainer(lora_cfg(tmp_path, *run, "--training.steps=4")).step == 2


def test_dcp_to_hf_never_overwrites_the_base_a_lora_checkpoint_reads(tmp_path, capsys):
    """The base directory holds only what an HF export writes, so --overwrite alone did not stop dcp-to-hf
    from replacing the frozen weights it was reading (and every later resume of the run with them)."""
    from moonlight.convert import main

    base = tmp_path / "base"
    export_hf([lora_test_model(seed=7)], base)
    before = {f.name: f.read_bytes() for f in base.iterdir()}
    Trainer(
        lora_cfg(
            tmp_path / "run",
            "--training.steps=2",
            "--checkpoint.enable=true",
            "--checkpoint.interval=2",
            f"--checkpoint.initial_load_hf={base}",
        )
    ).train()
    with pytest.raises(SystemExit) as e:
        main(["dcp-to-hf", "--dcp", str(tmp_path / "run" / "checkpoint"), "--out", str(base), "--overwrite"])
    assert e.value.code == 2 and f"overlaps the input {base}" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in base.iterdir()} == before


@pytest.mark.parametrize("frozen_weights", ["auto", "save"])
def test_a_lora_checkpoint_as_initial_load_hf_is_refused(tmp_path, frozen_weights):
    """Without its base weights ("auto") the load re-read its own base from initial_load_hf (a KeyError with
    LoRA, endless recursion without); with them ("save") the trained adapters were silently dropped."""
    base = tmp_path / "base"
    export_hf([lora_test_model(seed=7)], base)
    Trainer(
        lora_cfg(
            tmp_path / "run",
            "--training.steps=2",
            "--checkpoint.enable=true",
            "--checkpoint.interval=2",
            f"--checkpoint.initial_load_hf={base}",
            f"--checkpoint.frozen_weights={frozen_weights}",
        )
    ).train()
    step2 = tmp_path / "run" / "checkpoint" / "step-2"
    for lora in ("true", "false"):
        with pytest.raises(CheckpointError, match="is a LoRA/DoRA run's checkpoint, not a base model"):
            Trainer(
                lora_cfg(
                    tmp_path / f"new-{lora}",
                    "--training.steps=2",
                    f"--lora.enable={lora}",
                    f"--checkpoint.initial_load_hf={step2}",
                )
            )


def test_a_model_only_checkpoint_as_step_0_of_a_lora_run_names_initial_load_hf(tmp_path):
    """hf-to-dcp's output placed as step-0 resumes a full run, but holds no adapters for a LoRA one."""
    from moonlight.convert import hf_to_dcp

    export_hf([lora_test_model(seed=7)], tmp_path / "hf")
    hf_to_dcp(str(tmp_path / "hf"), str(tmp_path / "run" / "checkpoint" / "step-0"))
    with pytest.raises(
        CheckpointError, match="holds no LoRA/DoRA adapters: start a LoRA run from it with checkpoint.initial_load_hf"
    ):
        Trainer(lora_cfg(tmp_path / "run", "--training.steps=2", "--checkpoint.enable=true"))


def test_frozen_weights_reload_needs_a_lora_run_from_a_base(tmp_path):
    with pytest.raises(ConfigError, match="frozen_weights = 'reload' re-reads the frozen base weights"):
        lora_cfg(tmp_path, "--checkpoint.frozen_weights=reload").validate()


# ------------------------------------------------------------------------------------ config


def test_lora_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match=r"lora.rank must be >= 1 \(got 0\)"):
        lora_cfg(tmp_path, "--lora.rank=0").validate()
    with pytest.raises(ConfigError, match=r"lora.alpha must be > 0"):
        lora_cfg(tmp_path, "--lora.alpha=0").validate()
    with pytest.raises(ConfigError, match=r"lora.dropout must be in \[0, 1\)"):
        lora_cfg(tmp_path, "--lora.dropout=1.0").validate()
    with pytest.raises(ConfigError, match=r"set parallelism.tp = 1"):
        lora_cfg(tmp_path, "--parallelism.tp=2").validate()
    with pytest.raises(ConfigError, match=r"set parallelism.pp = 1"):
        lora_cfg(tmp_path, "--parallelism.pp=2").validate()
    with pytest.raises(ConfigError, match=r"unknown config key 'lora.rnak'.*did you mean 'lora.rank'"):
        lora_cfg(tmp_path, "--lora.rnak=4")
    with pytest.raises(ConfigError, match=r"LoRA target 'attn.qkv' matches no module"):
        Trainer(lora_cfg(tmp_path, "--training.steps=1", "--lora.targets=attn.q_proj,attn.qkv"))
    # disabled: the section is ignored; the TOML round trip keeps its keys
    cfg = lora_cfg(tmp_path, "--lora.enable=false", "--lora.rank=0", "--lora.targets=attn.o_proj").validate()
    text = cfg.to_toml()
    assert "[lora]" in text and 'targets = ["attn.o_proj"]' in text
