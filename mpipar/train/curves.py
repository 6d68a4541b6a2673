"""Learning curves: the parallel run and single-process training of the same model and seed,
overlaid, so a user sees at a glance that the parallel engine learns the same thing. A schedule
that is not synchronous training (PipeDream-2BW) is drawn against its own single-process
reference as well as against synchronous training, so the plot shows what it trades."""
from __future__ import annotations

import json
from pathlib import Path

from ..extras import need, pyplot


def plot_overlay(parallel: list[dict], reference: list[dict] | dict[str, list[dict]], path: Path, title: str,
                 label: str) -> Path:
    """`reference`: single-process rows, or {label: rows} for several references."""
    references = reference if isinstance(reference, dict) else {"single process": reference}
    plt = pyplot()
    MaxNLocator = need("matplotlib.ticker", "learning-curve plots").MaxNLocator

    metric = next((k for k in parallel[0] if k.startswith("test_") and k != "test_loss"), None)
    panels = [("loss", ["train_loss", "test_loss"])] + ([(metric[5:], [metric])] if metric else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels):
        for key in keys:
            split = key.split("_")[0]
            for (name_ref, rows), style in zip(references.items(), ("o-", "s:", "^-.")):
                ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], style, lw=3, alpha=0.45,
                        label=f"{name_ref} ({split})")
            ax.plot([r["epoch"] for r in parallel], [r[key] for r in parallel], "x--", lw=1.5,
                    label=f"{label} ({split})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    path.with_suffix(".json").write_text(json.dumps({"parallel": parallel, "references": references}, indent=1))
    return path
