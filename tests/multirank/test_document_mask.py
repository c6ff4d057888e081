"""Document masking through the trainer: with text and chat data, the losses on gloo ranks equal the
single-process ones in every parallel configuration."""

import json

import pytest
import torch

from tests.helpers import chat_conversations, short_job, write_chat


# ------------------------------------------------------------- parallel configurations

PARALLEL_BASE = short_job({"training.steps": 2, "training.seq_len": 64, "model.kernels": "torch"})


def _chat_file(folder):
    return write_chat(folder / "chat.jsonl", chat_conversations(24))


def _train_losses(rank, world_size, folder, extra):
    from moonlight.train.config import load_config
    from moonlight.train.trainer import Trainer

    Trainer(load_config("train.toml", PARALLEL_BASE + [f"--job.dump_folder={folder}", *extra])).train()
    with open(f"{folder}/metrics.jsonl") as f:
        return [json.loads(line)["loss"] for line in f]


def _text_file(folder):
    """Short documents, so that every 64-token row packs several of them."""
    words = ["alpha", "beta", "gamma", "delta", "prime", "sum", "one", "two", "yes", "no"]
    g = torch.Generator().manual_seed(0)
    lines = [
        " ".join(words[i] for i in torch.randint(0, 10, (int(n),), generator=g))
        for n in torch.randint(1, 6, (200,), generator=g)
    ]
    path = folder / "text.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return str(path)


DATA = {
    # rows of 257 tokens hold two to four conversations
    "chat": lambda folder: ["--data.format=chat", f"--data.path={_chat_file(folder)}", "--training.seq_len=256"],
    "text": lambda folder: ["--data.document_mask=true", f"--data.path={_text_file(folder)}"],
}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    out = {}
    for name, data in DATA.items():
        folder = tmp_path_factory.mktemp(f"single_{name}")
        args = data(folder)
        out[name] = (args, _train_losses(0, 1, folder / "run", args))
    # the masking matters for this data: without it the losses differ
    unmasked = _train_losses(0, 1, folder / "unmasked", out["text"][0] + ["--data.document_mask=false"])
    assert unmasked[0] != pytest.approx(out["text"][1][0], rel=1e-4)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("data", list(DATA))
@pytest.mark.parametrize(
    "parallelism",
    [
        ["--parallelism.dp_shard=2"],
        ["--parallelism.tp=2", "--parallelism.sequence_parallel=true"],
        ["--parallelism.ep=2"],
        ["--parallelism.pp=2", "--parallelism.pp_schedule=1F1B"],
        ["--parallelism.cp=2"],  # documents cross the zig-zag chunk borders
    ],
    ids=["fsdp2", "tp2_sp", "ep2", "pp2", "cp2"],
)
def test_document_masked_losses_equal_single_process(parallelism, data, single_process, tmp_path):
    from tests.dist import run_ranks

    args, losses = single_process[data]
    got = run_ranks(_train_losses, 2, str(tmp_path / "run"), args + parallelism)[0]
    assert got == pytest.approx(losses, rel=1e-4, abs=1e-5)
