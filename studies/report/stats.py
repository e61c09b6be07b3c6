"""The numbers of a report: one row per run, one row per variant, the verdict, all through studies.verdict.

    python -m studies.report pooling     # the verdict, the "Results per variant" and "Every run" tables

Everything here takes the DataFrame that `Store.runs_frame` (mlflow.search_runs) returns, so a test can
recompute any number from the same store. The study's primary metric (the `derived.primary_metric` param: KID
below 2,048 final samples, else FID) decides; the other is shown beside it. A seed that diverged, collapsed,
saturated D or crashed is a result: it counts in its variant's n for the failure rate (Clopper-Pearson interval,
Fisher's exact test against the baseline), and its metric stays out of the Welch + Holm test, which compares
finished seeds only. Unfinished runs (killed, still running) are listed and count nowhere.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from studies.verdict import BASELINE, COMPLETED, FAILURES, VariantRecord, VariantVerdict, best, verdict

METRICS = ("fid", "kid")  # the families a run's final and best values are read for
LABEL = {"fid": "FID", "kid": "KID"}
VERB = {"diverged": "diverged", "collapsed": "collapsed", "d_saturated": "saturated D", "failed": "crashed"}


def _col(frame: pd.DataFrame, name: str, default=math.nan) -> pd.Series:
    return frame[name] if name in frame else pd.Series([default] * len(frame), index=frame.index, dtype=object)


def _num(frame: pd.DataFrame, name: str) -> np.ndarray:
    return pd.to_numeric(_col(frame, name), errors="coerce").to_numpy(float)


def run_table(children: pd.DataFrame, order: list[str] | None = None) -> pd.DataFrame:
    """One row per child run, as MLflow holds it, in variant order then seed."""
    outcome = _col(children, "tags.outcome", None).fillna("unfinished")
    # a run still tagged 'running' whose MLflow status is over was killed without reaching its finally block
    outcome = outcome.where(~((outcome == "running") & (children["status"] != "RUNNING")), "unfinished")
    table = pd.DataFrame({
        "variant": children["tags.variant"].values, "seed": children["tags.seed"].astype(int).values,
        "run": _col(children, "tags.mlflow.runName", "").values, "outcome": outcome.values,
        **{f"final_{m}": _num(children, f"metrics.{m}/final") for m in METRICS},
        "kid_std": _num(children, "metrics.kid/final_std"),
        **{f"best_{m}": _num(children, f"metrics.{m}/best") for m in METRICS},
        "kimg": _num(children, "metrics.progress/kimg"), "img_per_s": _num(children, "metrics.perf/img_per_s"),
        "diverged_at_kimg": _num(children, "tags.diverged_at_nimg") / 1000,
        "saturation": _col(children, "tags.saturation_episodes", "").fillna("").values,
        "run_id": children["run_id"].values,
    })
    rank = {v: i for i, v in enumerate(order or sorted(table["variant"].unique()))}
    table["_rank"] = table["variant"].map(lambda v: rank.get(v, len(rank)))
    return table.sort_values(["_rank", "variant", "seed"]).drop(columns="_rank").reset_index(drop=True)


def counted(runs: pd.DataFrame, metric: str) -> pd.Series:
    """Runs whose final metric enters the test: completed (finished or stopped), with a finite final value."""
    return runs["outcome"].isin(COMPLETED) & np.isfinite(runs[f"final_{metric}"].astype(float))


def records(runs: pd.DataFrame, order: list[str], metric: str) -> list[VariantRecord]:
    """Per variant: the final metric of its counted seeds and its seeds per outcome, as studies.verdict takes them."""
    ok = counted(runs, metric)
    return [VariantRecord(v, runs.loc[ok & (runs["variant"] == v), f"final_{metric}"].to_numpy(float),
                          runs.loc[runs["variant"] == v, "outcome"].value_counts().to_dict()) for v in order]


def variant_summary(runs: pd.DataFrame, order: list[str], metric: str) -> tuple[pd.DataFrame, list[VariantVerdict]]:
    """Per variant: outcomes, failure statistics, the metric (and the other beside it), the test against baseline."""
    verdicts = verdict(records(runs, order, metric), LABEL[metric], lower_is_better=True)
    other = "fid" if metric == "kid" else "kid"
    winner = best(verdicts)
    rows = []
    for v in verdicts:
        mine = runs[runs["variant"] == v.name]
        ok = mine[counted(mine, metric)]
        side = ok[f"final_{other}"].to_numpy(float)
        side = side[np.isfinite(side)]
        w = v.welch
        tally = mine["outcome"].value_counts()
        speed = mine["img_per_s"].astype(float)
        rows.append({
            "variant": v.name, "seeds": v.seeds, **{o: int(tally.get(o, 0)) for o in ("finished", "stopped", *FAILURES)},
            "unfinished": int(sum(c for o, c in tally.items() if o not in (*COMPLETED, *FAILURES))),
            "counted": v.finished, "failure_rate": v.failure_rate, "failure_lo": v.failure_lo,
            "failure_hi": v.failure_hi, "fisher_p": v.fisher_p, "fails_more": v.fails_more, "mean": v.mean, "sd": v.sd,
            "other_mean": float(side.mean()) if len(side) else math.nan,
            "other_sd": float(side.std(ddof=1)) if len(side) > 1 else math.nan,
            **({"diff": w.diff, "ci_lo": w.lo, "ci_hi": w.hi, "p": w.p, "note": w.note or ""} if w else
               {"diff": math.nan, "ci_lo": math.nan, "ci_hi": math.nan, "p": math.nan, "note": ""}),
            "p_holm": v.p_holm, "significant": v.significant, "better": v.better, "mde": v.mde,
            "best": v.name == winner, "img_per_s": float(speed.mean()) if speed.notna().any() else math.nan,
            "text": v.text,
        })
    return pd.DataFrame(rows), verdicts


def _g(x, fmt: str = ".4g") -> str:
    return format(x, fmt) if isinstance(x, (int, float, np.floating)) and math.isfinite(x) else "–"


def _mean_sd(mean: float, sd: float, n: int) -> str:
    if n == 0 or not math.isfinite(mean):
        return "–"
    return f"{_g(mean)} ± {_g(sd, '.2g')}" if n > 1 else f"{_g(mean)} (1 seed)"


def significance(r) -> str:
    """The significance cell: what the Holm-adjusted Welch test says, or why it could not run."""
    if r.variant == BASELINE:
        return "–"
    if r.note:
        return r.note
    if not r.significant:
        return "no"
    if r.better:
        return "**yes**: better"
    return "yes: worse" if r.diff > 0 else "yes: lower on finished seeds, but fails significantly more often"


def _delta(r) -> str:
    if not math.isfinite(r.diff):
        return "–"
    return f"{_g(r.diff, '+.3g')} " + (f"[{_g(r.ci_lo, '+.3g')}, {_g(r.ci_hi, '+.3g')}]" if math.isfinite(r.ci_lo)
                                       else "(no interval)")


def display_summary(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The variant table as a reviewer reads it: failures first, then the primary metric and its test."""
    name, other = LABEL[metric], LABEL["fid" if metric == "kid" else "kid"]
    rows = []
    for r in summary.itertuples():
        outcomes = " / ".join(str(getattr(r, o)) for o in ("finished", *FAILURES))
        if r.stopped:
            outcomes += f" (+{r.stopped} stopped early, in finished)"
        if r.unfinished:
            outcomes += f" (+{r.unfinished} unfinished)"
        base = r.variant == BASELINE
        rows.append({
            "variant": f"**{r.variant}** ★ best" if r.best else r.variant, "seeds (n)": r.seeds,
            "finished / diverged / collapsed / d_saturated / failed": outcomes,
            "failure rate [95% CI]": f"{_g(r.failure_rate, '.2f')} [{_g(r.failure_lo, '.2f')}, {_g(r.failure_hi, '.2f')}]"
            if r.seeds else "–",
            "Fisher p vs baseline": "–" if base else _g(r.fisher_p, ".2g"),
            f"final {name} (mean ± sd)": _mean_sd(r.mean, r.sd, r.counted),
            f"final {other} (mean ± sd)": _mean_sd(r.other_mean, r.other_sd, r.counted),
            f"Δ {name} vs baseline [95% Welch CI]": "(reference)" if base else _delta(r),
            "Holm p": "–" if base else _g(r.p_holm, ".3g"), "significant": significance(r),
            "MDE": "–" if base else _g(r.mde, ".3g"), "img/s": _g(r.img_per_s, ".0f"),
        })
    return pd.DataFrame(rows)


