"""What `pip install mpipar` brings: the engine needs torch, numpy and mpi4py only; the examples'
dependencies come with the [examples] extra, and a missing one is a one-line error naming it; a
non-editable install carries every package and the examples (checked from setup.cfg and the
source, nothing built here; the README's note quotes a fresh-venv install)."""
import ast
import configparser
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mpipar"
ENGINE_DEPS = {"torch", "numpy", "mpi4py"}
EXAMPLE_DEPS = {"pandas", "torch_geometric", "wfdb", "matplotlib"}


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def requirement_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("%("):
            names.add(line.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().replace("-", "_"))
    return names


def test_the_engine_requires_torch_numpy_mpi4py_only_and_examples_is_an_extra():
    cfg = setup_cfg()
    assert requirement_names(cfg["options"]["install_requires"]) == ENGINE_DEPS
    assert requirement_names(cfg["options.extras_require"]["examples"]) == EXAMPLE_DEPS


def test_every_package_is_installed_and_the_examples_with_their_data():
    cfg = setup_cfg()
    listed = set(cfg["options"]["packages"].split())
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in PKG.rglob("__init__.py")}
    assert on_disk <= listed, f"setup.cfg [options] packages misses {sorted(on_disk - listed)}"
    assert "mpipar.app.examples = examples" in cfg["options"]["package_dir"]
    assert (ROOT / "examples" / "__init__.py").is_file() and "mpipar.app.examples" in listed
    data = cfg["options.package_data"]["mpipar.app.examples"]
    deepest = max(len(p.relative_to(ROOT / "examples").parts) for p in (ROOT / "examples" / "data").rglob("*")
                  if p.is_file())
    assert f"data/{'*/' * (deepest - 2)}*" in data, f"package_data does not reach {deepest} levels deep: {data}"


def _top_level_imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (inside functions too)."""
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            out.update(a.name.split(".")[0] for a in n.names)
        elif isinstance(n, ast.ImportFrom) and not n.level and n.module:
            out.add(n.module.split(".")[0])
    return out


def test_no_module_imports_an_optional_dependency_directly():
    """matplotlib, pandas, wfdb and torch_geometric come only through extras.need (one line naming
    the extra when missing), anywhere in mpipar or the examples: the engine must import without them, and the
    app must say what to install rather than raise an ImportError from deep inside."""
    allowed = ENGINE_DEPS | set(sys.stdlib_module_names) | {"mpipar"}
    bad = []
    for f in [*PKG.rglob("*.py"), *(ROOT / "examples").glob("*.py")]:
        extra = _top_level_imports(f) - allowed
        if extra & EXAMPLE_DEPS:
            bad.append(f"{f.relative_to(ROOT)}: {sorted(extra & EXAMPLE_DEPS)}")
    assert not bad, bad


def test_a_missing_optional_dependency_is_one_line_naming_the_extra():
    from mpipar.errors import ConfigError
    from mpipar.extras import need
    with pytest.raises(ConfigError) as e:
        need("mpipar_no_such_module_xyz", "the qm9 example")
    msg = str(e.value)
    assert "\n" not in msg and 'pip install "mpipar[examples]"' in msg and "the qm9 example" in msg


def test_examples_and_data_are_found_outside_a_checkout(tmp_path, monkeypatch):
    """As installed (mpipar/app/examples present) the installed copy wins; $MPIPAR_DATA points
    the loaders at full datasets, and a missing one names where it looked."""
    from mpipar.app import places
    from mpipar.app.datasets import load_appliances
    from mpipar.errors import DataError
    installed = tmp_path / "site" / "examples"
    installed.mkdir(parents=True)
    (installed / "mlp.py").write_text('"""x"""\n')
    monkeypatch.setattr(places, "INSTALLED", installed)
    assert places.examples_dir() == installed
    monkeypatch.setenv(places.DATA_ENV, str(tmp_path / "full"))
    assert places.data_dir("cora") == tmp_path / "full" / "cora"
    with pytest.raises(DataError) as e:
        load_appliances()
    assert str(tmp_path / "full" / "appliances") in str(e.value) and "\n" not in str(e.value)
