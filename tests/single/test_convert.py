"""HF <-> native conversion: bit-exact round trips, transformers loads our export, clear errors."""

import json
import os

import pytest
import torch
import transformers
from safetensors.torch import save_file

from moonlight import ModelArgs, convert
from moonlight.config import ConfigError
from moonlight.errors import CheckpointError
from moonlight.hf import load_hf, save_hf
from moonlight.model import Moonlight
from moonlight.parallel.load import load_hf_sharded
from tests.hf_reference import make_hf_model
from tests.helpers import read_safetensors_dir


@pytest.fixture
def hf_dir(tmp_path):
    path = tmp_path / "hf"
    make_hf_model("moonlight", seed=0, dtype=torch.float32).save_pretrained(path)
    return path


def test_save_load_round_trip_is_bit_exact_and_sharded(hf_dir, tmp_path):
    model = load_hf(hf_dir, kernels="torch")
    assert model.state_dict()["layers.1.ffn.experts.gate_proj"].shape == (8, 32, 64)  # one HF key per expert, stacked
    out = tmp_path / "export"
    save_hf(model, out, max_shard_size="200KB")
    shards = [n for n in os.listdir(out) if n.endswith(".safetensors")]
    assert len(shards) > 1 and os.path.exists(out / "model.safetensors.index.json")
    original, exported = read_safetensors_dir(hf_dir), read_safetensors_dir(out)
    assert set(exported) == set(original)
    for k, v in original.items():
        assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), k
    with open(out / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(original)


def test_transformers_loads_export_with_same_logits(hf_dir, tmp_path):
    ours = load_hf(hf_dir, kernels="torch").eval()
    save_hf(ours, tmp_path / "export", max_shard_size="300KB")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    tokens = torch.randint(0, ours.args.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-3)


def test_bf16_export_keeps_router_bias_fp32(hf_dir, tmp_path):
    save_hf(load_hf(hf_dir, kernels="torch"), tmp_path / "bf16", dtype=torch.bfloat16)
    tensors = read_safetensors_dir(tmp_path / "bf16")
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert tensors["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == torch.bfloat16
    with open(tmp_path / "bf16" / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"


def test_hf_config_round_trip():
    for name in ("moonlight-16b-a3b", "debug"):
        args = ModelArgs.preset(name)
        assert ModelArgs.from_hf_config(args.to_hf_config(), kernels=args.kernels) == args
    args = ModelArgs.preset("debug", q_lora_rank=16, n_group=2, topk_group=1)
    assert ModelArgs.from_hf_config(args.to_hf_config()) == args


def test_released_moonlight_config_parses():
    released = {  # Moonlight-16B-A3B config.json (fields as published)
        "architectures": ["DeepseekV3ForCausalLM"],
        "auto_map": {},
        "aux_loss_alpha": 0.001,
        "bos_token_id": 163584,
        "eos_token_id": 163585,
        "ep_size": 1,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 11264,
        "kv_lora_rank": 512,
        "max_position_embeddings": 8192,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": 1408,
        "moe_layer_freq": 1,
        "n_group": 1,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "norm_topk_prob": True,
        "num_attention_heads": 16,
        "num_experts_per_tok": 6,
        "num_hidden_layers": 27,
        "num_key_value_heads": 16,
        "num_nextn_predict_layers": 0,
        "pretraining_tp": 1,
        "q_lora_rank": None,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 50000.0,
        "routed_scaling_factor": 2.446,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.48.0",
        "use_cache": True,
        "v_head_dim": 128,
        "vocab_size": 163840,
        "attention_bias": False,
        "attention_dropout": 0.0,
    }
    assert ModelArgs.from_hf_config(released) == ModelArgs.preset("moonlight-16b-a3b")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"some_new_field": 3}, "some_new_field"),
        ({"n_group": 3}, "n_group"),
        ({"model_type": "llama"}, "model_type"),
    ],
)
def test_unsupported_config_fields_are_rejected(change, match):
    cfg = {**ModelArgs.preset("debug").to_hf_config(), **change}
    with pytest.raises(ConfigError, match=match):
        ModelArgs.from_hf_config(cfg)


def _rewrite(src, dst, edit):
    tensors = read_safetensors_dir(src)
    edit(tensors)
    os.makedirs(dst)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())
    return dst


def test_wrong_shape_names_key_and_shapes(hf_dir, tmp_path):
    key = "model.layers.1.mlp.experts.2.down_proj.weight"

    def edit(t):
        t[key] = torch.zeros(64, 31)

    bad = _rewrite(hf_dir, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=r"experts\.2\.down_proj.*expected \(64, 32\), found \(64, 31\)"):
        load_hf(bad)


