"""Per-rank observability: each epoch every rank's throughput, step time, communication time,
bytes sent as messages and bytes passed through host-shared memory (the one-host all-reduce
sends no messages), and its own training loss (ranks that compute one) are gathered to rank 0,
written as ranks.jsonl, and (with --plot / --live) drawn as PNGs a person can read: loss curves
with one line per replica, throughput per rank, communication share and traffic per rank."""
from __future__ import annotations

import time
from pathlib import Path

from ..extras import need, pyplot
from .metrics import json_line

FIELDS = ["samples", "seconds", "step_ms", "comm_s", "bytes_sent", "messages", "bytes_shared", "train_loss"]
MARKERS = "osD^v<>pP*Xh"


class RankStats:
    """This rank's counters since the last snapshot (from the one waiting path's totals)."""

    def __init__(self, world):
        self.world, self.board = world, world.board
        self.mark()

    def mark(self) -> None:
        self.t0 = time.perf_counter()
        b = self.board
        self.comm0, self.bytes0, self.msgs0, self.shared0 = b.seconds, b.bytes_sent, b.messages_sent, b.bytes_shared

    def snapshot(self, samples: int, steps: int, loss: float = float("nan")) -> list[float]:
        """This epoch's counters; `loss`: this rank's own mean training loss (NaN: it has none)."""
        b, seconds = self.board, time.perf_counter() - self.t0
        vals = [samples, seconds, 1e3 * seconds / max(steps, 1), b.seconds - self.comm0,
                b.bytes_sent - self.bytes0, b.messages_sent - self.msgs0, b.bytes_shared - self.shared0, loss]
        self.mark()
        return vals


class Dashboard:
    """Rank 0's view of every rank over the epochs; writes ranks.jsonl and the PNGs."""

    def __init__(self, out: Path, hosts: list[str], title: str, plot: bool, live: bool):
        self.out, self.hosts, self.title, self.plot, self.live = out, hosts, title, plot, live
        self.epochs: list[dict] = []      # the job's rows (loss, metric ...)
        self.ranks: list[list[dict]] = []  # per epoch, one dict per rank
        out.mkdir(parents=True, exist_ok=True)
        (out / "ranks.jsonl").write_text("")

    def add(self, row: dict, gathered) -> None:
        per_rank = []
        for r, vals in enumerate(gathered):
            d = dict(zip(FIELDS, (float(v) for v in vals)))
            d.update(epoch=row["epoch"], rank=r, host=self.hosts[r],
                     samples_per_s=d["samples"] / max(d["seconds"], 1e-9),
                     comm_share=d["comm_s"] / max(d["seconds"], 1e-9))
            per_rank.append(d)
        self.epochs.append(row)
        self.ranks.append(per_rank)
        with (self.out / "ranks.jsonl").open("a") as f:
            for d in per_rank:
                f.write(json_line(d) + "\n")
        if self.live:
            self.draw(self.out / "dashboard.png")
            self.write_html()

    def finish(self) -> list[Path]:
        return [self.draw(self.out / "dashboard.png")] if (self.plot or self.live) and self.epochs else []

    def write_html(self) -> None:
        (self.out / "dashboard.html").write_text(
            "<!doctype html><meta http-equiv='refresh' content='2'><title>mpipar live</title>"
            f"<h3>{self.title}</h3><p>epoch {self.epochs[-1]['epoch']}, refreshed every 2 s</p>"
            f"<img src='dashboard.png?{time.time():.0f}' style='max-width:100%'>")

    def draw(self, path: Path) -> Path:
        plt = pyplot()
        MaxNLocator = need("matplotlib.ticker", "the dashboard").MaxNLocator

        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(17, 4.5))
        ep = [r["epoch"] for r in self.epochs]
        for key in [k for k in self.epochs[0] if k.endswith("_loss")]:
            a1.plot(ep, [r[key] for r in self.epochs], "o-", lw=2.5, label=key.replace("_", " ") + " (job)")
        n = len(self.ranks[0])
        own = [r for r in range(n) if any(e[r]["train_loss"] == e[r]["train_loss"] for e in self.ranks)]
        if len(own) > 1:     # one line per replica: each trained on its own shard of every batch
            for i, r in enumerate(own):
                a1.plot(ep, [e[r]["train_loss"] for e in self.ranks], MARKERS[i % len(MARKERS)] + "--",
                        ms=4, lw=1, alpha=0.8, label=f"train loss, rank {r} ({self.hosts[r]})")
        a1.set(xlabel="epoch", ylabel="loss (mean over samples)", title="loss (job, and per replica)")
        a1.legend(fontsize=7)
        # equal throughputs would draw one line over another: each rank gets its own marker and
        # dash pattern, later ranks drawn thinner on top
        for r in range(n):
            a2.plot(ep, [e[r]["samples_per_s"] for e in self.ranks], MARKERS[r % len(MARKERS)] + "-",
                    lw=max(3.0 - 0.3 * r, 0.8), ms=max(8 - r, 3), alpha=0.75, label=f"rank {r} ({self.hosts[r]})")
        a2.set(xlabel="epoch", ylabel="samples / s", title="throughput per rank")
        a2.legend(fontsize=8)
        last = self.ranks[-1]
        a3.bar(range(n), [100 * d["comm_share"] for d in last], color="tab:orange", label="waiting on messages")
        a3.set_xticks(range(n), [f"r{r}\n{self.hosts[r]}" for r in range(n)], fontsize=8)
        a3.set(ylabel="% of epoch time", title=f"communication share and traffic (epoch {ep[-1]})", ylim=(0, 100))
        for r, d in enumerate(last):
            a3.text(r, 100 * d["comm_share"] + 2, traffic(d), ha="center", fontsize=7)
        a3.legend(fontsize=8)
        for a in (a1, a2):
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
        for a in (a1, a2, a3):
            a.grid(alpha=0.3)
        fig.suptitle(self.title)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def traffic(d: dict) -> str:
    """'1.2 MiB sent\n3.4 MiB shm' -- messages, and what went through host-shared memory."""
    text = f"{d['bytes_sent'] / 2**20:.1f} MiB sent"
    return text + (f"\n{d['bytes_shared'] / 2**20:.1f} MiB shm" if d.get("bytes_shared") else "")
