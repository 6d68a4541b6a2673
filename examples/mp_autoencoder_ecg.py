"""Model-parallel ECG autoencoder (MIT-BIH 100) split across ranks: Adagrad + MSE, AUC-ROC, scaling table.

An 8-layer autoencoder (6.2 M parameters by default) cut into pipeline stages by the rank map,
trained on normal beats only; the anomaly score of a beat is its reconstruction error, computed
through the pipeline by the last stage (no rank ever holds the whole model), hence the AUC-ROC.

Scalability (ranks vs samples/s, table + PNG), run without mpirun:
    python examples/mp_autoencoder_ecg.py --scaling 1,2,4,8 [--epochs 1 --steps 20 ...]
"""
import re
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ecg_autoencoder as ecg  # noqa: E402

from mpipar.example import Example  # noqa: E402

WIDTHS = "2048,1024,256,32"


def specs(args):
    return ecg.layers(args, WIDTHS)


def after_fit(trainer, train, test, args, log) -> str:
    return ecg.pipeline_auc(trainer, test)[1]


EXAMPLE = Example(
    name="mp-autoencoder-ecg",
    summary="model-parallel ECG autoencoder (MIT-BIH 100) across ranks, Adagrad + MSE, AUC-ROC, scaling table",
    layers=specs,
    data=ecg.data,
    loss=nn.MSELoss,
    optimizer=lambda params, args: torch.optim.Adagrad(params, lr=args.lr),
    task="regression",
    defaults=dict(epochs=4, batch_size=64, lr=0.005, microbatches=4, balance="params"),
    add_args=ecg.add_args,
    after_fit=after_fit,
)


# -- scalability: one mpirun per rank count ----------------------------------------------------

def scaling(counts: list[int], extra: list[str], out: Path) -> list[tuple[int, float, float]]:
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tests"))
    from mpirun import mpirun   # the harness: oversubscribed Open MPI with a hard timeout
    rows = []
    for n in counts:
        p = mpirun(n, "-m", "mpipar.run", "mp-autoencoder-ecg", "--out", str(out / f"np{n}"), *extra, timeout=1800)
        speed = re.search(r"([\d.]+) samples/s;", p.stdout)
        auc = re.search(r"AUC-ROC ([\d.]+)", p.stdout)
        if p.returncode or not speed:
            raise SystemExit(f"{n} ranks failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        rows.append((n, float(speed.group(1)), float(auc.group(1)) if auc else float("nan")))
        print(f"{n} rank(s): {rows[-1][1]:.0f} samples/s, AUC-ROC {rows[-1][2]:.4f}", flush=True)
    return rows


def write_table(rows, out: Path) -> None:
    base = rows[0][1]
    lines = ["| ranks | samples/s | speed-up | AUC-ROC |", "|---:|---:|---:|---:|"]
    lines += [f"| {n} | {s:.0f} | {s / base:.2f} | {a:.4f} |" for n, s, a in rows]
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r[0] for r in rows], [r[1] for r in rows], "o-")
    ax.set_xscale("log", base=2)
    ax.set_xticks([r[0] for r in rows], [str(r[0]) for r in rows])
    ax.set_xlabel("ranks (pipeline stages)")
    ax.set_ylabel("training samples/s")
    ax.set_title("mp-autoencoder-ecg scaling")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)
    print(f"wrote {out / 'scaling.md'} and {out / 'scaling.png'}")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="scalability table: ranks vs samples/s")
    ap.add_argument("--scaling", default="1,2,4,8")
    ap.add_argument("--out", default="runs/mp-autoencoder-ecg/scaling")
    opts, rest = ap.parse_known_args()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    write_table(scaling([int(v) for v in opts.scaling.split(",")], rest, out), out)
