"""Where the examples and their data are, in a checkout and after `pip install`.

A non-editable install carries the examples (and the small vendored datasets) as
`mpipar/app/examples` (setup.cfg maps the checkout's `examples/` there); a checkout or an
editable install reads `examples/` beside `mpipar/`. Full datasets that are not shipped are read
from `--data-dir`, or from `$MPIPAR_DATA/<dataset>` when that variable is set.
"""
from __future__ import annotations

import os
from pathlib import Path

INSTALLED = Path(__file__).resolve().parent / "examples"
CHECKOUT = Path(__file__).resolve().parents[2] / "examples"
DATA_ENV = "MPIPAR_DATA"


def examples_dir() -> Path:
    """The installed copy when there is one (a site-packages may hold someone else's top-level
    'examples'), else the checkout's."""
    return INSTALLED if (INSTALLED / "mlp.py").is_file() else CHECKOUT


def data_dir(dataset: str) -> Path:
    """Where a dataset is read from when no --data-dir is given: $MPIPAR_DATA/<dataset>, else the
    copy shipped with the examples."""
    root = os.environ.get(DATA_ENV)
    return Path(root).expanduser() / dataset if root else examples_dir() / "data" / dataset
