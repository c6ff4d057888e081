"""CPU proxy of the optimizer step's cost on a GPU: ops dispatched (each a kernel launch there) and
bytes written by them, per optimizer step, counted with the TorchDispatchMode of `op_counter.py`.

For Muon (with AdamW on the embedding, head and 1-D weights) and AdamW alone, through
`build_optimizers` as the trainer calls it, with and without fp32 master weights (precision_aware),
on the debug model and on the 4-layer Moonlight-width slice of benchmarks/gpu_suite.py, both on a fake
CUDA device (FakeTensorMode: shapes only, nothing allocated, no GPU needed, and torch takes its CUDA
choices, e.g. fused AdamW). Ops that launch no kernel (views, allocations, profiler marks) are not
counted. Counts are exact: they do not depend on timing.

    python benchmarks/optimizer_ops.py [--json FILE]

Bytes written: the outputs of every op plus the arguments it writes in place (a pass over a tensor
costs about twice that in memory traffic: it is read too).
"""

import argparse
import json
import sys
from pathlib import Path

# benchmarks/kernels.py would shadow the `kernels` package: resolve imports from the repository root
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from benchmarks.op_counter import OpCounter  # noqa: E402
from moonlight.config import ModelArgs  # noqa: E402
from moonlight.model import Moonlight  # noqa: E402
from moonlight.train.optim import build_optimizers  # noqa: E402

MODELS = {
    "debug": lambda: ModelArgs.preset("debug", kernels="torch"),
    "slice": lambda: ModelArgs.preset(
        "moonlight-16b-a3b", num_hidden_layers=4, first_k_dense_replace=1, kernels="torch"
    ),
}


def count_step(model_name: str, optimizer: str, precision_aware: bool) -> dict:
    """Ops and bytes of the second optimizer step (the first one creates the state) with a gradient on
    every parameter, fp32 parameters (bf16 with precision_aware: fp32 masters in the optimizer)."""
    with torch.device("meta"):
        model = Moonlight(MODELS[model_name]()).to(torch.bfloat16 if precision_aware else torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cuda")  # the values do not matter, only the shapes
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.ones_like(p)
        opts = build_optimizers(
            model.named_parameters(), name=optimizer, lr=1e-4, precision_aware=precision_aware, ns_dtype=torch.bfloat16
        )
        opts.step()
        counter = OpCounter()
        with counter:
            opts.step()
    return {
        "model": model_name,
        "optimizer": optimizer + (" + fp32 master" if precision_aware else ""),
        "params": len(params),
        "numel": sum(p.numel() for p in params),
        "ops": sum(counter.launches.values()),
        "bytes_written": counter.bytes_written,
        "top_ops": dict(counter.launches.most_common(8)),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args()
    rows = []
    for model_name in MODELS:
        for optimizer, precision_aware in (("muon", False), ("adamw", False), ("muon", True), ("adamw", True)):
            row = count_step(model_name, optimizer, precision_aware)
            rows.append(row)
            print(
                f"{row['model']:6} {row['optimizer']:20} {row['params']:4} params {row['numel'] / 1e6:9.1f}M: "
                f"{row['ops']:5} ops, {row['bytes_written'] / 2**30:8.2f} GiB written  {row['top_ops']}",
                flush=True,
            )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
