"""Helpers shared by several test modules (no test module imports another)."""

import base64
import contextlib
import io
import json
import os
import pathlib
import random
import shutil
import struct
import subprocess
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from safetensors import safe_open
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from moonlight import ModelArgs, Moonlight
from moonlight.data.tokenizer import DEFAULT_ADDITIONAL_SPECIALS
from moonlight.distributed import local_tensor
from moonlight.hf_peft import ADAPTER_WEIGHTS
from moonlight.model.lora import apply_lora
from moonlight.model.loss import cross_entropy_from_hidden
from moonlight.model.model import MoE
from moonlight.train.config import CheckpointSection, DataSection, load_config
from moonlight.train.optim import Muon, build_optimizers
from moonlight.train.schedule import LRSchedulerSection
from moonlight.train.trainer import Trainer


ROOT = pathlib.Path(__file__).resolve().parents[1]  # the repository

# A short job of train.toml's: short sequences, small batches, metrics every step, no checkpoints, and
# one fixed MFU peak on every device.
SHORT_JOB = {
    "training.seq_len": 32,
    "training.global_batch_size": 4,
    "training.local_batch_size": 2,
    "checkpoint.enable": False,
    "metrics.log_freq": 1,
    "metrics.device_peak_flops": 1e11,
    "lr_scheduler.warmup_steps": 1,
}


def short_job(changes: dict) -> list[str]:
    """`--key=value` overrides of SHORT_JOB updated by `changes`; a key changed to None is left out, so
    the config file's value applies."""
    job = {key: value for key, value in {**SHORT_JOB, **changes}.items() if value is not None}
    return [f"--{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in job.items()]


# from test_moe_sync.py
aten = torch.ops.aten

_SYNC_OPS = {
    aten._local_scalar_dense,
    aten.nonzero,
    aten.bincount,
    aten.masked_select,
    aten.unique_dim,
    aten._unique,
    aten._unique2,
    aten.unique_consecutive,
    aten.equal,
}


def _off_host(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)


class _CountDispatch(TorchDispatchMode):
    def __init__(self, syncs: list, device_only: bool):
        super().__init__()
        self.syncs, self.device_only = syncs, device_only

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            func.overloadpacket in _SYNC_OPS
            or (func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None)
        ) and (not self.device_only or _off_host(args)):
            self.syncs.append(str(func))
        return func(*args, **kwargs)


class _CountToList(TorchFunctionMode):
    def __init__(self, syncs: list, device_only: bool):
        super().__init__()
        self.syncs, self.device_only = syncs, device_only

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist and (not self.device_only or _off_host(args)):
            self.syncs.append("tolist")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def recording_host_syncs(syncs: list, device_only: bool = False):
    """Appends to syncs the ops run inside that would wait for the device on a GPU. device_only: only
    those reading a tensor off the host (the meta device can stand in for a GPU: such a read is
    counted, then fails there), so the host's own bookkeeping is free."""
    with _CountToList(syncs, device_only), _CountDispatch(syncs, device_only):
        yield


def host_syncs(fn, device_only: bool = False) -> list[str]:
    """The ops of fn() that would wait for the device on a GPU (see `recording_host_syncs`)."""
    syncs: list[str] = []
    with recording_host_syncs(syncs, device_only):
        fn()
    return syncs


# from test_convert.py
def read_safetensors_dir(path):
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


# from test_checkpoint.py
ARGS = ModelArgs.preset("debug", kernels="torch")

STEPS = 8


class FakeLoader:
    def __init__(self):
        self.consumed = 0

    def state_dict(self):
        return {"consumed_sequences": self.consumed}

    def load_state_dict(self, s):
        self.consumed = int(s["consumed_sequences"])


def build(optim="adamw", seed=0, args=ARGS):
    torch.manual_seed(seed)
    model = Moonlight(args)
    model.init_weights()
    return (model,) + build_opt(model, optim)


