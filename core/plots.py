"""Per-run curves (losses, D outputs, FID and KID against kimg) as one PNG, logged as an artifact."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from core import records as rec
from core.bookkeeping import MetricLog


def panels(sample_counts: Iterable[int]) -> list[tuple[str, list[str]]]:
    """(title, keys) of each panel: the step's losses, D's outputs, then each family's training evaluations."""
    counts = list(dict.fromkeys(n for n in sample_counts if n > 0))
    return [("losses", list(rec.LOSS_KEYS)), ("D outputs", list(rec.D_KEYS)),
            *((rec.LABEL[f], [rec.train_key(f, n) for n in counts]) for f in rec.FAMILIES)]


def plot_run_curves(log: MetricLog, path: Path, sample_counts: Iterable[int], title: str = "") -> Path:
    """One row of panels; each family's panel plots its evaluations on every sample count given (fid/fid10k, ...)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = panels(sample_counts)
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.2))
    for ax, (name, wanted) in zip(axes, rows):
        keys = [k for k in wanted if k in log]  # a run without training evaluations has no fid/fid10k curve
        for key in keys:
            pts = log.series(key)
            ax.plot([n / 1000 for n, _ in pts], [v for _, v in pts], marker="o" if len(pts) < 20 else None,
                    label=key)
        ax.set_title(name)
        ax.set_xlabel("kimg")
        if keys:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
