"""README's "What is here" table names every module of the package, and every path it names exists."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _table_paths() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## What is here"):text.index("## Using it")]
    return {p for row in section.splitlines() if row.startswith("| `")
            for p in re.findall(r"`([^`]+)`", row.split("|")[1])}


def test_every_module_is_in_the_table():
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "moonlight").rglob("*.py") if p.name != "__init__.py"}
    assert modules - _table_paths() == set()


def test_every_path_in_the_table_exists():
    assert [p for p in _table_paths() if not (ROOT / p).exists()] == []
