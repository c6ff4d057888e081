"""Train Moonlight: `torchrun --nproc_per_node=N train.py --config train.toml [--section.key=value ...]`."""

import os
import sys

import torch.distributed as dist

from moonlight.train.config import ConfigError, parse_args
from moonlight.train.trainer import Trainer


def main(argv: list[str]) -> int:
    try:
        Trainer(parse_args(argv)).train()
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank reads the same config: report it once
            print(f"config error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