def test_sharded_load_names_a_wrong_expert_shape(hf_dir, tmp_path):
    key = "model.layers.1.mlp.experts.0.down_proj.weight"  # the expert stack's first key is the one checked
    bad = _rewrite(hf_dir, tmp_path / "bad", lambda t: t.__setitem__(key, torch.zeros(64, 31)))
    model = Moonlight(ModelArgs.from_hf_config(hf_dir, kernels="torch"))
    with pytest.raises(CheckpointError, match=r"experts\.0\.down_proj.*expected \(64, 32\), found \(64, 31\)"):
        load_hf_sharded(model, bad)


def test_missing_key_is_named(hf_dir, tmp_path):
    bad = _rewrite(hf_dir, tmp_path / "bad", lambda t: t.pop("model.layers.2.self_attn.kv_b_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*layers\.2\.self_attn\.kv_b_proj"):
        load_hf(bad)


def test_unexpected_key_is_named(hf_dir, tmp_path):
    def edit(t):
        t["model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.zeros(1)

    bad = _rewrite(hf_dir, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=r"unexpected.*layers\.0\.mlp\.experts\.0\.gate_proj"):
        load_hf(bad)


def test_rope_inv_freq_buffers_in_released_checkpoints_are_accepted(hf_dir, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)

    ok = _rewrite(hf_dir, tmp_path / "with_inv_freq", edit)
    load_hf(ok)


def test_pickle_checkpoints_are_refused(tmp_path):
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_hf(tmp_path)


def test_save_refuses_to_overwrite(hf_dir, tmp_path):
    model = load_hf(hf_dir)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        save_hf(model, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").exists()


def _hf_args(hf_model):
    return ModelArgs.from_hf_config(
        {**hf_model.config.to_diff_dict(), "architectures": ["DeepseekV3ForCausalLM"]}, kernels="torch"
    )


def _assert_bitwise_equal(got, expected):
    assert list(got) == list(expected) or sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


@pytest.mark.parametrize("variant", ["moonlight", "q_lora", "one_shared_odd_dims"])
def test_transformers_state_dict_round_trips_in_memory_bit_for_bit(variant):
    """transformers' DeepseekV3ForCausalLM.state_dict() (fused experts) -> a native model -> back."""
    hf = make_hf_model(variant, seed=0, dtype=torch.float32)
    expected, args = hf.state_dict(), _hf_args(hf)
    model = Moonlight(args)
    model.load_state_dict(convert.from_hf_state_dict(expected, args))
    _assert_bitwise_equal(convert.to_hf_state_dict(model.state_dict(), args), expected)
    hf2 = make_hf_model(variant, seed=1, dtype=torch.float32)
    hf2.load_state_dict(convert.to_hf_state_dict(model.state_dict(), args))  # transformers takes it back
    _assert_bitwise_equal(hf2.state_dict(), expected)


def test_state_dict_conversion_streams_and_reads_the_file_layout(hf_dir):
    """Iterators convert as streams of pairs; the per-expert layout is what save_pretrained writes."""
    files = read_safetensors_dir(hf_dir)
    args = ModelArgs.from_hf_config(hf_dir)
    native = convert.from_hf_state_dict(files, args)
    streamed = convert.from_hf_state_dict(iter(files.items()), args)
    assert not isinstance(streamed, dict)
    _assert_bitwise_equal(dict(streamed), native)
    _assert_bitwise_equal(convert.to_hf_state_dict(native, args, fused_experts=False), files)
    _assert_bitwise_equal(dict(convert.to_hf_state_dict(iter(native.items()), args, fused_experts=False)), files)
    _assert_bitwise_equal(native, load_hf(hf_dir, kernels="torch").state_dict())


def test_state_dict_conversion_names_bad_keys():
    hf = make_hf_model("moonlight", seed=0, dtype=torch.float32)
    sd, args = hf.state_dict(), _hf_args(hf)
    with pytest.raises(CheckpointError, match="no native name is known for Hugging Face key 'extra.weight'"):
        convert.from_hf_state_dict({**sd, "extra.weight": torch.zeros(1)}, args)
    missing = dict(sd)
    del missing["model.layers.1.mlp.experts.down_proj"]
    with pytest.raises(CheckpointError, match="missing 1 key.*layers.1.ffn.experts.down_proj"):
        convert.from_hf_state_dict(missing, args)
