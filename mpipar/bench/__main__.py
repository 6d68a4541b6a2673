"""Dispatch `python -m mpipar.bench NAME ...` to mpipar.bench.NAME.main(argv)."""
import importlib
import pkgutil
import sys

import mpipar.bench as pkg

ALIASES = {"async": "async_ps", "allreduce-hosts": "allreduce_hosts", "dp-step": "dp_step", "dp-gpt": "dp_gpt"}   # names that cannot be module names


def names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def main() -> int:
    if len(sys.argv) >= 2:
        sys.argv[1] = ALIASES.get(sys.argv[1], sys.argv[1])
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help") or sys.argv[1] not in names():
        print(f"usage: mpirun -np N python -m mpipar.bench {{{'|'.join(names())}}} [flags]")
        return 0 if len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help") else 2
    mod = importlib.import_module(f"mpipar.bench.{sys.argv[1]}")
    return mod.main(sys.argv[2:]) or 0


sys.exit(main())
