"""mpipar: an MPI-native parallelism engine for PyTorch training (pipeline, tensor and data
parallelism over mpi4py communicators)."""
__version__ = "0.1.0"
