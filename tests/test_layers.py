"""The package's layers, enforced: a lower layer never imports a higher one, no two files import
each other (directly or round a longer loop), and no private name crosses a module boundary.

Layers, bottom to top (docs/development.md):

0. foundation: errors, configuration, file writing, console output, the local-Ray helper (``cluster.errors``,
   ``cluster.config``, ``cluster.serve_config``, ``cluster.files``, ``cluster.local``);
1. ``trainers``: models, data, losses, training, evaluation, mining;
2. ``tune`` and ``serve``, independent of each other;
3. the CLI, job submission and cluster management (``cluster.cli``, ``cluster.jobs``,
   ``cluster.multinode``, ``cluster.retry``).

Imports inside functions count: a lazy import is still a dependency. Pure AST, no import runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cluster", "trainers", "tune", "serve")
FOUNDATION = {"cluster.__init__", "cluster.errors", "cluster.config", "cluster.serve_config", "cluster.config_reference",
              "cluster.console", "cluster.files", "cluster.storage",
              "cluster.local"}
TOP = {"cluster.cli", "cluster.jobs", "cluster.multinode", "cluster.retry"}


def layer(module: str) -> int:
    if module in FOUNDATION:
        return 0
    if module in TOP:
        return 3
    package = module.split(".")[0]
    if package == "trainers":
        return 1
    if package in ("tune", "serve"):
        return 2
    raise AssertionError(f"{module} has no layer: add it to FOUNDATION or TOP in tests/test_layers.py "
                         "(and to the table in docs/development.md)")


def modules() -> dict[str, Path]:
    return {f"{p}.{f.stem}": f for p in PACKAGES for f in sorted((ROOT / p).glob("*.py"))}


def imports(module: str, path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every Negatron import in the file."""
    package = module.split(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within the same package
                base = f"{package}.{node.module}" if node.module else package
            elif node.module and node.module.startswith("negatron."):
                base = node.module[len("negatron."):]
            else:
                continue
            names = [a.name for a in node.names]
            if base in PACKAGES:  # `from negatron.trainers import encoder`
                out += [(f"{base}.{n}", [], node.lineno) for n in names if f"{base}.{n}" in known]
            elif base in known:
                out.append((base, names, node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                name = a.name[len("negatron."):] if a.name.startswith("negatron.") else None
                if name in known:
                    out.append((name, [], node.lineno))
    return out


def graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, list[str], int]]]]:
    mods = modules()
    known = set(mods)
    return mods, {m: [i for i in imports(m, p, known) if i[0] != m] for m, p in mods.items()}


def test_every_module_has_a_layer():
    for m in modules():
        layer(m)


def test_no_lower_layer_imports_a_higher_one():
    mods, edges = graph()
    bad = [f"{mods[m].relative_to(ROOT)}:{line} ({m}, layer {layer(m)}) imports {dep} (layer {layer(dep)})"
           for m, deps in edges.items() for dep, _, line in deps if layer(dep) > layer(m)]
    assert not bad, "layer violations:\n" + "\n".join(bad)


def test_tune_and_serve_are_independent():
    mods, edges = graph()
    bad = [f"{mods[m].relative_to(ROOT)}:{line} imports {dep}" for m, deps in edges.items() for dep, _, line in deps
           if {m.split(".")[0], dep.split(".")[0]} == {"tune", "serve"}]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_files():
    _, edges = graph()
    adj = {m: sorted({d for d, _, _ in deps}) for m, deps in edges.items()}
    # Tarjan's strongly connected components: any component of 2+ files is a cycle
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in adj[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            comps.append(comp)

    for v in adj:
        if v not in index:
            visit(v)
    cycles = [sorted(c) for c in comps if len(c) > 1]
    assert not cycles, f"files that import each other: {cycles}"


def test_no_private_name_is_imported_across_modules():
    mods, edges = graph()
    bad = [f"{mods[m].relative_to(ROOT)}:{line} takes {n} from {dep}" for m, deps in edges.items()
           for dep, names, line in deps for n in names if n.startswith("_")]
    assert not bad, "private helpers imported across modules:\n" + "\n".join(bad)


def test_the_checker_sees_violations(tmp_path):
    """The contract is not vacuous: a planted upward import, cycle and private import are found."""
    for p in PACKAGES:
        (tmp_path / p).mkdir()
    (tmp_path / "cluster" / "config.py").write_text("from negatron.serve.app import start\n")
    (tmp_path / "serve" / "app.py").write_text("from negatron.cluster.config import _hidden\ndef start(): pass\n")
    globals()["ROOT"], saved = tmp_path, ROOT
    try:
        mods, edges = graph()
        assert ("serve.app", ["start"], 1) in edges["cluster.config"]
        with pytest.raises(AssertionError, match="layer violations"):
            test_no_lower_layer_imports_a_higher_one()
        with pytest.raises(AssertionError, match="import each other"):
            test_no_import_cycle_between_files()
        with pytest.raises(AssertionError, match="_hidden"):
            test_no_private_name_is_imported_across_modules()
    finally:
        globals()["ROOT"] = saved


def test_model_kinds_are_compared_only_in_the_task_registry_and_the_schema():
    """`cfg.model.kind == "image"` branches belong in trainers/tasks.py (or the config schema's own
    cross-key checks): everywhere else asks the task."""
    from negatron.trainers.tasks import TASKS

    allowed = {"trainers.tasks", "cluster.config"}
    bad = []
    for m, path in modules().items():
        if m in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            consts = [n.value for side in (node.left, *node.comparators) for n in ast.walk(side)
                      if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            hits = [c for c in consts if c in TASKS]
            if hits:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} compares with {hits}")
    assert not bad, "model-kind branches outside the task registry:\n" + "\n".join(bad)
