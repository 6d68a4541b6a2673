"""Dataset loaders for the examples: real data vendored in examples/data (or --data-dir), as plain tensors.

Each loader takes data_dir=None (the shipped copy) and raises mpipar.errors.DataError with one line
when files are missing or garbled. torch_geometric and wfdb are imported only by the loaders that need them.
"""
from .accelerometer import load_basicmotions, load_wisdm
from .appliances import load_appliances, persistence_rmse, rmse_wh
from .cifar10 import CLASSES as CIFAR10_CLASSES
from .cifar10 import load_cifar10, read_image_folder, read_python_batch
from .common import Split
from .cora import load_cora
from .ecg import load_ecg_beats, split_normal_train
from .qm9 import load_qm9, mean_baseline_mae, split_qm9
from .synthetic import regression
from .temperature import anomaly_windows, load_temperature_stream, windows

__all__ = [
    "Split", "CIFAR10_CLASSES", "load_cifar10", "read_python_batch", "read_image_folder",
    "regression", "load_appliances", "persistence_rmse", "rmse_wh", "load_cora",
    "load_ecg_beats", "split_normal_train", "load_basicmotions", "load_wisdm",
    "load_temperature_stream", "anomaly_windows", "windows",
    "load_qm9", "split_qm9", "mean_baseline_mae",
]
