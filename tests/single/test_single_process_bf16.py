"""One process honours training.mixed_precision_param like FSDP does: bf16 compute inside the
forward, fp32 stored parameters and gradients, the same parameter names; TF32 only on GPUs."""

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moonlight.distributed import local_tensor
from moonlight.train.config import load_config
from moonlight.train.build import use_tf32
from moonlight.train.trainer import Trainer
from tests.helpers import short_job

SMALL = short_job({"training.global_batch_size": 2})


def _trainer(tmp_path, *extra):
    return Trainer(load_config("train.toml", SMALL + [f"--job.dump_folder={tmp_path}", *extra]))


def test_single_process_bf16_compute_fp32_params(tmp_path):
    fp32 = _trainer(tmp_path / "fp32", "--training.steps=1")
    trainer = _trainer(tmp_path / "bf16", "--training.steps=2", "--training.mixed_precision_param=bfloat16")
    model = trainer.model_parts[0]
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in fp32.model_parts[0].named_parameters()]
    assert list(model.state_dict()) == list(fp32.model_parts[0].state_dict())
    seen = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: seen.append((mod.weight.dtype, args[0].dtype, out.dtype)))
        for m in model.modules()
        if type(m) is nn.Linear
    ]
    trainer.train_step()
    for h in hooks:
        h.remove()
    assert seen and all(d == (torch.bfloat16,) * 3 for d in seen), set(seen)
    for name, p in model.named_parameters():
        assert local_tensor(p).dtype == torch.float32, name
        assert p.grad is None or local_tensor(p.grad).dtype == torch.float32, name
    trainer.train()  # trains on
    assert trainer.step == 2


class _CopyBytes(TorchDispatchMode):
    """Bytes written by copy and cast ops (FSDP2's gathers cast the fp32 weights to bf16 with them)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.copy_, torch.ops.aten._to_copy):
            self.bytes += out.nbytes
        return out


def test_one_process_gathers_its_bf16_weights_once_a_step(tmp_path):
    """Four micro-batches: gathering (and casting) the weights once a step instead of twice per micro-batch
    halves the bytes copied, and the step's weights are the same bit for bit."""
    runs = []
    for once in (False, True):
        trainer = _trainer(
            tmp_path / str(once),
            "--training.steps=1",
            "--training.mixed_precision_param=bfloat16",
            "--training.local_batch_size=1",
            "--training.global_batch_size=4",
            "--training.seq_len=8",
        )
        assert trainer.grad_accum == 4 and trainer.gather_once  # on by default in one process
        trainer.gather_once = once
        counted = _CopyBytes()
        with counted:
            trainer.train_step()
        runs.append((counted.bytes, [local_tensor(p).detach().clone() for p in trainer.model_parts[0].parameters()]))
    (every_micro_batch, before), (once_a_step, after) = runs
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert once_a_step < 0.6 * every_micro_batch, (once_a_step, every_micro_batch)


def test_tf32_only_on_gpus(monkeypatch):
    before = torch.backends.cuda.matmul.fp32_precision
    use_tf32(torch.device("cpu"))
    assert torch.backends.cuda.matmul.fp32_precision == before
    try:
        use_tf32(torch.device("cuda", 0))
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
