"""Multi-node launch: two torchrun agents ("nodes") of two processes each meet through c10d rendezvous
on localhost and train with the single-process losses; the shipped SLURM script starts one such agent
per node with the right torchrun command."""

import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from moonlight.train.config import load_config
from moonlight.train.trainer import Trainer
from tests.helpers import short_job

ARGS = short_job(
    {"training.steps": 3, "training.local_batch_size": 1, "parallelism.dp_shard": -1, "model.kernels": "torch"}
)


def _losses(folder):
    with open(f"{folder}/metrics.jsonl") as f:
        return [json.loads(line)["loss"] for line in f]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_nodes_match_single_process(tmp_path):
    Trainer(load_config("train.toml", ARGS + [f"--job.dump_folder={tmp_path / 'single'}"])).train()
    port = _free_port()
    node = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=moonlight-test",
        "--local-addr=127.0.0.1",
        "train.py",
        "--config",
        "train.toml",
        *ARGS,
        f"--job.dump_folder={tmp_path / 'multi'}",
    ]
    # both "nodes" on the loopback interface; one thread per rank on a small CI machine
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    agents = [
        subprocess.Popen(node, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)
    ]
    try:
        logs = [agent.communicate(timeout=400)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    for agent, log in zip(agents, logs):
        assert agent.returncode == 0, log[-3000:]
    assert "world_size=4" in "".join(logs)  # 2 nodes x 2 processes, as the header names the parallelism
    assert _losses(tmp_path / "multi") == pytest.approx(_losses(tmp_path / "single"), rel=1e-4, abs=1e-5)


def test_slurm_script_starts_one_torchrun_agent_per_node(tmp_path):
    # stand-ins for SLURM's scontrol/srun and for torchrun, which records its arguments
    fake = {
        "scontrol": 'printf "node-a\\nnode-b\\n"',
        "srun": 'while [[ "$1" == --* ]]; do shift; done; exec "$@"',
        "torchrun": f'echo "$@" > {tmp_path}/torchrun.args',
    }
    for name, body in fake.items():
        path = tmp_path / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {
        **os.environ,
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "42",
    }
    subprocess.run(
        ["bash", "configs/slurm/train.sbatch", "configs/moonlight-16b-pretrain.toml", "--training.steps=10"],
        env=env,
        check=True,
        timeout=60,
    )
    args = (tmp_path / "torchrun.args").read_text().split()
    assert args == [
        "--nnodes=2",
        "--nproc_per_node=8",
        "--rdzv-id=42",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=node-a:29500",
        "train.py",
        "--config",
        "configs/moonlight-16b-pretrain.toml",
        "--training.steps=10",
    ]
    missing = subprocess.run(["bash", "configs/slurm/train.sbatch"], env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "usage: sbatch" in missing.stderr
