"""Tokenize a text corpus once into Megatron .bin/.idx files, for `data.format = "megatron"`:

    python -m moonlight.prepare_data INPUT [INPUT ...] --tokenizer SPEC --out PREFIX [--append-eos]
                                     [--text-key text] [--on-bad-line skip|error] [--overwrite]

INPUT: jsonl files (.jsonl or .jsonl.gz), directories of them, or globs, read as `data.format = "jsonl"`
reads them. --tokenizer takes what `data.tokenizer` takes. It writes PREFIX.bin and PREFIX.idx
(uint16 tokens when every id of the tokenizer fits, else int32) under temporary names, renamed when
complete: an interrupted run leaves no output, and an earlier one stays as it was. The trainer then
reads them with `data.path = PREFIX` and gets the same token sequences as from the jsonl.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from moonlight.errors import ArgumentParser, DataError, exit_on_user_error
from moonlight.data.documents import DataKeys
from moonlight.data.megatron import MegatronBuild, build_megatron_from_jsonl, check_megatron_output
from moonlight.data.tokenizer import build_tokenizer


@dataclass(frozen=True)
class CommandLineKeys(DataKeys):
    """Messages name this command's arguments instead of [data] keys."""

    def __call__(self, name: str) -> str:
        return "INPUT" if name == "path" else "--" + name.replace("_", "-")

    def assign(self, name: str, value: str) -> str:
        return f"{self(name)} {value}"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m moonlight.prepare_data",
        description="Tokenize jsonl text into Megatron .bin/.idx files for "
        'data.format = "megatron" (tokenize once, not at every start).',
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="jsonl file(s) (.jsonl, .jsonl.gz), directories of them (recursively) or quoted globs",
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        help="what data.tokenizer takes: 'byte', a directory with tiktoken.model, or a tokenizer.json "
        "(or its directory); use the training job's",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="PREFIX",
        help="writes PREFIX.bin and PREFIX.idx (its directory must exist); train with data.path = PREFIX",
    )
    p.add_argument("--text-key", default="text", help="the JSON field holding each document's text (default: text)")
    p.add_argument(
        "--append-eos",
        action="store_true",
        help="end every document with the tokenizer's eos token in the files (Megatron's --append-eod); "
        "then train with data.add_eos = false, as the 16B recipes do, or each document gets two. "
        "Without it the files hold the bare tokens and data.add_eos = true (the default) adds eos "
        "when packing",
    )
    p.add_argument(
        "--on-bad-line",
        choices=("skip", "error"),
        default="skip",
        help="a malformed line (bad JSON or UTF-8, no text field): skip and count it (default, as "
        "data.on_bad_line), or stop with an error naming it",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing PREFIX.bin/.idx (only a pair this command could have written)",
    )
    return p


def check_out(prefix: str) -> None:
    """The output prefix names files in an existing directory."""
    if prefix.endswith(os.sep) or os.path.isdir(prefix):
        raise DataError(
            f"--out {prefix}: a directory; give a file prefix such as {os.path.join(prefix, 'corpus')} "
            "(writes corpus.bin and corpus.idx there)"
        )
    folder = os.path.dirname(os.path.abspath(prefix))
    if not os.path.isdir(folder):
        raise DataError(
            f"--out {prefix}: directory {folder} does not exist; create it first (mkdir -p {folder}) or fix the path"
        )


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def summary(built: MegatronBuild, append_eos: bool) -> str:
    skipped = [
        _count(n, noun) for n, noun in ((built.empty, "empty document"), (built.bad_lines, "malformed line")) if n
    ]
    first = f" (first: {built.first_bad_line})" if built.first_bad_line else ""
    return (
        f"wrote {_count(built.documents, 'document')}, {_count(built.tokens, 'token')} ({built.dtype}"
        f"{', eos appended' if append_eos else ''}) to {' and '.join(built.files)}"
        f"{'; skipped ' + ', '.join(skipped) + first if skipped else ''}\n"
        f'train on them with data.format = "megatron", data.path = "{built.files[0][: -len(".bin")]}", '
        f"data.add_eos = {'false' if append_eos else 'true'}"
    )


def run(ns: argparse.Namespace) -> MegatronBuild:
    """Validate the arguments, then tokenize and write."""
    check_out(ns.out)
    check_megatron_output(ns.out, ns.overwrite, how="--overwrite")
    tokenizer = build_tokenizer(ns.tokenizer, "--tokenizer")
    return build_megatron_from_jsonl(
        ns.inputs,
        ns.out,
        tokenizer,
        text_key=ns.text_key,
        append_eos=ns.append_eos,
        on_bad_line=ns.on_bad_line,
        overwrite=ns.overwrite,
        keys=CommandLineKeys(),
    )


def main(argv: list[str] | None = None) -> int:
    """The command line; a user error exits (SystemExit) with code 2 after one `error: ...` line."""

    def prepare():
        ns = build_parser().parse_args(argv)
        print(summary(run(ns), ns.append_eos))

    code = exit_on_user_error(prepare)
    if code:
        raise SystemExit(code)
    return 0


if __name__ == "__main__":
    main()
