"""The package is layered: config -> model (+ kernels) -> HF / checkpoint formats -> parallel -> train
-> entry points. Built from the source (no imports run): no import cycles, nothing imports a higher
layer, no module imports another module's _private names, and function-local imports are only for
optional dependencies."""

import ast
import pathlib
import subprocess
import sys

import pytest
from tests.helpers import ROOT

# source folder -> the package name it imports as (kernels/ is moonlight.kernels, through a symlink)
SOURCE_DIRS = {"moonlight": "moonlight", "kernels": "moonlight.kernels"}

# Lower number = lower layer; a module may import only modules of its own layer or below.
LAYERS = {
    "moonlight.errors": 0,
    "moonlight.distributed": 0,
    "moonlight.dtypes": 0,
    "moonlight.outputs": 0,
    "moonlight.config": 1,
    "moonlight.data": 1,  # text and data: tokenizers, chat, documents, loaders
    "moonlight.kernels": 2,
    "moonlight.model": 2,
    "moonlight": 2,  # the package root re-exports ModelArgs, Moonlight
    "moonlight.hf": 3,
    "moonlight.hf_peft": 3,
    "moonlight.checkpoint": 3,
    "moonlight.parallel": 4,
    "moonlight.generation": 4,  # generation: model, hf, checkpoint, data; never train
    "moonlight.train": 5,
    "moonlight.convert": 6,
    "moonlight.generate": 6,
    "moonlight.plan": 6,
    "moonlight.prepare_data": 6,
    "moonlight.eval": 6,
}
# What a function body may import: optional dependencies, loaded only when a feature needs them.
OPTIONAL = ("tiktoken", "tokenizers", "datasets", "torch.utils.tensorboard", "triton", "peft")


def _module_name(path: pathlib.Path) -> str:
    folder, *parts = path.relative_to(ROOT).with_suffix("").parts
    if folder == "moonlight" and parts[:1] == ["kernels"]:  # the symlink, when rglob follows it
        folder, *parts = parts
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([SOURCE_DIRS[folder], *parts])


def _sources() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for folder in SOURCE_DIRS for p in sorted((ROOT / folder).rglob("*.py"))}


def _layer(module: str) -> int:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[best]


def _imports(module: str, path: pathlib.Path, modules: set[str]):
    """(imported internal module, names, line, inside a function) for every import statement."""
    tree = ast.parse(path.read_text(), str(path))
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno, id(node) in in_function
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [a.name for a in node.names]
            # `from pkg import submodule` depends on the submodule, not on the package
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            for target in subs or [base]:
                yield target, [n for n in names if f"{base}.{n}" not in modules], node.lineno, id(node) in in_function


def _graph():
    sources = _sources()
    modules = set(sources)
    edges, problems = {m: set() for m in modules}, []
    for module, path in sources.items():
        where = f"{path.relative_to(ROOT)}"
        for target, names, line, local in _imports(module, path, modules):
            internal = target.split(".")[0] == "moonlight"
            if local and not (internal or target.startswith(OPTIONAL)):
                problems.append(f"{where}:{line}: function-local import of {target} (only optional dependencies)")
            if not internal:
                continue
            if local:
                problems.append(f"{where}:{line}: function-local import of {target} (import it at the top)")
            private = [n for n in names if n.startswith("_")]
            if private:
                problems.append(f"{where}:{line}: imports private name(s) {private} from {target}")
            if target in modules and target != module:
                edges[module].add(target)
                if _layer(target) > _layer(module):
                    problems.append(
                        f"{where}:{line}: {module} (layer {_layer(module)}) imports {target} "
                        f"(layer {_layer(target)}), a higher layer"
                    )
    return edges, problems


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    unplaced = [m for m in _sources() if not any(m == k or m.startswith(k + ".") for k in LAYERS)]
    assert not unplaced, f"add these modules to LAYERS: {unplaced}"


def test_no_import_cycles():
    edges, _ = _graph()
    assert _cycles(edges) == []


def test_layers_point_one_way_and_no_private_or_local_imports():
    _, problems = _graph()
    assert problems == []


def test_the_checks_catch_what_they_claim(tmp_path):
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _layer("moonlight.train.trainer") > _layer("moonlight.parallel.mesh") > _layer("moonlight.hf")
    assert _layer("moonlight.checkpoint.state") > _layer("moonlight.model.lora") > _layer("moonlight.config")
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from moonlight.hf import _private\n    import os\n")
    found = list(_imports("moonlight.train.x", fake, {"moonlight.hf"}))
    assert found[0][:2] == ("moonlight.hf", ["_private"]) and found[0][3] and found[1] == ("os", [], 3, True)


