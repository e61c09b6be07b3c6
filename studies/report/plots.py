"""The pictures of a report, all rebuilt from MLflow: curves over seeds, sample grids, a training timelapse.

    python -m studies.report pooling     # reports/pooling/metrics.png, losses.png, d_outputs.png, samples-*.png, timelapse.gif

Curves come from metric histories (step = images seen), so variants with different batch sizes share an
x-axis. Sample grids come from each run's `samples/` artifacts, which every run draws from the same fixed z.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from core import records as rec
from core.tracking import Store

LOSS_KEYS, D_KEYS = rec.LOSS_KEYS, rec.D_KEYS
GIF_MAX_SIDE = 480  # px; a default-preset grid is ~1,000 px and 20 frames of it would be megabytes
SAMPLE_NAME = re.compile(r"fakes(\d+(?:\.\d+)?)kimg\.png$")

History = dict[str, dict[str, list[tuple[int, float]]]]  # run id -> metric key -> [(nimg, value)]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def histories(store: Store, run_ids: list[str], keys: list[str]) -> History:
    """Every point of each metric of each run, as MLflow holds it (non-finite values kept out)."""
    return {rid: {k: [(s, v) for s, v in store.metric_history(rid, k) if math.isfinite(v)] for k in keys}
            for rid in run_ids}


def seed_frame(hist: History, run_ids: list[str], key: str, smooth: int = 1) -> pd.DataFrame:
    """kimg x seed: one column per run, rows aligned on images seen, optionally a trailing moving average."""
    cols = {}
    for rid in run_ids:
        pts = sorted(dict(hist.get(rid, {}).get(key, [])).items())
        if pts:
            s = pd.Series([v for _, v in pts], index=[n / 1000 for n, _ in pts], dtype=float)
            cols[rid] = s.rolling(smooth, min_periods=1).mean() if smooth > 1 else s
    return pd.DataFrame(cols).sort_index()


def _colors(variants: list[str]) -> dict[str, object]:
    cmap = _plt().get_cmap("tab10")
    return {v: cmap(i % 10) for i, v in enumerate(variants)}


def _band(ax, frame: pd.DataFrame, color, label: str, style: str = "-") -> bool:
    """Mean over seeds as a line, min..max over seeds as a band; False when there is nothing to draw."""
    if frame.empty:
        return False
    mean = frame.mean(axis=1)
    ax.plot(mean.index, mean.values, style, color=color, label=f"{label} (n={frame.shape[1]})",
            marker="o" if len(mean) < 12 else None, markersize=3)
    if frame.shape[1] > 1:
        ax.fill_between(frame.index, frame.min(axis=1), frame.max(axis=1), color=color, alpha=0.18, linewidth=0)
    return True


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path


def plot_finals(groups: dict[str, list[str]], families: list[str], final: pd.DataFrame, path: Path) -> Path:
    """Without evaluations during training (the `cpu` preset): one panel per family, primary first, each seed's
    final value as a point over its variant (spread sideways), with the variant's mean ± sd beside them."""
    plt, colors = _plt(), _colors(list(groups))
    fig, axes = plt.subplots(1, len(families), figsize=(5.4 * len(families), 3.8), squeeze=False)
    for ax, family in zip(axes[0], families):
        for i, variant in enumerate(groups):
            values = final.loc[final["variant"] == variant, f"final_{family}"].astype(float).dropna().to_numpy()
            if not len(values):
                continue
            offsets = [(j - (len(values) - 1) / 2) * 0.08 for j in range(len(values))]
            ax.scatter([i - 0.12 + o for o in offsets], values, color=colors[variant], s=22, zorder=3)
            sd = values.std(ddof=1) if len(values) > 1 else 0.0
            ax.errorbar([i + 0.22], [values.mean()], yerr=[sd], fmt="D", color=colors[variant], capsize=3,
                        markersize=5)
        ax.set_xticks(range(len(groups)), [f"{v}\n(n={int((final['variant'] == v).sum())})" for v in groups],
                      fontsize=8)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_ylabel(f"final {rec.LABEL[family]} (lower is better)")
        ax.set_title(f"{rec.final_key(family)} per seed (●), ◆ mean ± sd", fontsize=9)
    return _save(fig, path)


