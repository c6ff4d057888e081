"""README's "What is here" table names every module of the package, and every path it names exists."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _table_paths() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## What is here"):text.index("## Using it")]
    return {p for row in section.splitlines() if row.startswith("| `") for p in re.findall(r"`([^`]+)`", row.split("|")[1])}


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
    torch_test = re.fullmatch(r'pip install torch==(\S+) && pip install -e "\.\[test\]" -c constraints/test\.txt '
                              r"&& python -m pytest -q", blocks[1])[1]
    assert blocks[0].startswith(f"pip install torch=={torch_test} && pip install -e . && torchrun ")
    floor_command = (f'pip install torch=={floor["torch"]} -c constraints/torch-2.11.txt && pip install -e ".[test]" '
                     "-c constraints/torch-2.11.txt && python -m pytest -q -m floor")
    assert floor_command in blocks
    stated = re.sub(r"\s+", " ", text[:text.index("Pretrain or fine-tune")])
    assert (f"torch {torch_test} with Triton {test['triton']}, transformers {test['transformers']} and peft "
            f"{test['peft']}; a subset also on torch {floor['torch']} with Triton {floor['triton']}") in stated
    major_minor = ".".join(floor["torch"].split(".")[:2])
    assert f'"torch>={major_minor}",' in (ROOT / "pyproject.toml").read_text()
    assert "torch" not in test and floor["transformers"] == test["transformers"]
