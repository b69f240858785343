"""The package's structure, checked from its source: imports point one way (no cycle between
any two modules, the config tree imports nothing else of the package), one module writes the
process environment, one module reaches into DeepSpeed's internals."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "aion_train"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imported(name: str, path: Path, node, mods) -> set[str]:
    """The package's modules an import statement loads (`from pkg import name` counts as the
    module pkg.name when that is a module, else pkg itself); imports inside functions count."""
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            pkg = pkg[: len(pkg) - node.level + 1]
            base = ".".join(pkg + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = set()
    for t in targets:
        while t and t not in mods:
            t = t.rpartition(".")[0]
        if t.startswith("aion_train") and t != name:
            out.add(t)
    return out


def import_graph(mods=None) -> dict[str, set[str]]:
    mods = mods or _modules()
    graph = defaultdict(set)
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name] |= _imported(name, path, node, mods)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in list(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_any_two_modules():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_config_tree_imports_nothing_else_of_the_package():
    graph = import_graph()
    outside = {
        (m, t)
        for m, ts in graph.items()
        if m.startswith("aion_train.config")
        for t in ts
        if not t.startswith("aion_train.config")
    }
    assert not outside, sorted(outside)


def _environ_writes(path: Path) -> list[int]:
    """Lines that write os.environ: item assignment or deletion, setdefault/update/pop/clear,
    os.putenv / os.unsetenv."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
        for t in targets:
            if isinstance(t, ast.Subscript) and ast.unparse(t.value) in ("os.environ", "environ"):
                lines.append(node.lineno)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner, attr = ast.unparse(node.func.value), node.func.attr
            if (owner in ("os.environ", "environ") and attr in ("setdefault", "update", "pop", "popitem", "clear")) or (
                owner == "os" and attr in ("putenv", "unsetenv")
            ):
                lines.append(node.lineno)
    return lines


def test_the_environ_write_finder_sees_every_form(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(
        "import os\nos.environ['A'] = '1'\nos.environ.setdefault('B', '2')\nos.environ.update(C='3')\n"
        "os.putenv('D', '4')\ndel os.environ['A']\nx = os.environ.get('E')\n"
    )
    assert sorted(_environ_writes(f)) == [2, 3, 4, 5, 6]


def test_only_the_process_env_module_writes_the_environment():
    writers = {p.relative_to(PKG.parent).as_posix(): lines for p in PKG.rglob("*.py") if (lines := _environ_writes(p))}
    assert set(writers) == {"aion_train/process_env.py"}, writers


def test_deepspeed_internals_are_reached_only_from_the_adapter():
    """Modules that import DeepSpeed: the adapter, and the MoE benchmark (DeepSpeed's public MoE
    layer is what it compares against)."""
    allowed = {"aion_train/parallel/deepspeed_adapter.py", "aion_train/bench/moe.py"}
    users = set()
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            if any(n == "deepspeed" or n.startswith("deepspeed.") for n in names):
                users.add(path.relative_to(PKG.parent).as_posix())
    assert users <= allowed, sorted(users - allowed)


def test_every_deepspeed_internal_the_adapter_uses_exists():
    pytest.importorskip("deepspeed")
    from aion_train.parallel import deepspeed_adapter as ad

    assert ad.missing_internals() == [], (
        "DeepSpeed changed the internals aion_train/parallel/deepspeed_adapter.py relies on"
    )
    # and the check does see a missing one
    planted = ad.INTERNALS + (("deepspeed.utils.groups", "_NO_SUCH_REGISTRY"),)
    original = ad.INTERNALS
    try:
        ad.INTERNALS = planted
        missing = ad.missing_internals()
    finally:
        ad.INTERNALS = original
    assert len(missing) == 1 and missing[0].startswith("deepspeed.utils.groups:_NO_SUCH_REGISTRY")