def plot_fidelity_diversity(groups: dict[str, list[str]], final: pd.DataFrame, baseline: str, path: Path) -> Path:
    """Precision against recall (k = 3) and density against coverage (k = 5): one point per seed, coloured by
    variant, the baseline's mean as a large cross. Up is more diversity, right more fidelity."""
    plt, colors = _plt(), _colors(list(groups))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (x, y) in zip(axes, ((rec.PRECISION, rec.RECALL), (rec.DENSITY, rec.COVERAGE))):
        for variant in groups:
            done = final[final["variant"] == variant]
            ax.scatter(done[f"final_{x}"].astype(float), done[f"final_{y}"].astype(float), color=colors[variant],
                       s=26, label=f"{variant} (n={len(done)})", zorder=3)
        base = final[final["variant"] == baseline]
        if len(base):
            ax.scatter([base[f"final_{x}"].astype(float).mean()], [base[f"final_{y}"].astype(float).mean()],
                       marker="X", s=140, color=colors.get(baseline, "black"), edgecolor="black", linewidth=0.8,
                       label=f"{baseline} mean", zorder=4)
        ax.set_xlabel(f"{rec.LABEL[x]} (fidelity)")
        ax.set_ylabel(f"{rec.LABEL[y]} (diversity)")
        top = max(1.0, final[f"final_{x}"].astype(float).max(skipna=True) if len(final) else 1.0)  # density > 1
        ax.set_xlim(0, 1.04 * (top if math.isfinite(top) else 1.0))
        ax.set_ylim(0, 1.04)  # recall and coverage are shares
        ax.set_title(f"final {rec.LABEL[x]} against {rec.LABEL[y]}, one point per seed", fontsize=9)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_metrics(hist: History, groups: dict[str, list[str]], panels: list[tuple[str, str]], final: pd.DataFrame,
                 path: Path) -> Path:
    """One panel per (training key, family), primary first: each variant's curve during training (mean line,
    min-max band over seeds) and its final value as mean ± sd markers (final[f"final_{family}"]). Where no run
    evaluated during training, the final values per seed as a strip plot instead (plot_finals)."""
    if not any(hist.get(rid, {}).get(key) for rids in groups.values() for rid in rids for key, _ in panels):
        return plot_finals(groups, [family for _, family in panels], final, path)
    plt, colors = _plt(), _colors(list(groups))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 3.8), squeeze=False)
    span = final["kimg"].max() if len(final) else 1.0
    for ax, (train_key, family) in zip(axes[0], panels):
        for i, (variant, run_ids) in enumerate(groups.items()):
            drawn = _band(ax, seed_frame(hist, run_ids, train_key), colors[variant], variant)
            done = final[final["variant"] == variant]
            values = done[f"final_{family}"].astype(float)
            if values.notna().any():
                sd = values.std(ddof=1) if values.notna().sum() > 1 else 0.0
                nudge = (i - (len(groups) - 1) / 2) * 0.012 * span  # side by side, so the error bars do not overlap
                ax.errorbar([done["kimg"].mean() + nudge], [values.mean()], yerr=[sd], fmt="D", color=colors[variant],
                            capsize=3, markersize=5, label=None if drawn else f"{variant} (n={values.notna().sum()})")
        ax.set_xlabel("images seen (kimg)")
        ax.set_ylabel(f"{family.upper()} (lower is better)")
        ax.set_title(f"{train_key} during training (band: min-max over seeds); ◆ final, mean ± sd", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, path)


