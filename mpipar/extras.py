"""Optional dependencies: the engine needs torch, numpy and mpi4py only; plots (matplotlib) and
the examples' datasets (pandas, wfdb, torch_geometric) come with `pip install "mpipar[examples]"`.
A missing one stops with one line naming that extra, not an ImportError from deep inside."""
from __future__ import annotations

import importlib
import warnings

from .errors import ConfigError

EXTRA = "examples"
INSTALL = f'pip install "mpipar[{EXTRA}]"'


def need(module: str, what: str):
    """`module` imported (without its deprecation chatter), or a ConfigError saying that `what`
    needs it and which extra installs it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        if e.name is not None and e.name.split(".")[0] != top:
            raise                       # the package is there but broken: its own error says why
        raise ConfigError(f"{what} needs {top}, which is not installed here: {INSTALL} "
                          f"(or pip install {top.replace('_', '-')})") from None


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (plots are written, never shown)."""
    matplotlib = need("matplotlib", "writing plots (PNG)")
    matplotlib.use("Agg")
    return need("matplotlib.pyplot", "writing plots (PNG)")