def build_opt(model, optim="adamw"):
    opts = build_optimizers(model.named_parameters(), optim, lr=1e-2, ns_dtype=torch.float32)
    return opts, LRSchedulerSection(warmup_steps=2).build(opts, total_steps=STEPS)


def train(model, opts, scheds, loader, steps, seed=1):
    g = torch.Generator().manual_seed(seed)  # data: differs per data-parallel rank
    gb = torch.Generator().manual_seed(123)  # bias update: from all-reduced loads, the same on every rank
    for _ in range(steps):
        tokens = torch.randint(0, ARGS.vocab_size, (2, 17), generator=g)
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        opts.step()
        opts.zero_grad()
        scheds.step()
        if loader is not None:
            loader.consumed += 4
        with torch.no_grad():  # stand-in for the aux-loss-free bias update
            for moe in model.moe_layers():
                moe.router.expert_bias.add_(torch.randn(moe.router.expert_bias.shape, generator=gb) * 1e-2)


def cfg(**kw):
    return CheckpointSection(enable=True, **{"interval": 1, "keep_latest_k": 0, **kw})


def full_sd(model):
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()
    }


def flat_optim(model, opts):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, opts.optimizers, options=StateDictOptions(flatten_optimizer_state_dict=True))
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in sd.items()}


def assert_sd_equal(a, b):
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def pack_state(obj):
    """Tensors cross the harness queue as bytes (torch's shared-memory pickling needs the sender alive)."""

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def fsdp_wrap(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# from test_resume.py
RESUME_STEPS = 6

BASE = short_job(
    {
        "training.steps": RESUME_STEPS,
        "checkpoint.enable": True,
        "checkpoint.interval": 3,
        "checkpoint.keep_latest_k": 0,
        "lr_scheduler.warmup_steps": 2,
        "model.kernels": "torch",
    }
)


def run_job(folder, *extra):
    Trainer(load_config("train.toml", BASE + [f"--job.dump_folder={folder}", *extra])).train()


def resume_losses(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in rows}


def resume_copy(src, dst, step=3):
    """A new dump folder holding only `src`'s checkpoint at `step` (as if the job died right after it)."""
    os.makedirs(os.path.join(dst, "checkpoint"))
    shutil.copytree(os.path.join(src, "checkpoint", f"step-{step}"), os.path.join(dst, "checkpoint", f"step-{step}"))


# from test_hf_peft.py
def lora_model(args, dora, seed=0):
    torch.manual_seed(seed)
    model = Moonlight(args)
    model.init_weights()
    model = model.to(torch.float64).eval()
    apply_lora(model, rank=4, alpha=8.0, dora=dora)
    return model


# from test_chat.py
def chat_conversations(n, seed=0):
    """Conversations of uneven lengths: a system turn now and then, one or two exchanges."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "prime", "sum", "one", "two", "yes", "no"]
    out = []
    for k in range(n):
        messages = [{"role": "system", "content": "Be brief."}] if k % 3 == 0 else []
        for _ in range(1 + k % 2):
            messages.append({"role": "user", "content": " ".join(rng.choice(words, rng.integers(1, 4)))})
            messages.append({"role": "assistant", "content": " ".join(rng.choice(words, rng.integers(1, 7)))})
        out.append({"messages": messages})
    return out


def write_chat(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# from test_data.py
def make_docs(n=40, seed=0):
    rng = random.Random(seed)
    words = ["the", "model", "routes", "tokens", "to", "experts", "héllo", "中文", "naïve", "Ω", "\n", "  "]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for _ in range(n)]
    docs[3] = ""  # empty documents are dropped by every format
    return docs


def write_jsonl(path, docs, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d, "id": 1}, ensure_ascii=False) + "\n")
    return str(path)


def data_cfg(path, fmt="jsonl", **kw):
    cfg = DataSection(format=fmt, path=str(path))
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def all_sequences(loader, n=None):
    n = loader.sequences_per_epoch if n is None else n
    return np.stack([loader.sequence(g)[0] for g in range(n)])


def make_tiktoken_dir(tmp_path, with_config=False):
    ranks = [bytes([i]) for i in range(256)]
    ranks += [b"th", b"he", b"the", b" the", b"in", b"ing", b"er", b" t", "中文".encode(), b"ex", b"per", b"ts"]
    d = tmp_path / "tik"
    d.mkdir()
    with open(d / "tiktoken.model", "w") as f:
        for r, t in enumerate(ranks):
            f.write(f"{base64.b64encode(t).decode()} {r}\n")
    if with_config:
        n = len(ranks)
        cfg = {
            "bos_token": "<|bos|>",
            "eos_token": {"content": "<|eos|>"},
            "added_tokens_decoder": {
                str(n): {"content": "<|bos|>"},
                str(n + 1): {"content": "<|eos|>"},
                str(n + 2): {"content": "<|im_end|>"},
            },
        }
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d, len(ranks)


def mmididx_bytes(lengths, pointers, doc_idx, dtype_code):
    """A Megatron-LM MMIDIDX .idx file, byte for byte as its MMapIndexedDataset writes it: magic, version 1,
    dtype code (8 = uint16, 4 = int32), sequence count, document-index count, int32 sequence lengths,
    int64 byte pointers into .bin, int64 document indices."""
    return (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)
        + struct.pack("<B", dtype_code)
        + struct.pack("<Q", len(lengths))
        + struct.pack("<Q", len(doc_idx))
        + np.array(lengths, dtype=np.int32).tobytes()
        + np.array(pointers, dtype=np.int64).tobytes()
        + np.array(doc_idx, dtype=np.int64).tobytes()
    )


# from test_lora.py
LORA_ARGS = ModelArgs.preset("debug", kernels="torch")


def lora_tokens(args=LORA_ARGS, seed=0, shape=(2, 16)):
    return torch.randint(0, args.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("lora_a.weight", "lora_b.weight")):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif n.endswith("magnitude"):
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))


LORA_BASE = short_job({"model.kernels": "torch", "optimizer.lr": 1e-2, "lora.enable": True, "lora.rank": 4})


def lora_cfg(folder, *extra):
    return load_config("train.toml", LORA_BASE + [f"--job.dump_folder={folder}", *extra])


# from test_recipes.py
CONFIGS = ROOT / "configs"

WORLD = {
    "moonlight-16b-pretrain.toml": 8,
    "moonlight-16b-pretrain-tp2-ep8.toml": 8,
    "moonlight-16b-pretrain-pp2.toml": 16,
    "moonlight-16b-sft.toml": 8,
    "moonlight-16b-sft-long.toml": 8,
    "moonlight-16b-lora.toml": 8,
    "moonlight-16b-dora.toml": 8,
    "debug-chat-sft.toml": 2,
}


# from test_train.py
SMALL = short_job({"training.seq_len": 64, "lr_scheduler.warmup_steps": 2})


def read_metrics(folder):
    with open(f"{folder}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


# from test_generate.py
def tiny_args(**overrides):
    return ModelArgs(
        **{
            **dict(
                vocab_size=64,
                hidden_size=48,
                intermediate_size=64,
                moe_intermediate_size=24,
                num_hidden_layers=3,
                num_attention_heads=3,
                kv_lora_rank=16,
                qk_nope_head_dim=8,
                qk_rope_head_dim=8,
                v_head_dim=12,
                n_routed_experts=6,
                num_experts_per_tok=2,
                n_shared_experts=1,
                kernels="torch",
            ),
            **overrides,
        }
    )


# from test_chat.py
MULTI_TURN = [
    {"role": "user", "content": "the thing"},
    {"role": "assistant", "content": "in the experts"},
    {"role": "user", "content": "中文?"},
    {"role": "assistant", "content": "ex per ts"},
]


def chat_tiktoken_dir(tmp_path, template):
    ranks = [bytes([i]) for i in range(256)] + [b"th", b"he", b"the", b" the", b"in", b"ex", b"per", b"ts"]
    (tmp_path / "tiktoken.model").write_text(
        "".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks))
    )
    n = len(ranks)
    names = ["[BOS]", "[EOS]"] + DEFAULT_ADDITIONAL_SPECIALS
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "[BOS]",
                "eos_token": "<|im_end|>",
                "chat_template": template,
                "added_tokens_decoder": {str(n + k): {"content": t, "special": True} for k, t in enumerate(names)},
            }
        )
    )
    return tmp_path


def chat_cfg(path, **kw):
    cfg = DataSection(format="chat", path=str(path))
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


# from test_lora.py
def lora_test_model(args=LORA_ARGS, seed=0):
    torch.manual_seed(seed)
    m = Moonlight(args)
    m.init_weights()
    return m.eval()


# from test_async_checkpoint.py
ASYNC_CHECKPOINT = {"async_mode": "async"}


def async_checkpoint_snapshot(model, opts, loader):
    optim = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in flat_optim(model, opts).items()}
    return full_sd(model), optim, loader.consumed


def async_checkpoint_assert_same(a, b):
    assert_sd_equal(a[0], b[0])
    assert_sd_equal(a[1], b[1])
    assert a[2] == b[2]


# from test_chat.py

CHAT_BASE = short_job(
    {
        "training.steps": 2,
        "training.seq_len": 64,
        "training.local_batch_size": None,
        "model.kernels": "torch",
        "data.format": "chat",
        "data.shuffle": False,
    }
)


def chat_trainer(folder, data, extra):
    return Trainer(
        load_config("train.toml", CHAT_BASE + [f"--job.dump_folder={folder}", f"--data.path={data}", *extra])
    )


# from test_checkpoint.py
def checkpoint_split(model, ranges):
    """Pipeline-stage copies of `model` holding layers [a, b) (embedding first, head last)."""
    import copy

    parts = []
    for i, (a, b) in enumerate(ranges):
        p = copy.deepcopy(model)
        for k in list(p.layers):
            if not a <= int(k) < b:
                del p.layers[k]
        if i > 0:
            p.embed = None
        if i < len(ranges) - 1:
            p.norm = p.lm_head = None
        parts.append(p)
    return parts


def build_opt_parts(parts):
    from moonlight.train.optim import build_optimizers

    named = [(n, p) for part in parts for n, p in part.named_parameters()]
    opts = build_optimizers(named, "adamw", lr=1e-2)
    return opts, LRSchedulerSection(warmup_steps=2).build(opts, total_steps=STEPS)


def checkpoint_fake_step(parts, opts, seed=0):
    g = torch.Generator().manual_seed(seed)
    for part in parts:
        for p in part.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            grad = torch.randn(local.shape, generator=g)
            if hasattr(p, "to_local"):
                from torch.distributed.tensor import DTensor

                p.grad = DTensor.from_local(grad, p.device_mesh, p.placements, run_check=False)
            else:
                p.grad = grad
    opts.step()
    opts.zero_grad()


# from test_compile.py
COMPILE_BASE = short_job({"checkpoint.enable": None, "checkpoint.keep_latest_k": 0})


def compile_trainer(folder, *extra):
    return Trainer(load_config("train.toml", COMPILE_BASE + [f"--job.dump_folder={folder}", *extra]))


def compile_run(trainer, steps):
    """Losses of `steps` steps, and the gradients of the last one."""
    losses = []
    for _ in range(steps):
        losses.append(trainer.train_step()["loss"])
        trainer.step += 1
    grads = {n: p.grad.clone() for n, p in trainer.model_parts[0].named_parameters() if p.grad is not None}
    return losses, grads


# from test_entry_errors.py
QUICK = short_job(
    {
        "training.steps": 2,
        "training.global_batch_size": 2,
        "training.local_batch_size": 1,
        "checkpoint.enable": None,
        "metrics.log_freq": None,
        "lr_scheduler.warmup_steps": 0,
    }
)


def entry_errors_run(cmd, tmp_path, *overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MOONLIGHT_TRACEBACK", None)
    return subprocess.run(
        cmd + ["train.py", "--config", "train.toml", f"--job.dump_folder={tmp_path}", *QUICK, *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# from test_faults.py
FAULTS_SMALL = short_job({"lr_scheduler.warmup_steps": 2, "model.kernels": "torch"})


def faults_damage(path, n=64):
    """Flip n bytes in the middle of a file, keeping its size (silent corruption)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        data = f.read(n)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in data))


