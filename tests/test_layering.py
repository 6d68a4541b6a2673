"""The package graph reads top-down: comm <- {tensor, pipeline, data_parallel, async_ps,
checkpoint} <- train <- session/run/bench, with no import cycle between mpipar's packages and
modules, nor between its files (built from the source with ast, so nothing is imported), no
argparse Namespace below the command line, and every package's docstring a map of its files."""
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
    found = cycles(graph())
    assert not found, "import cycle: " + found[0]


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


# -------------------------------------------------------------------------------------------------
# Files: one node per .py file (its module name), an edge for every mpipar import in it at any
# depth (imports inside functions count: a lazy import is still an import, and hiding a cycle in
# a function is what this test is here to catch). `from PKG import x` points at module PKG.x when
# x is a module (a file or a package), else at PKG itself (its __init__.py). Importing a module
# also runs its packages' __init__ files, but that is not an edge here: a package __init__ that
# re-exports its own modules is fine as long as those modules never import the __init__ back
# (which would be an edge, and a cycle). The facade, mpipar/__init__.py, is a node like any other:
# it only re-exports from below, and nothing in mpipar imports it, so it needs no exception.
# -------------------------------------------------------------------------------------------------
def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def is_module(name: str) -> bool:
    p = ROOT.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def file_imports(path: Path) -> dict[str, int]:
    """Modules of mpipar that a file imports (at any depth) -> the line of the first such import."""
    me = module_name(path)
    pkg = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    out: dict[str, int] = {}
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom):
            if n.level:
                mod = ".".join(pkg[:len(pkg) - (n.level - 1)] + (n.module.split(".") if n.module else []))
            elif n.module and n.module.split(".")[0] == "mpipar":
                mod = n.module
            else:
                continue
            for a in n.names:
                sub = f"{mod}.{a.name}"
                target = sub if is_module(sub) else mod
                out[target] = min(out.get(target, n.lineno), n.lineno)
        elif isinstance(n, ast.Import):
            for a in n.names:
                if a.name.split(".")[0] == "mpipar":
                    out[a.name] = min(out.get(a.name, n.lineno), n.lineno)
    return out


def file_graph() -> dict[str, dict[str, int]]:
    return {module_name(f): file_imports(f) for f in sorted(ROOT.rglob("*.py"))}


def cycles(g: dict, where=lambda a, b: "") -> list[str]:
    """Each import cycle of graph `g` (node -> the nodes it imports) found, one per edge that closes
    one, as 'a -> b ... -> a' with `where(a, b)` after each node; the shortest first."""
    state, stack, found = {}, [], []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(g.get(v, ())):
            if w == v or state.get(w) == "open":
                ring = stack[stack.index(w):] + [w]
                found.append(" -> ".join(f"{a}{where(a, b)}" for a, b in zip(ring, ring[1:])) + f" -> {w}")
            elif w not in state:
                visit(w)
        stack.pop()
        state[v] = "done"

    for v in sorted(g):
        if v not in state:
            visit(v)
    return sorted(found, key=lambda c: (c.count(" -> "), c))


def file_cycles(g: dict[str, dict[str, int]]) -> list[str]:
    """Each import cycle between files, as 'a (a.py:LINE) -> b ... -> a'."""
    def where(a: str, b: str) -> str:
        path = ROOT.parent.joinpath(*a.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        return f" ({path.relative_to(ROOT.parent)}:{g[a][b]})"

    return cycles(g, where)


def test_file_graph_sees_lazy_and_relative_imports():
    g = file_graph()
    assert "mpipar.comm.mpi" in g["mpipar.comm.world"]                       # from . import messages, mpi
    assert "mpipar.comm.world" in g["mpipar.comm"]                           # from .world import World
    assert "mpipar.comm.devices" in g["mpipar.pipeline.pipe"]                # a lazy `from ..comm import devices`
    assert "mpipar.bench" in g["mpipar.bench.__main__"]                      # import mpipar.bench as pkg
    assert all(w == "mpipar" or is_module(w) for deps in g.values() for w in deps), \
        sorted(w for deps in g.values() for w in deps if not is_module(w))


def test_no_import_cycle_between_files():
    cycles = file_cycles(file_graph())
    assert not cycles, "import cycle between files:\n  " + "\n  ".join(cycles)


# -------------------------------------------------------------------------------------------------
# Every package's docstring is a map of its files: one line per .py file, `    name.py   what it is`,
# and no bare `name.py` in it names a file the package does not have (paths with a / are other
# packages' files and are not checked here).
# -------------------------------------------------------------------------------------------------
MAP_LINE = re.compile(r"^ {2,}(\w+\.py) {2,}\S", re.M)
MENTION = re.compile(r"(?<![\w/.-])(\w+\.py)\b")


def packages() -> list[Path]:
    return sorted(p.parent for p in ROOT.rglob("__init__.py") if p.parent != ROOT)


def test_every_package_docstring_maps_its_files():
    wrong = []
    for pkg in packages():
        doc = ast.get_docstring(ast.parse((pkg / "__init__.py").read_text()), clean=False) or ""
        files = {f.name for f in pkg.glob("*.py")}
        listed = set(MAP_LINE.findall(doc))
        name = pkg.relative_to(ROOT.parent)
        for f in sorted(files - listed - {"__init__.py", "__main__.py"}):
            wrong.append(f"{name}/__init__.py does not list {f}")
        for f in sorted(set(MENTION.findall(doc)) - files):
            wrong.append(f"{name}/__init__.py names {f}, which {name}/ does not have")
    assert not wrong, "\n".join(wrong)
