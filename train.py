"""Train Moonlight: `torchrun --nproc_per_node=N train.py --config train.toml [--section.key=value ...]`."""

import gc
import logging
import os
import sys

import torch.distributed as dist

from moonlight.distributed import is_collective_timeout, reported_by_rank0, silent_ranks
from moonlight.errors import exit_on_user_error
from moonlight.train.config import SECTIONS, parse_args
from moonlight.train.config_io import describe_sections
from moonlight.train.trainer import Trainer


INTERRUPTED_EXIT_CODE = 130  # the shell's code for a SIGINT
USAGE = f"""{__doc__}
       `python train.py --help [SECTION]`: every key (of one section) with its type, default and meaning
       `python train.py --config FILE [overrides] --print-config`: the resolved config as TOML, then exit

Every key of a section can be overridden on the command line (--section.key=value); an unknown key
lists the valid ones. The resolved config is saved as <job.dump_folder>/config.toml. docs/training.md
has the recipes (configs/) and what each section does.
"""


def print_help(argv: list[str]) -> int:
    """--help: usage and every section; --help SECTION: that section's keys."""
    at = next(i for i, a in enumerate(argv) if a in ("-h", "--help"))
    wanted = argv[at + 1].strip("[]") if at + 1 < len(argv) and not argv[at + 1].startswith("-") else None
    if wanted is not None and wanted not in SECTIONS:
        print(f"error: no config section [{wanted}]; sections: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if wanted is None:
        print(USAGE)
    print(describe_sections({wanted: SECTIONS[wanted]} if wanted else SECTIONS).rstrip())
    return 0


def report_timeout(e: RuntimeError) -> None:
    """One line for a collective that timed out, from the lowest rank that met it, naming the ranks that
    did not (they stopped or hang: their own output says why)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    silent = silent_ranks()
    if silent is not None and rank != min(set(range(world)) - set(silent)):
        return
    who = (
        f"rank(s) {silent} did not answer (stopped or stuck: see their output)"
        if silent
        else "every rank timed out (ranks waiting in different collectives?)"
        if silent == []
        else f"on rank {rank}"
    )
    detail = str(e)[max(str(e).find("Timed out"), 0) :][:120]
    print(
        f"error: a collective timed out after training.collective_timeout_s: {who}; "
        f"raise training.collective_timeout_s if a step or save legitimately takes longer ({detail})",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        first = os.environ.get("RANK", "0") == "0" or os.environ.get("WORLD_SIZE", "1") in ("", "0", "1")
        return print_help(argv) if first else 0
    if "--print-config" in argv:
        rest = [a for a in argv if a != "--print-config"]
        return exit_on_user_error(lambda: print(parse_args(rest).to_toml(), end=""))
    # every rank reads the same data and meets the same warnings: print them once
    if os.environ.get("RANK", "0") != "0":
        logging.getLogger("moonlight").setLevel(logging.ERROR)
    try:
        return exit_on_user_error(lambda: Trainer(parse_args(argv)).train(), reported_by_rank0)
    except RuntimeError as e:
        if not is_collective_timeout(e):
            raise
        report_timeout(e)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C aborts without saving: one line, not a traceback per rank
        if os.environ.get("RANK", "0") == "0":
            print(
                "interrupted: aborted without saving; resume from the last complete checkpoint",
                file=sys.stderr,
                flush=True,
            )
        return INTERRUPTED_EXIT_CODE
    finally:
        # The trainer's reference cycles (model, meshes, checkpointer) hold the process groups: free them
        # now, or gloo's worker threads are torn down in interpreter finalization and abort the process.
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