# from test_hf_peft.py
HF_PEFT_ARGS = ModelArgs.preset("debug", kernels="torch")


def read_all_adapter(path):
    return load_file(os.path.join(path, ADAPTER_WEIGHTS))


# from test_lora.py


def lora_losses(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r}


# from test_moe_overlap.py
def moe_overlap_args():
    return ModelArgs.preset("debug", kernels="torch", aux_loss_alpha=0.0)


def moe_overlap_moe(args, device):
    torch.manual_seed(0)
    moe = MoE(args)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return moe.to(device).train()


def plain_order(moe, x):
    """MoE.forward as it was before the overlap: routed experts, then the shared experts."""
    h = x.reshape(-1, x.shape[-1])
    weights, expert_ids, _ = moe.router(h)
    return (moe.experts(h, expert_ids, weights) + moe.shared_experts(h)).view(x.shape)


def moe_overlap_run(moe, forward, x):
    moe.zero_grad()
    x = x.detach().requires_grad_()
    out = forward(x)
    out.backward(torch.cos(out.detach() * 7))
    return [out.detach(), x.grad] + [p.grad.clone() for p in moe.parameters()]


def assert_bit_identical(moe, x):
    overlapped = moe_overlap_run(moe, moe, x)
    plain = moe_overlap_run(moe, lambda x: plain_order(moe, x), x)
    assert len(overlapped) == len(plain)
    for a, b in zip(overlapped, plain):
        assert torch.equal(a, b)


