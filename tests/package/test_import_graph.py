"""The package's import graph, read from its sources: no cycles, and each
layer imports only its own layer and those below (docs/design.md). Every
module also imports on its own in a fresh interpreter."""
import ast
import fnmatch
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "llcfast"
EXTENSIONS = {"llcfast._C"}  # compiled modules, which import nothing of ours

# lowest first; a module may import from its own layer and every layer before it
LAYERS = [("base", ["llcfast._ext", "llcfast._build_choice", "llcfast._checks", "llcfast._C"]),
          ("ops", ["llcfast.ops", "llcfast.twins", "llcfast.twins.*"]),
          ("fastpath", ["llcfast.fastpath", "llcfast.fastpath.*"]),
          ("engine", ["llcfast.engine", "llcfast.engine.*"]),
          ("estimate", ["llcfast.estimate", "llcfast.estimate.*"]),
          ("landscape", ["llcfast.landscape", "llcfast.landscape.*"]),
          ("pipeline", ["llcfast.pipeline", "llcfast.pipeline.*"]),
          ("public", ["llcfast", "llcfast.reference", "llcfast.devinterp", "llcfast.cli"])]


def modules() -> dict:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: pathlib.Path, known) -> set:
    """The modules of ours that ``name`` imports anywhere in its source (in
    functions too): ``from X import y`` counts as X.y where that is a module,
    else as X (whose __init__ runs)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["_LAZY"]:
            targets = [v.value for v in node.value.values]  # a package's names loaded on first use
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # "import a.b.c" of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict:
    found = modules()
    known = set(found) | EXTENSIONS
    return {name: imports(name, path, known) for name, path in found.items()}


def layer_of(name: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return i
    raise AssertionError(f"{name} is in no layer of tests/package/test_import_graph.py's LAYERS")


def cycles(edges: dict) -> list:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_every_module_is_in_a_layer_and_imports_only_its_layer_and_below():
    edges = graph()
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in sorted(edges.items()) for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert upward == []


def test_the_graph_sees_relative_and_function_local_imports(tmp_path):
    pkg = tmp_path / "llcfast"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .a import x\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from .. import ops\n")
    (pkg / "ops.py").write_text("from .sub import a\n")
    known = {"llcfast", "llcfast.sub", "llcfast.sub.a", "llcfast.ops"}
    assert imports("llcfast.sub.a", pkg / "sub" / "a.py", known) == {"llcfast.ops"}
    assert imports("llcfast.ops", pkg / "ops.py", known) == {"llcfast.sub.a"}
    assert imports("llcfast.sub", pkg / "sub" / "__init__.py", known) == {"llcfast.sub.a"}
    (pkg / "__init__.py").write_text('_LAZY = {"f": "llcfast.sub.a", "ops": "llcfast.ops"}\n')
    assert imports("llcfast", pkg / "__init__.py", known) == {"llcfast.sub.a", "llcfast.ops"}


FRESH_IMPORTS = """
import os, sys, traceback
import torch, numpy  # loaded once: each child below starts with no module of ours
failed, running, names = [], {}, sys.argv[1:]
while names or running:
    while names and len(running) < (os.cpu_count() or 1):
        name = names.pop()
        pid = os.fork()
        if pid == 0:
            try:
                __import__(name)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        running[pid] = name
    pid, status = os.wait()
    if os.waitstatus_to_exitcode(status) != 0:
        failed.append(running[pid])
    del running[pid]
print("FAILED", failed)
sys.exit(1 if failed else 0)
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_each_module_imports_first_in_a_fresh_process():
    """Each module imported first, in a process that has loaded none of
    ours (a fork of one that imported only torch and numpy): a cycle that
    only bites from some entry point ("partially initialized module") fails
    here."""
    names = sorted(modules())
    assert "llcfast.estimate.sequential" in names and "llcfast.twins.sgld" in names
    done = subprocess.run([sys.executable, "-c", FRESH_IMPORTS, *names], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-500:] + done.stderr[-3000:]
