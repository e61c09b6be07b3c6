"""The numbers of a report: one row per run, one row per variant, the bootstrap interval, the verdict.

    python -m studies.report pooling     # the verdict and the "Final FID per variant" and "Every run" tables

Everything here takes the DataFrame that `Store.runs_frame` (mlflow.search_runs) returns, so a test can
recompute any number from the same store. Only runs that finished (or were stopped early) with a finite
final FID enter the FID means; diverged, failed and unfinished runs are counted, never averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

COMPLETED = ("finished", "stopped")  # outcomes whose final FID is a result (stopped = early stop by a hook)
BASELINE = "baseline"
FEW_SEEDS = 3  # below this a percentile bootstrap badly understates the spread: 'significant' is flagged provisional


@dataclass(frozen=True)
class Interval:
    diff: float  # mean(other) - mean(baseline); negative = lower FID = better
    lo: float  # bounds of the percentile bootstrap interval; NaN when either group has < 2 seeds
    hi: float

    @property
    def known(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi)

    @property
    def significant(self) -> bool | None:
        """True when the interval excludes 0, None when there are too few seeds to say."""
        return (self.lo > 0 or self.hi < 0) if self.known else None


def bootstrap_diff(baseline, other, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> Interval:
    """Difference of means (other - baseline) with a percentile bootstrap interval over seeds.

    Each resample draws every group's seeds with replacement, within the group. With fewer than two seeds in
    a group the resamples cannot vary that group, so the interval would claim a certainty the data lacks:
    it is NaN instead.
    """
    a = np.asarray(baseline, dtype=float)
    b = np.asarray(other, dtype=float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) == 0 or len(b) == 0:
        return Interval(math.nan, math.nan, math.nan)
    diff = float(b.mean() - a.mean())
    if len(a) < 2 or len(b) < 2:
        return Interval(diff, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    boot = (b[rng.integers(0, len(b), (n_boot, len(b)))].mean(axis=1)
            - a[rng.integers(0, len(a), (n_boot, len(a)))].mean(axis=1))
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return Interval(diff, float(lo), float(hi))


def _col(frame: pd.DataFrame, name: str, default=math.nan) -> pd.Series:
    return frame[name] if name in frame else pd.Series([default] * len(frame), index=frame.index, dtype=object)


def run_table(children: pd.DataFrame, order: list[str] | None = None) -> pd.DataFrame:
    """One row per child run, as MLflow holds it, in variant order then seed; `outcome` says whether its FID counts."""
    outcome = _col(children, "tags.outcome", None).fillna("unfinished")
    # a run still tagged 'running' whose MLflow status is over was killed without reaching its finally block
    outcome = outcome.where(~((outcome == "running") & (children["status"] != "RUNNING")), "unfinished")
    final = pd.to_numeric(_col(children, "metrics.fid/final"), errors="coerce")
    diverged_at = pd.to_numeric(_col(children, "tags.diverged_at_nimg"), errors="coerce") / 1000
    table = pd.DataFrame({
        "variant": children["tags.variant"].values, "seed": children["tags.seed"].astype(int).values,
        "run": _col(children, "tags.mlflow.runName", "").values, "outcome": outcome.values,
        "final_fid": final.values, "best_fid": pd.to_numeric(_col(children, "metrics.fid/best"), errors="coerce").values,
        "kimg": pd.to_numeric(_col(children, "metrics.progress/kimg"), errors="coerce").values,
        "img_per_s": pd.to_numeric(_col(children, "metrics.perf/img_per_s"), errors="coerce").values,
        "diverged_at_kimg": diverged_at.values, "run_id": children["run_id"].values,
    })
    rank = {v: i for i, v in enumerate(order or sorted(table["variant"].unique()))}
    table["_rank"] = table["variant"].map(lambda v: rank.get(v, len(rank)))
    return table.sort_values(["_rank", "variant", "seed"]).drop(columns="_rank").reset_index(drop=True)


def counted(runs: pd.DataFrame) -> pd.Series:
    """Runs whose final FID enters the means: completed, with a finite final FID."""
    return runs["outcome"].isin(COMPLETED) & np.isfinite(runs["final_fid"].astype(float))


def variant_summary(runs: pd.DataFrame, order: list[str], seed: int = 0) -> pd.DataFrame:
    """Per variant: run counts by outcome, final FID mean/std/best over counted runs, the effect vs baseline."""
    ok = counted(runs)
    base = runs.loc[ok & (runs["variant"] == BASELINE), "final_fid"].to_numpy(float)
    rows = []
    for variant in order:
        mine = runs["variant"] == variant
        fids = runs.loc[ok & mine, "final_fid"].to_numpy(float)
        ci = bootstrap_diff(base, fids, seed=seed) if variant != BASELINE else Interval(math.nan, math.nan, math.nan)
        rows.append({
            "variant": variant, "runs": int(mine.sum()), "counted": len(fids),
            "diverged": int((mine & (runs["outcome"] == "diverged")).sum()),
            "failed": int((mine & (runs["outcome"] == "failed")).sum()),
            "unfinished": int((mine & ~runs["outcome"].isin((*COMPLETED, "diverged", "failed"))).sum()),
            "fid_mean": float(fids.mean()) if len(fids) else math.nan,
            "fid_std": float(fids.std(ddof=1)) if len(fids) > 1 else math.nan,
            "fid_best": float(fids.min()) if len(fids) else math.nan,
            "delta": ci.diff, "ci_lo": ci.lo, "ci_hi": ci.hi, "significant": ci.significant,
            "seeds_compared": min(len(base), len(fids)) if variant != BASELINE else len(fids),
            "img_per_s": float(runs.loc[mine, "img_per_s"].astype(float).mean()),
        })
    summary = pd.DataFrame(rows)
    summary["best"] = False
    if summary["fid_mean"].notna().any():
        summary.loc[summary["fid_mean"].idxmin(), "best"] = True
    return summary


def _tri(value) -> bool | None:
    """True / False / None out of a DataFrame cell that may hold None, NaN or a numpy bool."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return bool(value)


