"""Model-parallel ECG autoencoder (MIT-BIH 100) split across ranks: Adagrad + MSE, AUC-ROC, scaling table.

An 8-layer autoencoder (6.2 M parameters by default) cut into pipeline stages by the rank map,
trained on normal beats only; the anomaly score of a beat is its reconstruction error, computed
through the pipeline by the last stage (no rank ever holds the whole model), hence the AUC-ROC.

Scalability (ranks vs samples/s, table + PNG), run without mpirun: each rank count runs as
--trials separate jobs (default 3); a job's rate comes from its median step time, so warm-up
steps do not count; the table gives the median and the min..max over trials:
    python examples/mp_autoencoder_ecg.py --scaling 1,2,4,8 [--trials 3] [--epochs 1 --steps 20 ...]
"""
import re
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ecg_autoencoder as ecg  # noqa: E402

from mpipar.app.example import Example  # noqa: E402
from mpipar.extras import pyplot  # noqa: E402

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


# -- scalability: one mpirun per rank count and trial -------------------------------------------

def scaling(counts: list[int], trials: int, extra: list[str], out: Path) -> list[dict]:
    """Per rank count, `trials` separate jobs; each job's rate is its samples per step over its
    median step time (so the first, warm-up steps do not count); median and spread over trials."""
    import json
    import statistics
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tests"))
    from mpirun import mpirun   # the harness: oversubscribed ranks with a hard timeout
    rows = []
    for n in counts:
        rates, aucs = [], []
        for t in range(trials):
            run = out / f"np{n}-trial{t + 1}"
            p = mpirun(n, "-m", "mpipar.run", "mp-autoencoder-ecg", "--out", str(run), *extra, timeout=1800)
            auc = re.search(r"AUC-ROC ([\d.]+)", p.stdout)
            if p.returncode or not (run / "metrics.jsonl").is_file():
                raise SystemExit(f"{n} ranks failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
            last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
            per_step = last["samples_per_s"] / last["steps_per_s"]
            rates.append(per_step / (last["step_ms_p50"] / 1e3))
            aucs.append(float(auc.group(1)) if auc else float("nan"))
            print(f"{n} rank(s), trial {t + 1}: {rates[-1]:.0f} samples/s (median step {last['step_ms_p50']:.1f} ms), "
                  f"AUC-ROC {aucs[-1]:.4f}", flush=True)
        rows.append({"ranks": n, "median": statistics.median(rates), "low": min(rates), "high": max(rates),
                     "auc": statistics.median(aucs), "trials": trials})
    return rows


def write_table(rows, out: Path) -> None:
    base = rows[0]["median"]
    lines = [f"| ranks | samples/s (median of {rows[0]['trials']}) | min..max | speed-up | AUC-ROC |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['ranks']} | {r['median']:.0f} | {r['low']:.0f}..{r['high']:.0f} | {r['median'] / base:.2f} | "
              f"{r['auc']:.4f} |" for r in rows]
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [r["ranks"] for r in rows]
    ax.errorbar(x, [r["median"] for r in rows], yerr=[[r["median"] - r["low"] for r in rows],
                                                     [r["high"] - r["median"] for r in rows]], fmt="o-", capsize=4)
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(n) for n in x])
    ax.set_xlabel("ranks (pipeline stages)")
    ax.set_ylabel("training samples/s (median step)")
    ax.set_title(f"mp-autoencoder-ecg scaling (median, min..max of {rows[0]['trials']})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)
    print(f"wrote {out / 'scaling.md'} and {out / 'scaling.png'}")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="scalability table: ranks vs samples/s")
    ap.add_argument("--scaling", default="1,2,4,8")
    ap.add_argument("--trials", type=int, default=3, help="separate jobs per rank count (median, min..max)")
    ap.add_argument("--out", default="runs/mp-autoencoder-ecg/scaling")
    opts, rest = ap.parse_known_args()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    write_table(scaling([int(v) for v in opts.scaling.split(",")], opts.trials, rest, out), out)
