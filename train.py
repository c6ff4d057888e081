"""Train Moonlight: `torchrun --nproc_per_node=N train.py --config train.toml [--section.key=value ...]`."""

import sys

import torch.distributed as dist

from moonlight.errors import exit_on_user_error
from moonlight.train.config import parse_args
from moonlight.train.trainer import Trainer


def main(argv: list[str]) -> int:
    try:
        return exit_on_user_error(lambda: Trainer(parse_args(argv)).train())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
