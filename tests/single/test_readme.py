"""The documentation holds: docs/design.md's module table names every module of the package and every
path it names exists; the README keeps the commands CI runs and stays a quick start; every relative
link of README.md and docs/ resolves; their command blocks run as written (python blocks are API
sketches on the 16B model: not run)."""

import os
import pathlib
import re
import subprocess

import pytest
from tests.helpers import ROOT

# The quick start first, then the pages it links to: blocks of a page may use what the quick start made.
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _table_paths() -> set[str]:
    text = (ROOT / "docs" / "design.md").read_text()
    start = text.index("## Layers and modules")
    section = text[start : text.index("\n## ", start)]
    return {
        p for row in section.splitlines() if row.startswith("| `") for p in re.findall(r"`([^`]+)`", row.split("|")[1])
    }


def test_every_module_is_in_the_table():
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "moonlight").rglob("*.py") if p.name != "__init__.py"}
    assert modules - _table_paths() == set()


def test_every_path_in_the_table_exists():
    assert [p for p in _table_paths() if not (ROOT / p).exists()] == []


def _pins(name: str) -> dict[str, str]:
    """`package==version` lines of a constraints file and the files it includes with -c."""
    pins = {}
    for line in (ROOT / "constraints" / name).read_text().splitlines():
        if line.startswith("-c "):
            pins.update(_pins(line.split()[1]))
        elif "==" in line and not line.startswith("#"):
            package, version = line.split("==")
            pins[package.strip().lower()] = version.strip()
    return pins


def test_the_readme_commands_and_tested_versions_match_the_constraints():
    """.ci/run runs the README's test command and its torch 2.11 command; the versions README says are
    tested are the ones constraints/ pins, and pyproject's torch floor is the release the subset uses."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", text, re.DOTALL)
    test, floor = _pins("test.txt"), _pins("torch-2.11.txt")
    torch_test = re.fullmatch(
        r'pip install torch==(\S+) && pip install -e "\.\[test\]" -c constraints/test\.txt '
        r"&& python -m pytest -q",
        blocks[1],
    )[1]
    assert blocks[0].startswith(f"pip install torch=={torch_test} && pip install -e . && torchrun ")
    floor_command = (
        f'pip install torch=={floor["torch"]} -c constraints/torch-2.11.txt && pip install -e ".[test]" '
        "-c constraints/torch-2.11.txt && python -m pytest -q -m floor"
    )
    assert floor_command in blocks
    stated = re.sub(r"\s+", " ", text[: text.index("Pretrain or fine-tune")])
    assert (
        f"torch {torch_test} with Triton {test['triton']}, transformers {test['transformers']} and peft "
        f"{test['peft']}; a subset also on torch {floor['torch']} with Triton {floor['triton']}"
    ) in stated
    major_minor = ".".join(floor["torch"].split(".")[:2])
    assert f'"torch>={major_minor}",' in (ROOT / "pyproject.toml").read_text()
    assert "torch" not in test and floor["transformers"] == test["transformers"]


def test_the_readme_stays_a_quick_start_that_links_the_docs():
    """Reference material goes to docs/ (issue 21): the README is the install, the two commands, a
    sketch and links, and docs/README.md indexes every page."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 120, "README.md is a quick start: move reference material to docs/"
    assert "(docs/README.md)" in readme
    index = (ROOT / "docs" / "README.md").read_text()
    pages = {p.name for p in (ROOT / "docs").glob("*.md") if p.name != "README.md"}
    assert {p for p in pages if f"]({p})" not in index} == set()


def _outside_fences(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def _anchors(page: pathlib.Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    anchors, seen = set(), {}
    for line in _outside_fences(page.read_text()):
        if m := re.match(r"#{1,6} (.+)", line):
            slug = re.sub(r"[^\w\- ]", "", m[1].strip().lower()).replace(" ", "-")
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_every_relative_link_points_at_a_file_and_heading_that_exist():
    broken = []
    for page in DOCS:
        for line in _outside_fences(page.read_text()):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+:", target):
                    continue
                path, _, anchor = target.partition("#")
                file = (page.parent / path).resolve() if path else page
                if not file.exists() or (anchor and file.suffix == ".md" and anchor not in _anchors(file)):
                    broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


# ------------------------------------------------------------------ the documentation walk
# Every ```bash block of README.md, then of the docs/ pages in name order, runs as written in one fresh
# folder that links the repository's files, except the blocks marked `<!-- readme-walk: skip (reason) -->`
# on the line above them. Training commands run 2 steps (the overrides below come last and win);
# `pip install` (this environment is installed) and `python -m pytest` (this suite) are the only
# commands left out.
FAST = [
    "--training.steps=2",
    "--lr_scheduler.warmup_steps=0",
    "--metrics.log_freq=1",
    "--validation.interval=1",
    "--validation.steps=1",
    "--checkpoint.interval=1",
]
BLOCK = re.compile(r"(?:<!-- readme-walk: skip \((?P<skip>[^)]+)\) -->\n)?[ ]*```bash\n(?P<body>.*?)```", re.S)


def doc_blocks() -> list[tuple[str | None, list[str]]]:
    """(skip reason or None, commands) of every bash block of DOCS: comments dropped, continuation
    lines joined, `a && b` split."""
    blocks = []
    for m in (m for page in DOCS for m in BLOCK.finditer(page.read_text())):
        text = re.sub(r"\\\n\s*", "", m["body"])
        lines = [line.split(" #")[0].strip() for line in text.splitlines()]
        commands = [c.strip() for line in lines if line and not line.startswith("#") for c in line.split(" && ")]
        blocks.append((m["skip"], commands))
    return blocks


def test_every_skipped_block_says_why_and_most_blocks_run():
    blocks = doc_blocks()
    assert len(blocks) >= 8
    assert all(reason.strip() for reason, _ in blocks if reason is not None)
    assert sum(reason is None for reason, _ in blocks) >= 5


@pytest.mark.slow
def test_documented_commands_run_in_order_in_a_fresh_folder(tmp_path):
    for name in ("train.py", "train.toml", "configs", "data", "benchmarks"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    ran = []
    for reason, commands in doc_blocks():
        if reason is not None:
            continue
        for command in commands:
            if command.startswith(("pip install", "python -m pytest")):
                continue
            trains = "train.py" in command and "--help" not in command and "--print-config" not in command
            full = command + (" " + " ".join(FAST) if trains else "")
            proc = subprocess.run(full, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"{full}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
            if trains:  # each example trains in its own dump folder: never "nothing to train"
                assert "[moonlight] done: 2 steps (1-2)" in proc.stdout, f"{full}\n{proc.stdout[-2000:]}"
            ran.append(command.split()[0:3])
    assert len(ran) >= 8, ran
