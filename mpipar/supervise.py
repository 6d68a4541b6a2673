"""`python -m mpipar.supervise ...`: the relaunching supervisor (mpipar/app/supervise.py)."""
import sys

from .app.supervise import main

if __name__ == "__main__":
    sys.exit(main())