# from test_moe_sync.py
def moe_sync_args(**kw):
    return ModelArgs.preset("debug", **{"kernels": "torch", "aux_loss_alpha": 0.01, **kw})


def moe_sync_moe(args, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    moe = MoE(args).to(device)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    moe.router.expert_bias.normal_(std=0.01)
    return moe.to(dtype).train()


def moe_sync_step(moe, x):
    out = moe(x)
    out.square().sum().backward()
    return out


def moe_sync_inputs(args, batch=2, seqlen=8, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, seqlen, args.hidden_size, generator=g).to(device, dtype)


# from test_optim.py
OPTIM_LR, OPTIM_WD = 0.02, 0.1


def run_muon(W0s, grads_per_step, **kw):
    ps = [nn.Parameter(w.clone()) for w in W0s]
    opt = Muon(ps, lr=OPTIM_LR, weight_decay=OPTIM_WD, **kw)
    for grads in grads_per_step:
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps]


# from test_parallel_tp_fsdp.py
GLOBAL_BATCH, PARALLEL_TP_FSDP_SEQ = 4, 16


def parallel_tp_fsdp_args():
    from moonlight.config import ModelArgs

    return ModelArgs.preset("debug", kernels="torch", num_hidden_layers=3, aux_loss_alpha=0.01)


