"""`python -m mpipar.run EXAMPLE [flags]`: the command-line app (mpipar/app/run.py)."""
import sys

from .app.run import main

if __name__ == "__main__":
    sys.exit(main())
