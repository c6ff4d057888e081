"""PEFT adapters both ways: what we write, `peft.PeftModel.from_pretrained` loads onto transformers'
DeepseekV3ForCausalLM with our LoRA/DoRA model's logits; what PEFT saves, we load with PEFT's logits.
The trainer's adapter export, `convert dcp-to-peft`, `[lora] init_adapter`, the router bias that
LoRA runs freeze unless moe.bias_update_rate is set, and one-line errors."""

import dataclasses
import json

import pytest
import torch

from moonlight import Moonlight
from moonlight.convert import main
from moonlight.errors import CheckpointError, ConfigError
from moonlight.hf import save_hf
from moonlight.hf_peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_peft_adapter, save_peft_adapter
from moonlight.model.lora import hide_adapters
from moonlight.train.trainer import Trainer
from tests.helpers import lora_cfg, randomize_adapters, lora_tokens
from tests.helpers import lora_model
from tests.helpers import HF_PEFT_ARGS, read_all_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
Q_LORA = dataclasses.replace(HF_PEFT_ARGS, q_lora_rank=24)


def _hf_base(model, path):
    with hide_adapters(model):
        save_hf(model, path)
    return transformers.DeepseekV3ForCausalLM.from_pretrained(
        path, dtype=torch.float64, attn_implementation="eager", experts_implementation="eager"
    ).eval()


@pytest.mark.parametrize(
    "args, dora", [(HF_PEFT_ARGS, False), (HF_PEFT_ARGS, True), (Q_LORA, True)], ids=["lora", "dora", "dora_q_lora"]
)
def test_peft_loads_our_adapter_with_our_logits(tmp_path, args, dora):
    model = lora_model(args, dora)
    randomize_adapters(model)
    out = save_peft_adapter(model, args, {"rank": 4, "alpha": 8.0, "dora": dora, "dropout": 0.0}, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    names = ["q_a_proj", "q_b_proj"] if args.q_lora_rank else ["q_proj"]
    assert sorted(cfg["target_modules"]) == sorted(names + ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj"])
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["use_dora"] == dora
    keys = set(read_all_adapter(out))
    assert "base_model.model.model.layers.1.self_attn.kv_a_proj_with_mqa.lora_A.weight" in keys
    assert ("base_model.model.model.layers.1.self_attn.o_proj.lora_magnitude_vector" in keys) == dora
    hf = peft.PeftModel.from_pretrained(_hf_base(model, tmp_path / "hf"), out).eval()
    tokens = lora_tokens(args, shape=(2, 12))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
        plain = hf.get_base_model()  # the adapters change the logits: the comparison is not vacuous
        with hf.disable_adapter():
            base = plain(tokens).logits
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=1e-5)  # fp64; the router scores in fp32


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_we_load_a_peft_saved_adapter_with_peft_logits(tmp_path, dora):
    model = lora_model(HF_PEFT_ARGS, dora)
    hf = _hf_base(model, tmp_path / "hf")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, use_dora=dora, target_modules=["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    )
    peft_model = peft.get_peft_model(hf, config).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g, dtype=p.dtype))
            elif "lora_" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    peft_model.save_pretrained(tmp_path / "ad")
    load_peft_adapter(model, tmp_path / "ad")
    tokens = lora_tokens(HF_PEFT_ARGS, shape=(2, 12))
    with torch.no_grad():
        # fp64; the router scores in fp32
        torch.testing.assert_close(model(tokens), peft_model(tokens).logits, atol=1e-6, rtol=1e-5)
    # a mismatching [lora] is named, not loaded
    other = lora_model(HF_PEFT_ARGS, not dora)
    with pytest.raises(CheckpointError, match="use_dora"):
        load_peft_adapter(other, tmp_path / "ad")


def _bias(trainer):
    return {n: p.detach().clone() for n, p in trainer.model_parts[0].named_buffers() if n.endswith("expert_bias")}