def parallel_tp_fsdp_reference(seed=0):
    from moonlight.model import Moonlight

    torch.manual_seed(seed)
    args = parallel_tp_fsdp_args()
    model = Moonlight(args)
    model.init_weights(std=0.05)
    with torch.no_grad():  # spread the router's biased scores: no top-k near-ties between configurations
        for moe in model.moe_layers():
            moe.router.expert_bias.normal_(0, 0.05)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, args.vocab_size, (GLOBAL_BATCH, PARALLEL_TP_FSDP_SEQ + 1), generator=g)
    return model, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def reference_step(model, inputs, labels):
    from moonlight.parallel.tensor import cross_entropy_loss

    model.train()
    loss = cross_entropy_loss(model(inputs), labels)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    counts = {n: m.tokens_per_expert.clone() for n, m in model.named_modules() if hasattr(m, "tokens_per_expert")}
    return loss.detach(), grads, counts


# from test_plan.py
PLAN_SMALL = short_job({"training.steps": 2, "metrics.log_freq": None})


def bytes_by_dtype(tensors) -> Counter:
    out = Counter()
    for t in tensors:
        t = local_tensor(t)
        out[str(t.dtype).removeprefix("torch.")] += t.numel() * t.element_size()
    return out


def plan_measured(trainer: Trainer) -> dict:
    """Bytes the trainer holds after one step: local shards of parameters, gradients, optimizer state."""
    trainer.train_step()
    params = [p for part in trainer.model_parts for p in part.parameters()]
    state = [
        v for opt in trainer.optimizers for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    ]
    return {
        "params": bytes_by_dtype(params),
        "grads": bytes_by_dtype(p.grad for p in params if p.grad is not None),
        "optimizer": bytes_by_dtype(state),
    }


