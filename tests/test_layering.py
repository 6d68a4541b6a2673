"""The package graph reads top-down: comm <- {tensor, pipeline, data_parallel, async_ps,
checkpoint} <- train <- session/run/bench, with no import cycle between mpipar's packages and
modules (built from the source with ast, so nothing is imported), and no argparse Namespace
below the command line."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "mpipar"
LAYER = {"errors": 0, "callbacks": 0, "version": 0, "extras": 0.5, "comm": 1, "launcher": 1, "rankmap": 1,
         "topology": 2, "tensor": 3, "data_parallel": 3, "checkpoint": 3, "async_ps": 4,
         "model": 4, "profile": 5, "pipeline": 6, "train": 7, "app": 8, "run": 10, "supervise": 10,
         "bench": 11, "__main__": 12}


def node(path: Path) -> str:
    """The graph's node of a file: its subpackage, or the top-level module's name."""
    rel = path.relative_to(ROOT).parts
    return rel[0] if len(rel) > 1 else rel[0][:-3]


def imports(path: Path) -> set[str]:
    """mpipar nodes a file imports (at any depth: lazy imports count too)."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    pkg = list(rel[:-1]) if rel[-1] != "__init__" else list(rel[:-1])
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom):
            if n.level:
                base = pkg[:len(pkg) - (n.level - 1)] if n.level > 1 else pkg
                parts = base + (n.module.split(".") if n.module else [])
            elif n.module and n.module.split(".")[0] == "mpipar":
                parts = n.module.split(".")[1:]
            else:
                continue
            targets = [parts[0]] if parts else [a.name for a in n.names]
            out.update(targets)
        elif isinstance(n, ast.Import):
            out.update(a.name.split(".")[1] for a in n.names if a.name.startswith("mpipar."))
    return out


def graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for f in ROOT.rglob("*.py"):
        if f == ROOT / "__init__.py":   # the facade: it re-exports the public API from the layers
            continue
        src = node(f)
        g.setdefault(src, set()).update(t for t in imports(f) if t != src)
    return g


def test_every_node_has_a_layer():
    assert set(graph()) <= set(LAYER), set(graph()) - set(LAYER)


def test_no_import_cycle():
    g = graph()
    state, stack = {}, []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(g.get(v, ())):
            if state.get(w) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(w):] + [w]))
            if w not in state:
                visit(w)
        stack.pop()
        state[v] = "done"

    for v in sorted(g):
        if v not in state:
            visit(v)


def test_imports_only_go_down_the_layers():
    bad = [f"{a} -> {b}" for a, deps in graph().items() for b in deps if LAYER.get(b, 99) >= LAYER[a]
           and not (LAYER[a] == LAYER.get(b) and a != b and {a, b} <= {"tensor", "data_parallel", "checkpoint"})]
    assert not bad, bad


def test_no_argparse_namespace_below_the_command_line():
    found = []
    for pkg in ("comm", "pipeline", "tensor", "data_parallel", "checkpoint", "async_ps", "train"):
        for f in (ROOT / pkg).rglob("*.py"):
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if re.search(r"\bargs\.|getattr\(args|import argparse", line) and pkg != "data_parallel" \
                        or (pkg == "data_parallel" and re.search(r"\bargs\.", line)):
                    found.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not found, "\n".join(found)


def test_importing_mpipar_sets_no_environment_and_starts_no_mpi():
    import os
    import subprocess
    import sys
    code = ("import os; before = dict(os.environ); import mpipar, sys; "
            "from mpi4py import MPI; print(dict(os.environ) == before, MPI.Is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if not k.startswith("OMPI_MCA_osc")})
    assert out.stdout.split() == ["True", "False"], out.stdout + out.stderr
