"""A tuned study's extra sections (`python -m studies.run NAME --tune N`): both verdicts side by side, the rates
each variant's own search chose, and whether N trials were enough.

    python -m studies.report pooling+tuned    # reports/pooling+tuned.md, with trials.csv and plain_runs.csv

The tuned study's parent run names the plain study it answers (`tune.plain_parent`) and each variant's search
(`tune.search.VARIANT`, the Optuna study, whose trials are the MLflow experiment search-NAME); the trials are
read back from MLflow like every other number of a report.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from core import records as rec
from core.errors import UserError
from core.tracking import Store
from core.records import TUNE, TUNE_TRIALS, tune_tag
from studies.report import plots, stats
from studies.report.sections import get, md

S = rec.TrialState
COUNTED = {S.COMPLETE, S.PRUNED, S.FAILED}  # a trial that spent budget; FAILED only where it ended on its own
STILL_FALLING = 0.25  # the best-so-far improved within the last quarter of the trials: N may not have been enough


def trials(store: Store, parent: pd.Series, order: list[str]) -> pd.DataFrame:
    """Every trial of every variant's search, one row each, in trial order."""
    rows = []
    for variant in order:
        name = get(parent, f"tags.{tune_tag('search', variant)}")
        if not name:
            raise UserError(f"tuned study {parent['run_id']} names no search for variant '{variant}' "
                            f"(tag {tune_tag('search', variant)})")
        found = store.runs_frame(f"search-{name}")
        if f"tags.{rec.SEARCH}" not in found:
            continue
        found = found[found[f"tags.{rec.SEARCH}"] == rec.TRIAL]
        for _, r in found.iterrows():
            state = get(r, f"tags.{rec.TRIAL_STATE}")
            # an interrupted trial (killed, or its worker lost) is run again and spent nothing
            spent = state in COUNTED and r["status"] in ("FINISHED", "FAILED")
            value = r.get(f"metrics.{rec.SEARCH_OBJECTIVE}", math.nan)
            rows.append({"variant": variant, "search": name, "trial": int(get(r, f"tags.{rec.TRIAL}", "-1")),
                         "seed": get(r, "params.train.seed"), "lr_g": float(get(r, "params.trial.lr_g", "nan")),
                         "lr_d": float(get(r, "params.trial.lr_d", "nan")), "state": state, "counted": spent,
                         "objective": float(value) if pd.notna(value) else math.nan, "run_id": r["run_id"]})
    out = pd.DataFrame(rows, columns=["variant", "search", "trial", "seed", "lr_g", "lr_d", "state", "counted",
                                      "objective", "run_id"])
    return out.sort_values(["variant", "trial"], key=lambda c: c.map(order.index) if c.name == "variant" else c)


def best_so_far(frame: pd.DataFrame) -> list[tuple[int, float]]:
    """(k, best objective of the first k counted trials) for k = 1..n, from the first complete trial on."""
    best, points = math.inf, []
    for k, value in enumerate(frame.loc[frame["counted"], "objective"], start=1):
        if math.isfinite(value) and value < best:
            best = value
        if math.isfinite(best):
            points.append((k, best))
    return points


def enough(points: list[tuple[int, float]], n: int) -> str:
    """Words on whether the variant's search had converged by trial n."""
    if not points:
        return "no trial completed: the variant kept the config's rates"
    improved = [k for (k, v), (_, prev) in zip(points[1:], points) if v < prev] or [points[0][0]]
    last = improved[-1]
    if last > n * (1 - STILL_FALLING):
        return f"**still falling** at trial {last} of {n}: more trials may find better rates"
    return f"flat since trial {last} of {n}"


def verdict_row(rows: list[stats.VariantRow], variant: str) -> str:
    """A variant's effect against its study's baseline, in one cell (the baseline: its mean)."""
    r = next((r for r in rows if r.name == variant), None)
    if r is not None and r.verdict.welch is None:
        return f"reference: {r.verdict.mean:.4g}" if math.isfinite(r.verdict.mean) else "reference: –"
    if r is None:
        return "–"
    w, v = r.verdict.welch, r.verdict
    ci = f" [{w.lo:+.3g}, {w.hi:+.3g}]" if math.isfinite(w.lo) else ""
    return f"{w.diff:+.3g}{ci}, Holm p {v.p_holm:.3g}: {stats.reading(v)}" if math.isfinite(w.diff) else "–"