def plan_planned(row) -> dict:
    return {"params": +row.params, "grads": +row.grads, "optimizer": +row.optimizer}


def plan_cfg(tmp_path, extra):
    return load_config("train.toml", PLAN_SMALL + [f"--job.dump_folder={tmp_path}", *extra]).validate()


def saved_activation_bytes(model, tokens, **model_kwargs) -> int:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded, with the loss the
    trainer takes from a whole head (the chunked loss from the hidden states)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cross_entropy_from_hidden(model(tokens, return_hidden=True, **model_kwargs), model.lm_head, tokens)
    return sum(seen.values())


class _LiveBytes(TorchDispatchMode):
    """Op by op, the bytes of the storages made inside it that are still alive, and their most."""

    def __init__(self, inputs):
        super().__init__()
        self.inputs = {t.untyped_storage().data_ptr() for t in inputs}  # their views do not count
        self.live, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {ptr: (ref, n) for ptr, (ref, n) in self.live.items() if not ref.expired()}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.inputs:
                storage = t.untyped_storage()
                self.live.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def peak_live_bytes(fn, *inputs) -> int:
    """The most bytes the tensors made by fn() hold at once (its inputs and their views excluded), as a
    device's allocator would count them, measured op by op on the CPU."""
    with _LiveBytes(inputs) as mode:
        fn()
    return mode.peak


# from test_sharded_load.py
def sharded_load_args():
    from moonlight.config import ModelArgs

    return ModelArgs.preset("debug", kernels="torch", num_hidden_layers=3)


# from test_step_syncs.py
STEP_SYNCS_SMALL = short_job(
    {"training.steps": 4, "training.global_batch_size": 2, "metrics.log_freq": 2, "moe.aux_loss_coeff": 0.01}
)


# from test_validation.py
VALIDATION_BASE = short_job({"training.steps": 2, "training.seq_len": 64, "model.kernels": "torch"})
# chat validation (assistant tokens only are targets, conversations document-masked) of a text run
VALIDATION = [
    "--validation.enable=true",
    "--validation.path=data/chat/sample.jsonl",
    "--validation.format=chat",
    "--validation.interval=1",
    "--validation.steps=2",
]


def validation_cfg(folder, *extra):
    return load_config("train.toml", VALIDATION_BASE + [f"--job.dump_folder={folder}", *extra])


def validation_records(folder):
    with open(f"{folder}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def summed_loss(model, tokens, labels, **packing):
    """The sum of the token losses of a whole model, as the trainer computes it (chunked, from the
    hidden states)."""
    return cross_entropy_from_hidden(model(tokens, return_hidden=True, **packing), model.lm_head, labels)
