"""mpipar: an MPI-native parallelism engine for PyTorch training (pipeline, tensor and data
parallelism over mpi4py communicators)."""
__version__ = "0.1.0"

import os as _os

# Shared-memory windows (the one-host all-reduce) are osc/sm's job; Open MPI's osc/ucx, tried
# first by the PyPI wheel, prints an error on hosts without UCX devices before falling back.
# Set OMPI_MCA_osc yourself to choose otherwise (read once, when MPI starts).
_os.environ.setdefault("OMPI_MCA_osc", "^ucx")
