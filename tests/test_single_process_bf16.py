"""One process honours training.mixed_precision_param like FSDP does: bf16 compute inside the
forward, fp32 stored parameters and gradients, the same parameter names; TF32 only on GPUs."""

import torch
from torch import nn

from moonlight.distributed import local_tensor
from moonlight.train.config import load_config
from moonlight.train.build import use_tf32
from moonlight.train.trainer import Trainer

SMALL = ["--training.seq_len=32", "--training.global_batch_size=2", "--training.local_batch_size=2",
         "--checkpoint.enable=false", "--metrics.log_freq=1", "--metrics.device_peak_flops=1e11",
         "--lr_scheduler.warmup_steps=1"]


def _trainer(tmp_path, *extra):
    return Trainer(load_config("train.toml", SMALL + [f"--job.dump_folder={tmp_path}", *extra]))


def test_single_process_bf16_compute_fp32_params(tmp_path):
    fp32 = _trainer(tmp_path / "fp32", "--training.steps=1")
    trainer = _trainer(tmp_path / "bf16", "--training.steps=2", "--training.mixed_precision_param=bfloat16")
    model = trainer.model_parts[0]
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in fp32.model_parts[0].named_parameters()]
    assert list(model.state_dict()) == list(fp32.model_parts[0].state_dict())
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((mod.weight.dtype, args[0].dtype, out.dtype)))
             for m in model.modules() if type(m) is nn.Linear]
    trainer.train_step()
    for h in hooks:
        h.remove()
    assert seen and all(d == (torch.bfloat16,) * 3 for d in seen), set(seen)
    for name, p in model.named_parameters():
        assert local_tensor(p).dtype == torch.float32, name
        assert p.grad is None or local_tensor(p.grad).dtype == torch.float32, name
    trainer.train()  # trains on
    assert trainer.step == 2


def test_tf32_only_on_gpus(monkeypatch):
    before = torch.backends.cuda.matmul.fp32_precision
    use_tf32(torch.device("cpu"))
    assert torch.backends.cuda.matmul.fp32_precision == before
    try:
        use_tf32(torch.device("cuda", 0))
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
