"""Finds examples: `examples/<name with _>.py` defining EXAMPLE (in a checkout or as installed:
places.examples_dir), or any .py path given instead."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import ConfigError
from .places import examples_dir as _examples_dir


def available(examples_dir: Path | None = None) -> list[str]:
    """Example names, read from file names (nothing imported, so --list is instant)."""
    examples_dir = examples_dir or _examples_dir()
    if not examples_dir.is_dir():
        return []
    return sorted(p.stem.replace("_", "-") for p in examples_dir.glob("*.py") if not p.stem.startswith("_"))


def path_of(name: str, examples_dir: Path | None = None) -> Path:
    examples_dir = examples_dir or _examples_dir()
    if name.endswith(".py"):
        p = Path(name)
        if not p.is_file():
            raise ConfigError(f"example file {name} does not exist")
        return p
    p = examples_dir / f"{name.replace('-', '_')}.py"
    if not p.is_file():
        names = ", ".join(available(examples_dir)) or "(none found)"
        raise ConfigError(f"unknown example {name!r}; available: {names} (python -m mpipar.run --list)")
    return p


def load(name: str, examples_dir: Path | None = None):
    examples_dir = examples_dir or _examples_dir()
    p = path_of(name, examples_dir)
    spec = importlib.util.spec_from_file_location(f"mpipar_example_{p.stem}", p)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "EXAMPLE"):
        raise ConfigError(f"{p} defines no EXAMPLE = mpipar.app.example.Example(...)")
    return mod.EXAMPLE


def summaries(examples_dir: Path | None = None) -> list[tuple[str, str]]:
    """(name, first docstring line) for --list, read from the files' text."""
    examples_dir = examples_dir or _examples_dir()
    out = []
    for name in available(examples_dir):
        text = path_of(name, examples_dir).read_text()
        doc = text.split('"""')[1].strip().splitlines()[0] if text.startswith('"""') else ""
        out.append((name, doc))
    return out


def variant(base: str, *, defaults: dict | None = None, **changes):
    """Another example's model, data, loss and optimizer under a new name and plan: e.g. the
    data-parallel twin of a model-parallel example differs only in its default --grid."""
    import dataclasses
    ex = load(base)
    return dataclasses.replace(ex, defaults={**ex.defaults, **(defaults or {})}, **changes)
