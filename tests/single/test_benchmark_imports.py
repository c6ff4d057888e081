"""Every name a benchmark script imports from this repository exists: the scripts are run by hand, not
by the suite, so a refactor that moves a function would otherwise break them unnoticed
(benchmarks/checkpoint_blocking.py imported build_lr_scheduler from optim after it moved to schedule)."""

import ast
import importlib
import importlib.util
import pathlib

import pytest
from tests.helpers import ROOT

OURS = ("moonlight", "tests", "benchmarks")


def _our_imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in OURS:
            yield node.module, [alias.name for alias in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in OURS:
                    yield alias.name, [], node.lineno


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")))
def test_benchmark_imports_exist(script):
    path = ROOT / "benchmarks" / script
    for module, names, line in _our_imports(path):
        mod = importlib.import_module(module)
        missing = [
            n
            for n in names
            if not hasattr(mod, n)  # a submodule not imported yet also counts
            and not (hasattr(mod, "__path__") and importlib.util.find_spec(f"{module}.{n}"))
        ]
        assert not missing, f"{path.name}:{line}: {module} has no {missing}"
