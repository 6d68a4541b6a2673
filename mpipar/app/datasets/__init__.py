"""Dataset loaders for the examples: real data vendored in examples/data (or --data-dir), as plain tensors.

Each loader takes data_dir=None (the shipped copy) and raises mpipar.errors.DataError with one line
when files are missing or garbled. torch_geometric and wfdb are imported only by the loaders that need them.

    common.py         the Split container, path lookup and one-line errors the loaders share
    cache.py          loaded data kept once per process, keyed by exactly what determines it
    synthetic.py      a deterministic, learnable regression set (no files)
    numbers.py        numbers-to-words, a toy translation task (no files)
    cifar10.py        CIFAR-10: the shipped 10,000 test JPEGs, or the official python batches
    appliances.py     UCI Appliances energy readings as forecasting windows
    temperature.py    NAB temperature streams with labelled failure windows
    stream.py         a recorded series replayed as timestamped readings; the prequential loop
    accelerometer.py  BasicMotions IMU windows and WISDM phone-accelerometer features
    ecg.py            an MIT-BIH record cut into per-beat windows
    cora.py           the Cora citation graph (Planetoid split)
    cora_parts.py     Cora cut into sub-graphs (cluster-GCN style), each one sample
    ppi.py            PPI graphs, or a synthetic stand-in of the same shape
    qm9.py            QM9 small molecules as 3-D graphs
    shakespeare.py    Shakespeare's works, character level, validation on held-out works
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
