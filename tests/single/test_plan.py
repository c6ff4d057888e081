"""The planner against what the trainer really allocates in one process: parameter, gradient and
optimizer bytes exactly, activations within the stated 25%, the loss's peak (chunked for a whole head,
sharded logits under tp) as measured, every shipped recipe planned for its world size, and the CLI's
messages."""

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from moonlight.config import ModelArgs
from moonlight.model import Moonlight
from moonlight.errors import ConfigError
from moonlight.distributed import init_single_process_group
from moonlight.model.loss import cross_entropy_from_hidden, linear_cross_entropy
from moonlight.parallel.tensor import cross_entropy_loss
from moonlight.plan import CHUNK_BYTES, activation_bytes, check_fits, loss_bytes, main, plan
from moonlight.train.config import load_config
from moonlight.train.trainer import Trainer
from tests.helpers import CONFIGS, WORLD
from tests.helpers import peak_live_bytes, plan_cfg, plan_measured, plan_planned, saved_activation_bytes


VARIANTS = {
    "muon": [],
    "adamw": ["--optimizer.name=adamw"],
    "muon-bf16-master": ["--training.dtype=bfloat16", "--optimizer.precision_aware=true"],
    "lora": ["--lora.enable=true", "--lora.rank=4", "--optimizer.name=adamw"],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_one_process_memory_is_exact(tmp_path, variant):
    cfg = plan_cfg(tmp_path, VARIANTS[variant])
    assert plan_planned(plan(cfg, 1).ranks[0]) == plan_measured(Trainer(cfg))


@pytest.mark.parametrize("mode", ["none", "selective"])
@pytest.mark.parametrize("model", ["debug", "moonlight-width"])
def test_activation_estimate_within_25_percent(tmp_path, mode, model):
    overrides = (
        []
        if model == "debug"
        else [  # Moonlight's ratios at a CPU size
            "--model.overrides.hidden_size=256",
            "--model.overrides.num_attention_heads=2",
            "--model.overrides.qk_nope_head_dim=128",
            "--model.overrides.v_head_dim=128",
            "--model.overrides.qk_rope_head_dim=64",
            "--model.overrides.kv_lora_rank=64",
            "--model.overrides.moe_intermediate_size=176",
            "--model.overrides.intermediate_size=1408",
            "--model.overrides.n_routed_experts=16",
            "--model.overrides.num_experts_per_tok=6",
            "--model.overrides.n_shared_experts=2",
        ]
    )
    cfg = plan_cfg(tmp_path, [f"--activation_checkpoint.mode={mode}", "--training.seq_len=64", *overrides])
    trainer = Trainer(cfg)
    tokens = torch.randint(0, trainer.model_args.vocab_size, (cfg.training.local_batch_size, cfg.training.seq_len))
    measured = saved_activation_bytes(trainer.model_parts[0], tokens)
    args = trainer.model_args
    layers = list(range(args.num_hidden_layers))
    estimate = activation_bytes(args, cfg, layers, True, tokens.numel()) + loss_bytes(args, cfg, tokens.numel())[0]
    assert abs(estimate / measured - 1) < 0.25, (estimate, measured)


@pytest.mark.parametrize("head_grad", [True, False], ids=["head-trains", "head-frozen"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize(
    ("loss", "chunk_rows"), [("chunked", 1000), ("chunked", 150), ("chunked", 64), ("sharded-logits", 0)]
)
def test_loss_bytes_are_the_measured_peak(tmp_path, loss, chunk_rows, dtype, head_grad):
    """The loss's most bytes at once, forward and backward, within 2% of `loss_bytes` (kept + working):
    the chunked loss of a whole head in one, two or five chunks of 300 tokens (one chunk live at a
    time, the head's fp32 gradient made from the first chunk's), and the vocab-parallel loss on sharded
    logits (a 1-rank mesh: the code every tp rank runs)."""
    cfg = plan_cfg(tmp_path, [f"--training.dtype={dtype}", "--model.overrides.vocab_size=1024"])
    args = ModelArgs.preset("debug", vocab_size=1024)
    n = 300
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, args.hidden_size, generator=g).to(getattr(torch, dtype)).requires_grad_()
    weight = torch.randn(args.vocab_size, args.hidden_size, generator=g).to(hidden.dtype).requires_grad_(head_grad)
    labels = torch.randint(0, args.vocab_size, (n,), generator=g)
    labels[:7] = -100
    chunk_bytes = chunk_rows * args.vocab_size * 4
    if loss == "chunked":

        def step():
            linear_cross_entropy(hidden, weight, labels, chunk_bytes=chunk_bytes).backward()

    else:
        init_single_process_group("cpu")
        mesh = init_device_mesh("cpu", (1,))

        def step():
            logits = DTensor.from_local(hidden @ weight.t(), mesh, [Shard(-1)])
            cross_entropy_loss(logits, labels, reduction="sum").backward()

    measured = peak_live_bytes(step, hidden, weight, labels)
    planned = sum(loss_bytes(args, cfg, n, chunked=loss == "chunked", head_grad=head_grad, chunk_bytes=chunk_bytes))
    assert abs(planned / measured - 1) < 0.02, (planned, measured)


def test_plan_counts_the_chunked_loss_of_a_whole_head(tmp_path):
    """At the trainer's own chunk size: with a vocabulary of 256Ki tokens, 1024 tokens are two chunks of
    512 rows (512 MiB of fp32 logits each), and the plan's head adds what the trainer's loss holds at
    its peak, not the [N, V] logits, their fp32 copy and log-softmax (3 GiB)."""
    vocab = 256 * 1024
    cfg = plan_cfg(
        tmp_path,
        [f"--model.overrides.vocab_size={vocab}", "--training.local_batch_size=4", "--training.seq_len=256"],
    )
    result = plan(cfg, 1)
    args = ModelArgs.preset("debug", vocab_size=vocab)
    n = cfg.training.local_batch_size * cfg.training.seq_len
    head = result.ranks[0].activations - activation_bytes(args, cfg, list(range(args.num_hidden_layers)), True, n)
    assert CHUNK_BYTES // (4 * vocab) == n // 2
    lm_head = Moonlight(args).lm_head
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, args.hidden_size, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), generator=g)
    measured = peak_live_bytes(
        lambda: cross_entropy_from_hidden(hidden, lm_head, labels).backward(), hidden, lm_head.weight, labels
    )
    assert abs(head / measured - 1) < 0.02, (head, measured)