def sections(store: Store, parent: pd.Series, runs: pd.DataFrame, rows: list[stats.VariantRow], order: list[str],
             metric: str, plain: tuple[pd.Series, pd.DataFrame], experiment: str, out: Path) -> list[str]:
    """The tuned study's sections (trials.csv, plain_runs.csv and searches.png written under `out`)."""
    plain_parent, plain_children = plain
    plain_runs = stats.run_table(plain_children, order, metric)
    plain_rows = stats.variant_rows(plain_runs, order, metric)
    found = trials(store, parent, order)
    found.to_csv(out / "trials.csv", index=False)
    plain_runs[["variant", "seed", "run", "outcome", f"final_{metric}", "run_id"]].assign(
        outcome=lambda f: f["outcome"].astype(str)).to_csv(out / "plain_runs.csv", index=False)
    n = int(float(get(parent, f"params.{TUNE_TRIALS}", get(parent, f"tags.{TUNE_TRIALS}", "0"))))
    curves = {v: best_so_far(found[found["variant"] == v]) for v in order}
    plots.plot_search_curves(curves, rec.LABEL[metric], out / "searches.png")
    label = rec.LABEL[metric]
    table = []
    for v in order:
        mine = found[found["variant"] == v]
        chosen = (get(parent, f"tags.{tune_tag('lr_g', v)}"), get(parent, f"tags.{tune_tag('lr_d', v)}"))
        table.append({"variant": f"`{v}`", f"Δ {label} at the baseline's rates": verdict_row(plain_rows, v),
                      f"Δ {label} at its own best rates": verdict_row(rows, v),
                      "lr_g, lr_d chosen": (f"{float(chosen[0]):.3g}, {float(chosen[1]):.3g}" if all(chosen)
                                            else "the config's (no trial completed)"),
                      "best trial": get(parent, f"tags.{tune_tag('best_trial', v)}", "–"),
                      "trials counted (complete / pruned / failed)": (
                          f"{int(mine['counted'].sum())} ({(mine['state'] == S.COMPLETE).sum()} / "
                          f"{(mine['state'] == S.PRUNED).sum()} / {(mine['counted'] & (mine['state'] == S.FAILED)).sum()})"),
                      "search": enough(curves[v], n)})
    changed = [v for v in order[1:] if verdict_row(plain_rows, v).split(": ")[-1] != verdict_row(rows, v).split(": ")[-1]]
    budget = ", ".join(f"{k[len(TUNE):]} {get(parent, f'params.{k}', get(parent, f'tags.{k}'))}"
                       for k in sorted(c[len("params."):] for c in parent.index if c.startswith(f"params.{TUNE}")))
    return ["## Two answers: at the baseline's rates, and at each variant's own", "",
            f"Lucic et al. (2018) found that most GAN variants reach similar scores given the same tuning budget: a "
            f"difference at one shared setting may measure the budget, not the trick. Here every variant (baseline "
            f"included) had its own Optuna search over `optim.lr_g` and `optim.lr_d` with the same budget ({budget}); "
            f"its trials trained with seeds disjoint from the verdict's, so a lucky trial is not evidence. The "
            f"study was then run at each variant's best pair. Left: the plain study "
            f"(`{plain_parent['run_id']}`, every variant at the baseline's rates); right: this one.", "",
            md(pd.DataFrame(table)), "",
            ("The reading changed for " + ", ".join(f"`{v}`" for v in changed) + "." if changed
             else "No variant's reading changed between the two answers."), "",
            "Verdict at the baseline's rates (the plain study):", "",
            *[f"- {s}" for s in stats.verdict_lines(plain_rows, metric)], "",
            f"Best final {label} found so far against the trial number, per variant's search: a curve still "
            f"falling at the last trials says the budget may not have been enough.", "",
            f"![best-so-far per search]({experiment}/searches.png)", "",
            f"Every trial as data: [{experiment}/trials.csv]({experiment}/trials.csv); the plain study's runs: "
            f"[{experiment}/plain_runs.csv]({experiment}/plain_runs.csv).", ""]