# Edges the layers alone allow but the architecture does not: inference, data preparation and the
# planner stay off the training loop (they share moonlight.data and moonlight.train.build instead).
FORBIDDEN = {
    "moonlight.generate": ("moonlight.train",),
    "moonlight.prepare_data": ("moonlight.train",),
    "moonlight.plan": ("moonlight.train.trainer",),
    "moonlight.data": ("moonlight.train", "moonlight.parallel", "moonlight.model"),
}


def test_forbidden_edges():
    edges, _ = _graph()
    found = [
        f"{m} imports {t}"
        for m, targets in edges.items()
        for t in targets
        for key, banned in FORBIDDEN.items()
        if m == key or m.startswith(key + ".")
        if t.startswith(banned)
    ]
    assert found == []


def test_no_shipped_module_imports_torch_test_utilities():
    """torch.testing._internal is torch's private test code (it changes without notice between releases)."""
    shipped = {**_sources(), "train": ROOT / "train.py"}
    modules = set(shipped)
    found = [
        f"{path.relative_to(ROOT)}:{line}: imports {target}"
        for module, path in shipped.items()
        for target, names, line, _ in _imports(module, path, modules)
        if target.startswith("torch.testing._internal") or (target == "torch.testing" and "_internal" in names)
    ]
    assert found == []


def test_config_layer_is_cheap_to_import():
    """The job config (read by train.py --help, the planner, every tool) imports no model, kernels or
    pipelining: those cost seconds and are not needed to check a config. Of the model package it may
    import the [lora] section's module, which holds no model."""
    code = (
        "import sys, moonlight.train.config; "
        "print(sorted(m for m in sys.modules if m.startswith(('moonlight.model.', 'moonlight.kernels', "
        "'torch.distributed.pipelining', 'moonlight.parallel.pipeline.')) or m == 'moonlight.parallel.pipeline'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "['moonlight.model.lora']"


@pytest.mark.parametrize("entry", ["train.py"])
def test_entry_points_only_reach_down(entry):
    tree = ast.parse((ROOT / entry).read_text())
    targets = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert all(not t.startswith("moonlight") or _layer(t) <= LAYERS["moonlight.convert"] for t in targets)


def test_the_training_step_names_no_model_transform():
    """LoRA/DoRA (and later FP8) are model converters applied once at build time (model/converters.py):
    the step and the loop never name them, and the model recognizes no module by its type."""
    tree = ast.parse((ROOT / "moonlight/train/trainer.py").read_text())
    step = [
        f
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef)
        and f.name in ("train_step", "_forward_backward", "train", "__init__", "_init_full_model")
    ]
    names = [
        n.id if isinstance(n, ast.Name) else n.attr
        for f in step
        for n in ast.walk(f)
        if isinstance(n, (ast.Name, ast.Attribute))
    ]
    assert len(step) == 5 and not [n for n in names if "lora" in n.lower() and n != "lora"], names
    model = (ROOT / "moonlight/model/model.py").read_text()
    assert "type(self." not in model


def test_module_docstrings_are_short():
    """A module docstring says what the module is (and its notation) in at most 12 lines; design
    writing lives in docs/."""
    long = {
        str(p.relative_to(ROOT)): n
        for p in _sources().values()
        for doc in [ast.get_docstring(ast.parse(p.read_text()), clean=False)]
        if doc
        for n in [len(doc.strip("\n").splitlines())]
        if n > 12
    }
    assert long == {}


def _imported_modules(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)


def test_no_test_module_imports_another():
    """Shared test code lives in tests/helpers.py (and tests/dist.py, tests/hf_reference.py); the
    benchmarks use the same helpers."""
    paths = sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
    found = [
        f"{p.relative_to(ROOT)}:{line}"
        for p in paths
        for line, module in _imported_modules(p)
        if module.startswith("tests.") and module.rsplit(".", 1)[-1].startswith("test_")
    ]
    assert found == []


def _spawns_ranks(tree) -> bool:
    """Whether a test module starts other ranks: forked gloo ranks (`run_ranks`, or its own processes
    that each `init_process_group`) or torchrun."""
    return any(
        (isinstance(n, ast.Name) and n.id in ("run_ranks", "init_process_group"))
        or (
            isinstance(n, ast.List)
            and any(isinstance(e, ast.Constant) and e.value == "torch.distributed.run" for e in n.elts)
        )
        for n in ast.walk(tree)
    )


@pytest.mark.parametrize("folder, multi_rank", [("single", False), ("multirank", True)])
def test_tests_sit_in_the_folder_of_their_process_count(folder, multi_rank):
    """tests/single/ runs in one process; every module in tests/multirank/ starts several ranks."""
    misplaced = [
        p.name
        for p in sorted((ROOT / "tests" / folder).glob("test_*.py"))
        if _spawns_ranks(ast.parse(p.read_text())) != multi_rank
    ]
    assert misplaced == []
    assert not list((ROOT / "tests").glob("test_*.py")), "test modules go in tests/single/ or tests/multirank/"