@pytest.mark.parametrize("parallelism", ["tp", "pp"])
def test_plan_takes_each_ranks_loss(tmp_path, parallelism):
    """Under tp = 2 the head is vocab-sharded: the loss holds the [N, V/2] logits, their fp32 copy and
    softmax; the pipeline's last stage takes the chunked loss of its whole head."""
    vocab = 8192
    cfg = plan_cfg(
        tmp_path,
        [f"--model.overrides.vocab_size={vocab}", f"--parallelism.{parallelism}=2", "--parallelism.dp_shard=1"],
    )
    args = ModelArgs.preset("debug", vocab_size=vocab)
    last = plan(cfg, 2).ranks[-1]
    tp = 2 if parallelism == "tp" else 1
    n_micro = 1 if parallelism == "tp" else cfg.training.local_batch_size
    n = cfg.training.local_batch_size // n_micro * cfg.training.seq_len
    layers = list(range(args.num_hidden_layers)) if parallelism == "tp" else [2, 3]
    head = last.activations - activation_bytes(args, cfg, layers, True, n, tp=tp)
    want = n * vocab // 2 * (4 + 8) if parallelism == "tp" else sum(loss_bytes(args, cfg, n))
    assert head == want


@pytest.mark.parametrize("name", sorted(WORLD))
def test_recipe_plans_and_fits_80_gib(name):
    cfg = load_config(str(CONFIGS / name), []).validate()
    result = plan(cfg, WORLD[name], ModelArgs.preset(cfg.model.name))
    check_fits(result, cfg, 80.0)
    assert len(result.ranks) == cfg.parallelism.pp
    assert result.flops_per_token == ModelArgs.preset(cfg.model.name).flops_per_token(cfg.training.seq_len)


def test_cli_names_the_fix_when_it_does_not_fit(capsys):
    argv = [
        "--config",
        str(CONFIGS / "moonlight-16b-pretrain.toml"),
        "--world-size",
        "8",
        "--activation_checkpoint.mode=none",
        "--training.local_batch_size=4",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "activation_checkpoint.mode = 'full'" in err[0], err
    assert main(["--config", "train.toml", "--world-size", "2", "--training.seq_len=4096"]) == 2  # train.py refuses it
    assert "exceeds the model's max_position_embeddings = 1024" in capsys.readouterr().err
    assert main(["--config", "train.toml", "--world-size", "2", "--gpu-memory-gib", "-1"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --gpu-memory-gib must be > 0 (got -1): the memory of one device")
    with pytest.raises(ConfigError, match="ep"):  # invalid degrees fail in the trainer's own check
        plan(
            load_config(str(CONFIGS / "moonlight-16b-pretrain.toml"), ["--parallelism.ep=3"]).validate(),
            8,
            ModelArgs.preset("moonlight-16b-a3b"),
        )


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--config", "train.toml"], "required: --world-size (see python -m moonlight.plan --help)"),
        (["--config", "train.toml", "--world-size", "eight"], "--world-size: invalid int value: 'eight'"),
    ],
)
def test_cli_bad_arguments_are_one_error_line(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and match in err, err


def test_cli_help_names_the_config_and_overrides(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--config FILE" in out and "--section.key=value" in out, out


def test_lora_targets_that_fit_nothing_are_named_as_the_trainer_names_them(tmp_path):
    cfg = plan_cfg(tmp_path, ["--lora.enable=true", "--lora.targets=attn.q_proj,attn.qkv"])
    with pytest.raises(ConfigError, match=r"lora: LoRA target 'attn.qkv' matches no module.*lora.targets"):
        plan(cfg, 1)


def test_small_figures_keep_their_digits():
    """The debug model's plan read 0.00 GiB and 0.0 PFLOP: each figure now takes the unit that fits it."""
    from moonlight.plan import human_bytes, human_flops

    assert [human_bytes(n) for n in (0, 512, 2.77 * 2**20, 37.5 * 2**30)] == ["0 B", "512 B", "2.77 MiB", "37.50 GiB"]
    assert [human_flops(n) for n in (5.46e6, 5.59e9, 1.2e15)] == ["5.46 MFLOP", "5.59 GFLOP", "1.20 PFLOP"]
