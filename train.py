"""Train Moonlight: `torchrun --nproc_per_node=N train.py --config train.toml [--section.key=value ...]`."""

import gc
import logging
import os
import sys

import torch.distributed as dist

from moonlight.errors import exit_on_user_error
from moonlight.train.config import SECTIONS, parse_args
from moonlight.train.trainer import Trainer


INTERRUPTED_EXIT_CODE = 130  # the shell's code for a SIGINT
USAGE = (f"{__doc__}\n\nSections: {', '.join(SECTIONS)}. Every key of a section can be overridden on the "
         "command line; an unknown key lists the valid ones. The resolved config is printed at the start and "
         "saved as <job.dump_folder>/config.toml. See README.md for the keys and the recipes in configs/.")


def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        if os.environ.get("RANK", "0") == "0":
            print(USAGE)
        return 0
    # every rank reads the same data and meets the same warnings: print them once
    if os.environ.get("RANK", "0") != "0":
        logging.getLogger("moonlight").setLevel(logging.ERROR)
    try:
        return exit_on_user_error(lambda: Trainer(parse_args(argv)).train())
    except KeyboardInterrupt:  # a second Ctrl-C aborts without saving: one line, not a traceback per rank
        if os.environ.get("RANK", "0") == "0":
            print("interrupted: aborted without saving; resume from the last complete checkpoint",
                  file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE
    finally:
        # The trainer's reference cycles (model, meshes, checkpointer) hold the process groups: free them
        # now, or gloo's worker threads are torn down in interpreter finalization and abort the process.
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
