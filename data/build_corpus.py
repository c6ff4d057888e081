"""Rebuild the shipped corpus (data/corpus/*.jsonl) from documentation found on this machine.

python_docs.jsonl (PSF License Version 2, see data/README.md and data/LICENSE-PSF.txt):
  1. pydoc_data.topics: the Python Language/Library Reference sections that `help()` shows,
     split into one document per section;
  2. docstrings (>= 200 characters) of the standard library's pure-Python modules, read with
     `ast` (nothing is imported or executed), one document per module/class/function.
rust_book.jsonl (Apache-2.0 OR MIT, see data/README.md): the prose of "The Rust Programming
  Language" as installed by rustup (share/doc/rust/html/book), one document per section,
  code listings and tables removed. Skipped when no rustup documentation is installed.

held-out split: every document whose text's CRC-32 is divisible by HELDOUT_EVERY goes to
  data/heldout/<same name>.jsonl instead (about 1 in 40; validation, `python -m moonlight.eval`).

    python data/build_corpus.py [--rust-doc DIR]
    python data/build_corpus.py --split-only     # re-split existing corpus files by the same rule

The shipped files were built with CPython 3.11.7 and Rust 1.95.0 documentation; other
versions give slightly different files.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sysconfig
import zlib

MIN_CHARS = 200
SKIP_DIRS = (
    "site-packages",
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "__pycache__",
    "pydoc_data",
    "unittest/test",
    "ctypes/test",
)
HEADING = re.compile(r"^(\*+|=+|-+)$")
HELDOUT_EVERY = 40  # a document is held out when crc32(text) % HELDOUT_EVERY == 0: a fixed, content-based rule


def topic_sections(text: str) -> list[str]:
    lines = text.split("\n")
    starts = [0]
    for i in range(1, len(lines)):
        prev = lines[i - 1]
        if HEADING.match(lines[i]) and prev.strip() and len(lines[i]) == len(prev) and i - 1 > 0:
            starts.append(i - 1)
    starts.append(len(lines))
    out = []
    for a, b in zip(starts, starts[1:]):
        doc = "\n".join(lines[a:b]).strip()
        if len(doc) >= MIN_CHARS:
            out.append(doc)
    return out


def stdlib_docstrings() -> list[str]:
    std = sysconfig.get_paths()["stdlib"]
    docs = []
    for root, dirs, files in os.walk(std):
        rel = os.path.relpath(root, std)
        if rel != "." and (
            rel.split(os.sep)[0] in SKIP_DIRS
            or rel.startswith("config-")
            or any(p in ("test", "tests", "__pycache__") for p in rel.split(os.sep))
        ):
            dirs[:] = []
            continue
        dirs.sort()
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    d = ast.get_docstring(node)
                    if d and len(d) >= MIN_CHARS:
                        docs.append(d.strip())
    return docs


def rust_book_sections(book_dir: str) -> list[str]:
    import glob
    import html

    docs = []
    files = sorted(glob.glob(os.path.join(book_dir, "ch*.html")) + glob.glob(os.path.join(book_dir, "appendix*.html")))
    for path in files:
        with open(path, encoding="utf-8") as f:
            m = re.search(r"<main>(.*)</main>", f.read(), re.S)
        if not m:  # redirect stubs
            continue
        body = m.group(1)
        body = re.sub(r"<(pre|table|script|style)\b.*?</\1>", "", body, flags=re.S)
        body = re.sub(r"<h[1-6][^>]*>", "\n\n\x00", body)  # \x00 marks a section start
        body = re.sub(r"<(p|li|div|blockquote|br|dt|dd)\b[^>]*>", "\n\n", body)
        body = html.unescape(re.sub(r"<[^>]+>", "", body))
        for section in body.split("\x00"):
            paras = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", section)]
            doc = "\n\n".join(p for p in paras if p)
            if len(doc) >= MIN_CHARS:
                docs.append(doc)
    return docs


def is_heldout(text: str) -> bool:
    return zlib.crc32(text.encode("utf-8")) % HELDOUT_EVERY == 0


def write_jsonl(docs: list[str], out: str) -> None:
    """The unique documents of docs: the held-out ones to ../heldout/<name>, the others to out."""
    heldout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(out))), "heldout", os.path.basename(out))
    os.makedirs(os.path.dirname(heldout), exist_ok=True)
    seen = set()
    with open(out, "w", encoding="utf-8") as train, open(heldout, "w", encoding="utf-8") as held:
        for d in docs:
            if d in seen:
                continue
            seen.add(d)
            (held if is_heldout(d) else train).write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    for path in (out, heldout):
        with open(path, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        print(f"wrote {n} documents, {os.path.getsize(path) / 1e6:.2f} MB to {path}")


def split_only(out_dir: str) -> None:
    """Apply the held-out rule to the corpus files as they are (and any held-out files already split)."""
    heldout_dir = os.path.join(os.path.dirname(os.path.abspath(out_dir)), "heldout")
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".jsonl"):
            docs = []
            for path in (os.path.join(out_dir, name), os.path.join(heldout_dir, name)):
                if os.path.exists(path):
                    with open(path, encoding="utf-8") as f:
                        docs += [json.loads(line)["text"] for line in f if line.strip()]
            write_jsonl(docs, os.path.join(out_dir, name))


def main(out_dir: str, rust_doc: str | None) -> None:
    import pydoc_data.topics as topics

    docs = []
    for key in sorted(topics.topics):
        docs.extend(topic_sections(topics.topics[key]))
    docs.extend(stdlib_docstrings())
    write_jsonl(docs, os.path.join(out_dir, "python_docs.jsonl"))
    if rust_doc is None:
        rust_doc = os.path.expanduser("~/.rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc/rust")
    book = os.path.join(rust_doc, "html", "book")
    if os.path.isdir(book):
        write_jsonl(rust_book_sections(book), os.path.join(out_dir, "rust_book.jsonl"))
    else:
        print(f"no Rust book under {book}; skipped rust_book.jsonl")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus"))
    ap.add_argument("--rust-doc", default=None, help="rustup's share/doc/rust directory")
    ap.add_argument("--split-only", action="store_true", help="only re-split the existing corpus files")
    a = ap.parse_args()
    os.makedirs(a.out_dir, exist_ok=True)
    split_only(a.out_dir) if a.split_only else main(a.out_dir, a.rust_doc)