def test_trainer_adapter_export_cli_and_init_adapter(tmp_path, capsys):
    """A DoRA run exports its adapter at the end; dcp-to-peft writes the same files from its checkpoint;
    a run started from that adapter (same base weights) has the exporting run's logits. The router's
    expert bias stays frozen with LoRA."""
    a = tmp_path / "a"
    run = [
        "--training.steps=2",
        "--lora.dora=true",
        "--checkpoint.enable=true",
        "--checkpoint.interval=2",
        "--lora.export_adapter=end",
    ]
    first = Trainer(lora_cfg(a, *run))
    bias_before = _bias(first)
    assert bias_before, "the debug model has routers"
    first.train()
    for n, b in _bias(first).items():
        assert torch.equal(b, bias_before[n]), f"{n} moved in a LoRA run"
    exported = a / "adapter" / "step-2"
    assert (exported / ADAPTER_CONFIG).is_file()

    main(["dcp-to-peft", "--dcp", str(a / "checkpoint"), "--out", str(tmp_path / "cli")])
    ours, cli = read_all_adapter(exported), read_all_adapter(tmp_path / "cli")
    assert set(ours) == set(cli) and all(torch.equal(ours[k], cli[k]) for k in ours)
    cli_config = json.loads((tmp_path / "cli" / ADAPTER_CONFIG).read_text())
    assert json.loads((exported / ADAPTER_CONFIG).read_text()) == cli_config

    second = Trainer(
        lora_cfg(tmp_path / "b", "--training.steps=2", "--lora.dora=true", f"--lora.init_adapter={exported}")
    )
    assert "initialized the adapters" in capsys.readouterr().out
    x = lora_tokens()
    with torch.no_grad():
        trained = first.model_parts[0].eval()(x)
        torch.testing.assert_close(second.model_parts[0].eval()(x), trained, atol=0, rtol=0)
        assert not torch.equal(
            Trainer(lora_cfg(tmp_path / "c", "--training.steps=2", "--lora.dora=true")).model_parts[0].eval()(x),
            trained,
        )


def test_lora_run_moves_the_router_bias_only_when_set(tmp_path):
    trainer = Trainer(lora_cfg(tmp_path, "--training.steps=2", "--moe.bias_update_rate=0.01"))
    before = _bias(trainer)
    trainer.train()
    assert any(not torch.equal(b, before[n]) for n, b in _bias(trainer).items())


def test_dcp_to_peft_errors_are_one_line(tmp_path, capsys):
    def error(*argv):
        with pytest.raises(SystemExit) as e:
            main(["dcp-to-peft", *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
        return err

    assert "does not exist" in error("--dcp", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    plain = tmp_path / "plain"
    Trainer(lora_cfg(plain, "--training.steps=1", "--lora.enable=false", "--checkpoint.enable=true")).train()
    assert "[lora] settings" in error("--dcp", str(plain / "checkpoint"), "--out", str(tmp_path / "o"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert "--overwrite" in error("--dcp", str(plain / "checkpoint"), "--out", str(tmp_path / "full"))
    assert "step 7 not found" in error("--dcp", str(plain / "checkpoint"), "--step", "7", "--out", str(tmp_path / "o"))
    lora = tmp_path / "lora"
    Trainer(lora_cfg(lora, "--training.steps=1", "--checkpoint.enable=true")).train()
    shard = next((lora / "checkpoint" / "step-1").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # was a DCP traceback
    assert f"is damaged: {shard}: 100 bytes" in error("--dcp", str(lora / "checkpoint"), "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        ("config_json", "adapter_config.json is not valid JSON"),
        ("config_list", "adapter_config.json is not a PEFT LoRA config"),
        ("weights", "adapter_model.safetensors is not a readable safetensors file"),
    ],
)
def test_damaged_adapter_files_are_one_error(tmp_path, damage, message):
    """A cut-off or foreign adapter file was a JSONDecodeError / AttributeError / SafetensorError traceback."""
    from moonlight.hf_peft import apply_peft_adapter

    model = lora_model(HF_PEFT_ARGS, dora=False)
    ad = tmp_path / "ad"
    save_peft_adapter(model, HF_PEFT_ARGS, {"rank": 4, "alpha": 8.0, "dora": False, "dropout": 0.0}, ad)
    config, weights = ad / ADAPTER_CONFIG, ad / ADAPTER_WEIGHTS
    if damage == "weights":
        weights.write_bytes(weights.read_bytes()[:50])
    else:
        config.write_text(config.read_text()[:20] if damage == "config_json" else "[]")
    with pytest.raises(CheckpointError, match=message):  # [lora] init_adapter
        load_peft_adapter(model, ad)
    with pytest.raises(CheckpointError, match=message):  # generate --adapter
        apply_peft_adapter(Moonlight(HF_PEFT_ARGS), ad)


def test_adapter_settings_need_lora(tmp_path):
    with pytest.raises(ConfigError, match="need lora.enable = true"):
        lora_cfg(tmp_path, "--lora.enable=false", "--lora.export_adapter=end").validate()
    with pytest.raises(CheckpointError, match="is not a PEFT adapter directory"):
        Trainer(lora_cfg(tmp_path, "--training.steps=1", f"--lora.init_adapter={tmp_path}"))