def _episodes(cell: str) -> str:
    """'[[8000,12000]]' (nimg) as '8-12 kimg'; '' when none."""
    try:
        episodes = json.loads(cell) if cell else []
    except ValueError:
        return cell
    return ", ".join(f"{a / 1000:g}-{b / 1000:g} kimg" for a, b in episodes)


def display_runs(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Every run, failed and unfinished ones included, with its MLflow run id."""
    kid = [f"{_g(v)} ± {_g(s, '.2g')}" if math.isfinite(v) else "–" for v, s in zip(runs["final_kid"], runs["kid_std"])]
    return pd.DataFrame({
        "run": runs["run"], "variant": runs["variant"], "seed": runs["seed"], "outcome": runs["outcome"],
        "in test": np.where(counted(runs, metric), "yes", "no"),
        "final KID ± SE": kid, "final FID": [_g(v) for v in runs["final_fid"]],
        "best KID in training (selected after the fact)": [_g(v) for v in runs["best_kid"]],
        "best FID in training (selected after the fact)": [_g(v) for v in runs["best_fid"]],
        "D saturated": [_episodes(c) or "–" for c in runs["saturation"]],
        "kimg": [_g(v, ".3g") for v in runs["kimg"]], "diverged at kimg": [_g(v, ".3g") for v in runs["diverged_at_kimg"]],
        "img/s": [_g(v, ".0f") for v in runs["img_per_s"]], "MLflow run id": [f"`{r}`" for r in runs["run_id"]],
    })


def _failures(r) -> str:
    """`maxpool` failed in 2 of 3 seeds (diverged 2), rate 0.67 (95% CI 0.09-0.99), Fisher p vs baseline 0.4."""
    kinds = ", ".join(f"{VERB[o]} {getattr(r, o)}" for o in FAILURES if getattr(r, o))
    text = (f"`{r.variant}` failed in {sum(getattr(r, o) for o in FAILURES)} of {r.seeds} seeds ({kinds}), rate "
            f"{_g(r.failure_rate, '.2f')} (95% CI {_g(r.failure_lo, '.2f')}-{_g(r.failure_hi, '.2f')})")
    if r.variant != BASELINE:
        text += f", Fisher p vs baseline {_g(r.fisher_p, '.2g')}"
        text += ": significantly more often than the baseline" if r.fails_more else ""
    return text


def verdict_lines(summary: pd.DataFrame, metric: str, final_samples: int = 0) -> list[str]:
    """Failures first, then the primary metric's answer, then each variant's own sentence from studies.verdict."""
    name = LABEL[metric]
    failing = summary[summary[list(FAILURES)].sum(axis=1) > 0]
    if len(failing):
        lines = ["**Failures**: " + "; ".join(_failures(r) for r in failing.itertuples())
                 + ". Failed seeds count in their variant's n and stay out of its metric's mean."]
    else:
        lines = ["**Failures**: none; every seed with a result finished."]
    winner = summary[summary["best"]]
    if len(winner):
        r = winner.iloc[0]
        lines.append(f"**Final {name}**: `{r['variant']}` is better than the baseline: {_g(r['mean'])} against "
                     f"{_g(summary.set_index('variant').loc[BASELINE, 'mean'])}, Δ {_g(r['diff'], '+.3g')} (95% CI "
                     f"{_g(r['ci_lo'], '+.3g')} to {_g(r['ci_hi'], '+.3g')}, Holm p {_g(r['p_holm'], '.3g')}).")
    else:
        lines.append(f"**Final {name}**: no variant is shown better than the baseline.")
    lines += [f"`{r.variant}`: {r.text}." for r in summary.itertuples()]
    if metric == "kid" and 0 < final_samples < 2048:
        lines.append(f"FID, shown beside KID, is computed on only {final_samples} generated images: below 2,048 it "
                     "is biased upwards, by an amount that depends on the generator, so it is not tested; compare "
                     "it only with runs under the same protocol.")
    return lines


def headline(summary: pd.DataFrame, metric: str) -> dict[str, object]:
    """The best variant and its effect, for the reports index."""
    winner = summary[summary["best"]]
    if winner.empty:
        return {"best": None, "effect": f"no variant shown better than the baseline ({LABEL[metric]})"}
    r = winner.iloc[0]
    return {"best": r["variant"], "effect": f"Δ {LABEL[metric]} {_g(r['diff'], '+.3g')} [{_g(r['ci_lo'], '+.3g')}, "
            f"{_g(r['ci_hi'], '+.3g')}], Holm p {_g(r['p_holm'], '.3g')}"}