def _num(x: float, fmt: str = ".2f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and math.isfinite(x) else "–"


def display_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """The variant table as a reviewer reads it: strings, best variant marked, significance spelled out."""
    rows = []
    for r in summary.itertuples():
        if r.variant == BASELINE:
            delta, sig = "(reference)", "–"
        elif not math.isfinite(r.delta):
            delta, sig = "–", "no finished runs" if r.counted == 0 else "no finished baseline"
        else:
            delta = f"{r.delta:+.2f} [{_num(r.ci_lo, '+.2f')}, {_num(r.ci_hi, '+.2f')}]"
            sig = {True: "**yes**", False: "no (CI contains 0)", None: "too few seeds"}[_tri(r.significant)]
            if _tri(r.significant) and r.seeds_compared < FEW_SEEDS:
                sig = f"yes, but only {r.seeds_compared} seeds (provisional)"
        fid = f"{_num(r.fid_mean)} ± {_num(r.fid_std)}" if r.counted else "–"
        rows.append({
            "variant": f"**{r.variant}** ★ best" if r.best else r.variant,
            "runs": r.runs, "in mean": r.counted, "diverged": r.diverged, "failed / unfinished": r.failed + r.unfinished,
            "final FID (mean ± sd)": fid, "best FID": _num(r.fid_best),
            "Δ FID vs baseline [95% CI]": delta, "significant": sig, "img/s": _num(r.img_per_s, ".0f"),
        })
    return pd.DataFrame(rows)


def display_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run, diverged and unfinished ones included, with its MLflow run id."""
    return pd.DataFrame({
        "run": runs["run"], "variant": runs["variant"], "seed": runs["seed"], "outcome": runs["outcome"],
        "in mean": np.where(counted(runs), "yes", "no"),
        "final FID": [_num(v) for v in runs["final_fid"]], "best FID": [_num(v) for v in runs["best_fid"]],
        "kimg": [_num(v, ".3g") for v in runs["kimg"]],
        "diverged at kimg": [_num(v, ".3g") for v in runs["diverged_at_kimg"]],
        "img/s": [_num(v, ".0f") for v in runs["img_per_s"]], "MLflow run id": [f"`{r}`" for r in runs["run_id"]],
    })


def verdict(summary: pd.DataFrame, fid_samples: int | None = None) -> list[str]:
    """A few plain sentences generated from the variant table: who wins, by how much, and how sure we are."""
    lines: list[str] = []
    rows = {r.variant: r for r in summary.itertuples()}
    base = rows.get(BASELINE)
    scored = summary[summary["counted"] > 0]
    if scored.empty:
        lines.append("No run finished with a final FID, so this study supports no conclusion.")
    elif base is None or base.counted == 0:
        best = scored.loc[scored["fid_mean"].idxmin()]
        lines.append(f"The baseline has no finished run, so no variant can be compared with it; "
                     f"`{best['variant']}` has the lowest mean final FID ({best['fid_mean']:.2f}).")
    else:
        best = rows[scored.loc[scored["fid_mean"].idxmin(), "variant"]]
        others = [r for r in rows.values() if r.variant != BASELINE and r.counted > 0]
        if not others and len(rows) == 1:
            lines.append(f"Only the baseline ran (mean final FID {base.fid_mean:.2f}): there is nothing to compare.")
        elif best.variant == BASELINE:
            worse = [f"`{r.variant}` ({r.delta:+.2f})" for r in others if _tri(r.significant)]
            noise = [f"`{r.variant}` ({r.delta:+.2f})" for r in others if _tri(r.significant) is False]
            lines.append(f"No variant beats the baseline: its mean final FID ({base.fid_mean:.2f}) is the lowest.")
            if worse:
                lines.append(f"Clearly worse than the baseline (95% interval above 0): {', '.join(worse)}.")
            if noise:
                lines.append(f"Within seed-to-seed noise of the baseline: {', '.join(noise)}.")
        else:
            pct = 100 * -best.delta / base.fid_mean if base.fid_mean else math.nan
            lines.append(f"`{best.variant}` has the lowest mean final FID: {best.fid_mean:.2f} against "
                         f"{base.fid_mean:.2f} for the baseline, {-best.delta:.2f} lower ({pct:.0f}%).")
            if _tri(best.significant) is None:
                n = min(best.counted, base.counted)
                lines.append(f"With {n} finished seed{'s' if n != 1 else ''} there are too few seeds to tell this "
                             "from seed-to-seed noise: the data does not support a winner yet; rerun with "
                             "`--seeds 3` or more.")
            elif _tri(best.significant) and best.seeds_compared < FEW_SEEDS:
                lines.append(f"Its 95% bootstrap interval over seeds, [{best.ci_lo:+.2f}, {best.ci_hi:+.2f}], "
                             f"excludes 0, but with only {best.seeds_compared} seeds the bootstrap can only reuse "
                             "the values it has and its interval is too narrow: the data suggests an improvement "
                             "without establishing it; rerun with `--seeds 3` or more.")
            elif _tri(best.significant):
                lines.append(f"Its 95% bootstrap interval over seeds, [{best.ci_lo:+.2f}, {best.ci_hi:+.2f}], "
                             "excludes 0, so the data supports the improvement.")
            else:
                lines.append(f"Its 95% bootstrap interval over seeds, [{best.ci_lo:+.2f}, {best.ci_hi:+.2f}], "
                             "contains 0: the difference is within seed-to-seed noise, so the data does not "
                             "support a winner.")
    for r in rows.values():
        lost = [f"{n} {what}" for n, what in ((r.diverged, "diverged"), (r.failed, "failed"),
                                              (r.unfinished, "did not finish")) if n]
        if lost:
            lines.append(f"Of `{r.variant}`'s {r.runs} runs, {' and '.join(lost)}; they are listed below and "
                         "left out of its FID mean.")
    if fid_samples is not None and fid_samples < 10_000:
        lines.append(f"The final FID uses only {fid_samples} generated images, so it is biased upwards: compare "
                     "these numbers only with runs under the same protocol.")
    return lines


def headline(summary: pd.DataFrame) -> dict[str, object]:
    """The best variant and its effect, for the reports index."""
    best = summary[summary["best"]]
    if best.empty:
        return {"best": None, "effect": "no finished runs"}
    r = best.iloc[0]
    if r["variant"] == BASELINE:
        return {"best": BASELINE, "effect": "no variant beats the baseline"}
    if not math.isfinite(r["delta"]):
        return {"best": r["variant"], "effect": "no baseline to compare with"}
    sig = {True: "significant", False: "not significant", None: "too few seeds"}[_tri(r["significant"])]
    if _tri(r["significant"]) and r["seeds_compared"] < FEW_SEEDS:
        sig += f" but provisional ({r['seeds_compared']} seeds)"
    ci = f" [{r['ci_lo']:+.2f}, {r['ci_hi']:+.2f}]" if _tri(r["significant"]) is not None else ""
    return {"best": r["variant"], "effect": f"Δ FID {r['delta']:+.2f}{ci}, {sig}"}
