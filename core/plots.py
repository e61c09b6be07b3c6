"""Per-run curves (losses, D outputs, FID and KID against kimg) as one PNG, logged as an artifact."""

from __future__ import annotations

from pathlib import Path

PANELS = (("losses", ("loss/d", "loss/g")), ("D outputs", ("d/real", "d/fake")), ("FID", ("fid/",)), ("KID", ("kid/",)))


def plot_run_curves(history: dict[str, list[tuple[int, float]]], path: Path, title: str = "") -> Path:
    """One row of panels; the FID and KID panels plot every fid/fid*, kid/kid* key (each sample count)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.2))
    for ax, (name, prefixes) in zip(axes, PANELS):
        keys = [k for k in history for p in prefixes if (k.startswith(p) if p.endswith("/") else k == p)]
        keys = [k for k in keys if not k.endswith(("feature_spread", "final", "final_std"))]
        for key in sorted(keys):
            pts = history[key]
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
