"""HF checkpoints that mention multi-token prediction: transformers' default config
(num_nextn_predict_layers=1, no MTP weights) and DeepSeek-V3-style checkpoints with MTP tensors."""

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from moonlight.errors import CheckpointError
from moonlight.hf import load_hf
from tests.hf_reference import make_hf_model


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    hf = make_hf_model("moonlight", seed=0, dtype=torch.float32, num_nextn_predict_layers=1)
    path = tmp_path_factory.mktemp("mtp") / "hf"
    hf.save_pretrained(path)
    return hf, path


def _logits(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return out if isinstance(out, torch.Tensor) else out.logits


def test_transformers_default_config_loads_with_equal_logits(hf_model_dir):
    hf, path = hf_model_dir
    with open(path / "config.json") as f:
        assert json.load(f)["num_nextn_predict_layers"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no MTP tensors: nothing to warn about
        ours = load_hf(path, kernels="torch")
    tokens = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(ours, tokens), _logits(hf, tokens), atol=1e-4, rtol=1e-3)
    assert ours.args.to_hf_config()["num_nextn_predict_layers"] == 0


def _with_mtp_tensors(src, dst, n_mtp):
    """A copy of src with DeepSeek-V3-style MTP tensors as layer num_hidden_layers (3)."""
    tensors = load_file(os.path.join(src, "model.safetensors"))
    extra = {
        k.replace("model.layers.2.", "model.layers.3."): v.clone()
        for k, v in tensors.items()
        if k.startswith("model.layers.2.")
    }
    extra["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    extra["model.layers.3.enorm.weight"] = torch.ones(64)
    os.makedirs(dst)
    save_file({**tensors, **extra}, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump({**cfg, "num_nextn_predict_layers": n_mtp}, f)
    return dst


def test_mtp_tensors_are_skipped_with_one_warning(hf_model_dir, tmp_path):
    hf, path = hf_model_dir
    with pytest.warns(UserWarning) as caught:
        ours = load_hf(_with_mtp_tensors(path, tmp_path / "mtp", 1), kernels="torch")
    mtp_warnings = [w for w in caught if "multi-token-prediction" in str(w.message)]
    assert len(mtp_warnings) == 1 and "layers.3." in str(mtp_warnings[0].message)
    tokens = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(ours, tokens), _logits(hf, tokens), atol=1e-4, rtol=1e-3)


def test_extra_layers_without_mtp_in_the_config_are_still_an_error(hf_model_dir, tmp_path):
    _, path = hf_model_dir
    with pytest.raises(CheckpointError, match="unexpected key"):
        load_hf(_with_mtp_tensors(path, tmp_path / "extra", 0))
