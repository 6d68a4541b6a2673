"""Shared by the ECG autoencoder examples: beat windows, the layer list, anomaly scores, AUC-ROC.
(A leading underscore keeps it out of the example list.)"""
from __future__ import annotations

import torch
from torch import nn

from mpipar.app.datasets.common import Split
from mpipar.app.datasets.ecg import load_ecg_beats, split_normal_train
from mpipar.model import LayerSpec


def add_args(p) -> None:
    p.add_argument("--record", default="100", help="MIT-BIH record name (100 is shipped; others need "
                                                   "their .hea/.dat/.atr in --data-dir)")
    p.add_argument("--window", default="250,110",
                   help="samples before,after each R peak (250 before reaches the previous beat: prematurity shows)")
    p.add_argument("--test-fraction", type=float, default=0.3, help="normal beats held out for the test set")
    p.add_argument("--widths", default=None, help="hidden widths of the encoder, e.g. 128,32 (decoder mirrors)")


def window(args) -> tuple[int, int]:
    before, after = (int(v) for v in args.window.split(","))
    return before, after


def data(args):
    """Train: normal beats only (x is its own target). Test: held-out normal + every abnormal
    beat, labels kept in meta['labels'] for the AUC."""
    beats = load_ecg_beats(args.data_dir, window=window(args), record=args.record)
    train, test = split_normal_train(beats, args.test_fraction, args.seed)
    return (Split(train.x, train.x, train.note),
            Split(test.x, test.x, test.note, {"labels": test.y, **test.meta}))


def layers(args, default_widths: str) -> list[LayerSpec]:
    """enc1..encK, then dec1..decK, the last one linear: widths mirror around the code."""
    n_in = sum(window(args))
    widths = [int(w) for w in (args.widths or default_widths).split(",")]
    dims = [n_in, *widths, *reversed(widths[:-1]), n_in]
    k = len(widths)
    specs = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        name = f"enc{i + 1}" if i < k else f"dec{i - k + 1}"
        last = i == len(dims) - 2
        build = (lambda a=a, b=b: nn.Linear(a, b)) if last else (lambda a=a, b=b: nn.Sequential(nn.Linear(a, b), nn.ReLU()))
        specs.append(LayerSpec(name, build))
    return specs


@torch.no_grad()
def anomaly_scores(model: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Reconstruction error per beat (mean squared error over the window)."""
    model.eval()
    return torch.cat([((model(x[i:i + batch]) - x[i:i + batch]) ** 2).mean(1) for i in range(0, len(x), batch)])


def auc_roc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve = P(score of a random abnormal > score of a random normal), ties
    counting half (the Mann-Whitney U statistic from average ranks)."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    pos = torch.as_tensor(labels).flatten().bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(s)
    _, inverse, counts = torch.unique_consecutive(s[order], return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    ranks = torch.empty_like(s)
    ranks[order] = (ends - (counts.double() - 1) / 2)[inverse]
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def report_auc(model: nn.Module, test: Split) -> tuple[float, str]:
    scores = anomaly_scores(model, test.x)
    labels = test.meta["labels"]
    auc = auc_roc(scores, labels)
    return auc, (f"AUC-ROC {auc:.4f} (anomaly score = reconstruction error; {int(labels.sum())} abnormal vs "
                 f"{int((labels == 0).sum())} normal test beats)")


@torch.no_grad()
def pipeline_auc(trainer, test: Split, batch: int = 256) -> tuple[float, str]:
    """AUC-ROC computed where the model lives: the test beats go through the pipeline, the last
    stage scores them, the reporting rank's number reaches every rank (call on every rank)."""
    scores = []
    trainer.module.eval()
    for i in range(0, len(test.x), batch):
        x = test.x[i:i + batch]
        trainer.pipe.forward_only(x, x, lambda mb, out, x=x: scores.append(((out - x) ** 2).mean(1)))
    trainer.module.train()
    auc = auc_roc(torch.cat(scores), test.meta["labels"]) if scores else float("nan")
    auc = float(trainer.topo.world.allgather_floats([auc])[trainer.topo.reporter][0])
    labels = test.meta["labels"]
    return auc, (f"AUC-ROC {auc:.4f} (anomaly score = reconstruction error; {int(labels.sum())} abnormal vs "
                 f"{int((labels == 0).sum())} normal test beats)")