def plot_pair(hist: History, groups: dict[str, list[str]], keys: tuple[str, str], titles: tuple[str, str],
              path: Path, smooth: int) -> Path:
    """Two panels (e.g. loss/d and loss/g), each variant's mean over seeds with a min-max band, smoothed."""
    plt, colors = _plt(), _colors(list(groups))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, key, title in zip(axes, keys, titles):
        for variant, run_ids in groups.items():
            _band(ax, seed_frame(hist, run_ids, key, smooth), colors[variant], variant)
        ax.set_title(title + (f" (moving average over {smooth} logs)" if smooth > 1 else ""), fontsize=9)
        ax.set_xlabel("images seen (kimg)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, path)


def smoothing_window(hist: History, key: str) -> int:
    """About a tenth of the logged points, so a curve keeps its shape but loses the step-to-step jitter."""
    longest = max((len(h.get(key, [])) for h in hist.values()), default=0)
    return max(1, longest // 10)


def sample_artifacts(store: Store, run_id: str) -> list[str]:
    """The run's fixed-z grids, in training order."""
    paths = [p for p in store.list_artifacts(run_id, "samples") if SAMPLE_NAME.search(p)]
    return sorted(paths, key=lambda p: float(SAMPLE_NAME.search(p).group(1)))


def copy_artifact(store: Store, run_id: str, artifact: str, dst: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        local = store.download(run_id, artifact, Path(tmp))
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, dst)
    return dst


def timelapse_gif(store: Store, run_id: str, dst: Path, seconds_per_frame: float = 0.6) -> tuple[Path, int] | None:
    """An animated GIF of the run's fixed-z grids over training, each frame labelled with its kimg."""
    from PIL import Image, ImageDraw

    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        for artifact in sample_artifacts(store, run_id):
            with Image.open(store.download(run_id, artifact, Path(tmp) / str(len(frames)))) as im:
                im = im.convert("RGB")
            scale = min(1.0, GIF_MAX_SIDE / max(im.size))
            if scale < 1:
                im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
            canvas = Image.new("RGB", (im.width, im.height + 14), "white")
            canvas.paste(im, (0, 14))
            ImageDraw.Draw(canvas).text((3, 1), f"{float(SAMPLE_NAME.search(artifact).group(1)):g} kimg", fill="black")
            frames.append(canvas)
    if not frames:
        return None
    dst.parent.mkdir(parents=True, exist_ok=True)
    # the last frame stays up longer, so the final samples can be looked at
    durations = [int(seconds_per_frame * 1000)] * (len(frames) - 1) + [int(seconds_per_frame * 3000)]
    frames[0].save(dst, save_all=True, append_images=frames[1:], duration=durations, loop=0, optimize=True)
    return dst, len(frames)


@dataclass(frozen=True)
class ForestRow:
    label: str
    group: str  # rows of one group share a colour
    delta: float
    lo: float
    hi: float
    significant: bool  # drawn filled
    strong: bool  # drawn as a star (significant in the larger family too)


def plot_forest(rows: list[ForestRow], xlabel: str, title: str, path: Path) -> Path:
    """One row per effect, first at the top: the estimate as a point, its interval as a bar, zero marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.36 * len(rows) + 1.4))
    groups = list(dict.fromkeys(r.group for r in rows))
    colors = _colors(groups)
    for y, r in enumerate(reversed(rows)):
        color = colors[r.group]
        if math.isfinite(r.lo) and math.isfinite(r.hi):
            ax.plot([r.lo, r.hi], [y, y], color=color, lw=2.5, alpha=0.8)
        ax.plot([r.delta], [y], marker="*" if r.strong else "o", ms=12 if r.strong else 7, color=color,
                markerfacecolor=color if r.significant else "white", markeredgewidth=1.5)
    ax.axvline(0.0, color="black", lw=1)
    ax.set_yticks(range(len(rows)), [r.label for r in reversed(rows)])
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_search_curves(curves: dict[str, list[tuple[int, float]]], label: str, path: Path) -> Path:
    """Per variant, the best objective found so far against the trial number (trials that spent budget only)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    colors = _colors(list(curves))
    for variant, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.step(xs, ys, where="post", color=colors[variant], label=variant, marker="o", markersize=3)
    ax.set_xlabel("trial (counted: complete, pruned or failed on its own)")
    ax.set_ylabel(f"best final {label} so far")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
