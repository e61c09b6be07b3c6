"""The numbers of a report: one row per run, one typed row per variant, the verdict, all through studies.verdict.

    python -m studies.report pooling     # the verdict, the "Results per variant" and "Every run" tables

Everything here takes the DataFrame that `Store.runs_frame` (mlflow.search_runs) returns, so a test can
recompute any number from the same store. Keys are read by their names in core.records: a key the runs should
hold and do not (a writer renamed it) is a UserError naming it, never a column of blanks; keys optional by
design (a store from before a metric existed) are shown as "not recorded". The study's primary metric (the
`derived.primary_metric` param: KID below 2,048 final samples, else FID) decides; the other is shown beside it. A
seed that diverged, collapsed, saturated D or crashed is a result: it counts in its variant's n for the failure
rate (Clopper-Pearson interval, Fisher's exact test against the baseline), and its metric stays out of the Welch
+ Holm test, which compares finished seeds only. Unfinished runs (killed, still running) are listed and count
nowhere.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core import records as rec
from core.errors import UserError
from core.records import COMPLETED, FAILURES, LABEL, Outcome, other_family
from studies.verdict import BASELINE, VariantRecord, VariantVerdict, best, verdict

NOT_RECORDED = "not recorded"  # the cell of a key that is optional by design and absent from this store
SHOWN = (rec.PRECISION, rec.RECALL, rec.COVERAGE)  # fidelity and diversity beside the distances in the variant table
SECONDARY = (rec.RECALL, rec.COVERAGE)  # diversity, tested against the baseline apart from the primary verdict
NEAR_ZERO = 0.01  # a secondary metric whose every variant mean is below this cannot tell them apart: said so
EVALUATED = (Outcome.FINISHED, Outcome.COLLAPSED, Outcome.D_SATURATED)  # outcomes that ran the final evaluation


# ---- reading the runs ----------------------------------------------------------------------------------------
def _column(children: pd.DataFrame, column: str, *, required_by: pd.Series | None = None,
            optional_for: pd.Series | None = None, missing: set[str] | None = None) -> pd.Series:
    """A column of the runs frame. Absent while a run in `required_by` should hold it: a UserError naming the key.
    Absent while runs in `optional_for` could hold it (optional by design: the store predates it): NaN, and the
    column joins `missing` (labelled "not recorded"). Otherwise NaN: keys no run was meant to write (no final
    evaluation in the protocol, a tag written only when its event happened)."""
    if column in children:
        return children[column]
    if required_by is not None and required_by.any():
        runs = ", ".join(children.loc[required_by, f"tags.{rec.RUN_NAME}"].astype(str).head(3))
        raise UserError(f"no run records `{column}` although {int(required_by.sum())} should (e.g. {runs}); "
                        "the store was written under other names: core/records.py names what a run records")
    if optional_for is not None and optional_for.any() and missing is not None:
        missing.add(column)
    return pd.Series([math.nan] * len(children), index=children.index, dtype=object)


def _num(column: pd.Series) -> np.ndarray:
    return pd.to_numeric(column, errors="coerce").to_numpy(float)


def run_table(children: pd.DataFrame, order: list[str] | None, metric: str) -> pd.DataFrame:
    """One row per child run, as MLflow holds it, in variant order then seed; `metric` is the study's primary one.

    The frame's attrs["not_recorded"] lists the optional columns this store lacks."""
    missing: set[str] = set()
    tag, metric_col = (lambda k: f"tags.{k}"), (lambda k: f"metrics.{k}")
    outcome = _column(children, tag(rec.OUTCOME)).fillna(Outcome.UNFINISHED).map(Outcome.read)
    # a run still tagged 'running' whose MLflow status is over was killed without reaching its finally block
    outcome = outcome.where(~((outcome == Outcome.RUNNING) & (children["status"] != "RUNNING")), Outcome.UNFINISHED)
    final_samples = _column(children, "params.eval.fid_final_samples").astype(str)
    evaluated = outcome.isin(EVALUATED) & (final_samples != "0")  # runs whose final evaluation was logged
    logged = outcome.isin(EVALUATED)  # runs that trained to the end, so logged at least once
    optional = dict(optional_for=evaluated, missing=missing)
    finals = {m: _num(_column(children, metric_col(rec.final_key(m)), **optional,
                              required_by=evaluated if m == metric else None))
              for m in (*rec.FAMILIES, *rec.FIDELITY_DIVERSITY)}
    table = pd.DataFrame({
        "variant": children[tag(rec.VARIANT)].values, "seed": children[tag(rec.SEED)].astype(int).values,
        "run": _column(children, tag(rec.RUN_NAME)).fillna("").values, "outcome": outcome.values,
        **{f"final_{m}": finals[m] for m in finals},
        "kid_std": _num(_column(children, metric_col(rec.final_std_key(rec.KID)), **optional)),
        **{f"best_{m}": _num(_column(children, metric_col(rec.best_key(m)), **optional)) for m in rec.FAMILIES},
        "kimg": _num(_column(children, metric_col(rec.KIMG), required_by=logged)),
        "img_per_s": _num(_column(children, metric_col(rec.IMG_PER_S), required_by=logged)),
        "diverged_at_kimg": _num(_column(children, tag(rec.DIVERGED_AT))) / 1000,
        "saturation": _column(children, tag(rec.SATURATION_EPISODES)).fillna("").values,
        "run_id": children["run_id"].values,
        "reused_from": _column(children, tag(rec.REUSED_FROM)).fillna("").values,  # the original run of a reused one
        "reused_study": _column(children, tag(rec.REUSED_STUDY)).fillna("").values,
    })
    table["source_id"] = table["reused_from"].where(table["reused_from"] != "", table["run_id"])  # history, grids
    rank = {v: i for i, v in enumerate(order or sorted(table["variant"].unique()))}
    table["_rank"] = table["variant"].map(lambda v: rank.get(v, len(rank)))
    table = table.sort_values(["_rank", "variant", "seed"]).drop(columns="_rank").reset_index(drop=True)
    table.attrs["not_recorded"] = sorted(missing)
    return table


def recorded(runs: pd.DataFrame, key: str) -> bool:
    """Whether the store holds `key` (a metrics.* column) at all; False for a store from before it existed."""
    return f"metrics.{key}" not in runs.attrs.get("not_recorded", ())


def counted(runs: pd.DataFrame, metric: str) -> pd.Series:
    """Runs whose final metric enters the test: completed (finished or stopped), with a finite final value."""
    return runs["outcome"].isin(COMPLETED) & np.isfinite(runs[f"final_{metric}"].astype(float))


def records(runs: pd.DataFrame, order: list[str], metric: str) -> list[VariantRecord]:
    """Per variant: the final metric of its counted seeds and its seeds per outcome, as studies.verdict takes them."""
    ok = counted(runs, metric)
    return [VariantRecord(v, runs.loc[ok & (runs["variant"] == v), f"final_{metric}"].to_numpy(float),
                          runs.loc[runs["variant"] == v, "outcome"].value_counts().to_dict()) for v in order]


# ---- one typed row per variant ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class VariantRow:
    """A variant as the report shows it: its verdict, its seeds by outcome, the other metric, its speed."""
    verdict: VariantVerdict
    outcomes: Mapping[Outcome, int]  # seeds per outcome, unfinished ones included
    beside: Mapping[str, tuple[float, float] | None]  # the other metric, precision, recall, coverage: (mean, sd)
                                                      # over the seeds the test counts; None: the store predates it
    img_per_s: float  # mean over runs of the throughput at the last log
    best: bool  # the starred variant (studies.verdict.best)

    @property
    def name(self) -> str:
        return self.verdict.name

    def count(self, outcome: Outcome) -> int:
        return int(self.outcomes.get(outcome, 0))

    @property
    def unfinished(self) -> int:
        return sum(c for o, c in self.outcomes.items() if o not in (*COMPLETED, *FAILURES))


def variant_rows(runs: pd.DataFrame, order: list[str], metric: str) -> list[VariantRow]:
    """Per variant: its verdict on the primary metric, its outcomes, the other metric beside it, its speed."""
    verdicts = verdict(records(runs, order, metric), LABEL[metric], lower_is_better=True)
    other, winner = other_family(metric), best(verdicts)
    rows = []
    for v in verdicts:
        mine = runs[runs["variant"] == v.name]
        beside = {}
        for m in (other, *SHOWN):
            side = mine.loc[counted(mine, metric), f"final_{m}"].to_numpy(float)
            side = side[np.isfinite(side)]
            beside[m] = ((float(side.mean()) if len(side) else math.nan,
                          float(side.std(ddof=1)) if len(side) > 1 else math.nan)
                         if recorded(runs, rec.final_key(m)) else None)
        speed = mine["img_per_s"].astype(float)
        rows.append(VariantRow(
            verdict=v, outcomes={Outcome(o): int(c) for o, c in mine["outcome"].value_counts().items()},
            beside=beside, img_per_s=float(speed.mean()) if speed.notna().any() else math.nan,
            best=v.name == winner))
    return rows


def secondary_verdicts(runs: pd.DataFrame, order: list[str]) -> dict[str, list[VariantVerdict]]:
    """Recall and coverage (higher is better) against the baseline: Welch, Holm within each metric across the
    study's variants, on each metric's own finished seeds. Secondary: the primary verdict's error rate is its own."""
    return {m: verdict(records(runs, order, m), LABEL[m], lower_is_better=False) for m in SECONDARY
            if recorded(runs, rec.final_key(m))}


# ---- the tables as a reviewer reads them --------------------------------------------------------------------------
def _g(x, fmt: str = ".4g") -> str:
    return format(x, fmt) if isinstance(x, (int, float, np.floating)) and math.isfinite(x) else "–"


def _mean_sd(mean: float, sd: float, n: int) -> str:
    if n == 0 or not math.isfinite(mean):
        return "–"
    return f"{_g(mean)} ± {_g(sd, '.2g')}" if n > 1 else f"{_g(mean)} (1 seed)"


def reading(v: VariantVerdict) -> str:
    """A variant's verdict against the baseline in words (the summary's and the tuned report's cells)."""
    if v.better:
        return "better"
    if v.significant and v.gain < 0:
        return "worse"
    if v.significant:  # better on the metric, but failing significantly more often
        return "better on the metric, fails more often"
    return "not told apart"


def significance(r: VariantRow) -> str:
    """The significance cell: what the Holm-adjusted Welch test says, or why it could not run."""
    v = r.verdict
    if v.name == BASELINE:
        return "–"
    if v.welch.note:
        return v.welch.note
    if not v.significant:
        return "no"
    if v.better:
        return "**yes**: better"
    return "yes: worse" if v.welch.diff > 0 else "yes: lower on finished seeds, but fails significantly more often"


def _delta(r: VariantRow) -> str:
    w = r.verdict.welch
    if w is None or not math.isfinite(w.diff):
        return "–"
    return f"{_g(w.diff, '+.3g')} " + (f"[{_g(w.lo, '+.3g')}, {_g(w.hi, '+.3g')}]" if math.isfinite(w.lo)
                                       else "(no interval)")


def _beside(r: VariantRow, family: str) -> str:
    shown = r.beside[family]
    return _mean_sd(*shown, r.verdict.finished) if shown is not None else NOT_RECORDED


def display_summary(rows: Sequence[VariantRow], metric: str) -> pd.DataFrame:
    """The variant table as a reviewer reads it: failures first, then the primary metric and its test."""
    name, other = LABEL[metric], LABEL[other_family(metric)]
    out = []
    for r in rows:
        v = r.verdict
        outcomes = " / ".join(str(r.count(o)) for o in (Outcome.FINISHED, *FAILURES))
        if r.count(Outcome.STOPPED):
            outcomes += f" (+{r.count(Outcome.STOPPED)} stopped early, in finished)"
        if r.unfinished:
            outcomes += f" (+{r.unfinished} unfinished)"
        base = v.name == BASELINE
        out.append({
            "variant": f"**{v.name}** ★ best" if r.best else v.name, "seeds (n)": v.seeds,
            "finished / diverged / collapsed / d_saturated / failed": outcomes,
            "failure rate [95% CI]": f"{_g(v.failure_rate, '.2f')} [{_g(v.failure_lo, '.2f')}, {_g(v.failure_hi, '.2f')}]"
            if v.seeds else "–",
            "Fisher p vs baseline": "–" if base else _g(v.fisher_p, ".2g"),
            f"final {name} (mean ± sd)": _mean_sd(v.mean, v.sd, v.finished),
            f"final {other} (mean ± sd)": _beside(r, other_family(metric)),
            f"Δ {name} vs baseline [95% Welch CI]": "(reference)" if base else _delta(r),
            "Holm p": "–" if base else _g(v.p_holm, ".3g"), "significant": significance(r),
            "MDE": "–" if base else _g(v.mde, ".3g"),
            **{f"final {LABEL[m]} (mean ± sd)": _beside(r, m) for m in SHOWN}, "img/s": _g(r.img_per_s, ".0f"),
        })
    return pd.DataFrame(out)


def _episodes(cell: str) -> str:
    """'[[8000,12000]]' (nimg) as '8-12 kimg'; '' when none."""
    try:
        episodes = json.loads(cell) if cell else []
    except ValueError:
        return cell
    return ", ".join(f"{a / 1000:g}-{b / 1000:g} kimg" for a, b in episodes)


def display_runs(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Every run, failed and unfinished ones included, with its MLflow run id."""
    def cells(column: str, key: str, fmt: str = ".4g") -> list[str]:
        shown = recorded(runs, key)
        return [_g(v, fmt) if shown else NOT_RECORDED for v in runs[column]]

    kid_shown = recorded(runs, rec.final_key(rec.KID))
    kid = [(f"{_g(v)} ± {_g(s, '.2g')}" if math.isfinite(v) else "–") if kid_shown else NOT_RECORDED
           for v, s in zip(runs["final_kid"], runs["kid_std"])]
    return pd.DataFrame({
        "run": runs["run"], "variant": runs["variant"], "seed": runs["seed"], "outcome": runs["outcome"].astype(str),
        "in test": np.where(counted(runs, metric), "yes", "no"),
        "final KID ± SE": kid, "final FID": cells("final_fid", rec.final_key(rec.FID)),
        **{LABEL[m]: cells(f"final_{m}", rec.final_key(m), ".3g") for m in rec.FIDELITY_DIVERSITY},
        "best KID in training (selected after the fact)": cells("best_kid", rec.best_key(rec.KID)),
        "best FID in training (selected after the fact)": cells("best_fid", rec.best_key(rec.FID)),
        "D saturated": [_episodes(c) or "–" for c in runs["saturation"]],
        "kimg": [_g(v, ".3g") for v in runs["kimg"]], "diverged at kimg": [_g(v, ".3g") for v in runs["diverged_at_kimg"]],
        "img/s": [_g(v, ".0f") for v in runs["img_per_s"]], "MLflow run id": [f"`{r}`" for r in runs["run_id"]],
        "reused from": [f"`{r}` ({s})" if r else "–" for r, s in zip(runs["reused_from"], runs["reused_study"])],
    })


# ---- the verdict in words -----------------------------------------------------------------------------------------
def _failures(r: VariantRow) -> str:
    """`maxpool` failed in 2 of 3 seeds (diverged 2), rate 0.67 (95% CI 0.09-0.99), Fisher p vs baseline 0.4."""
    v = r.verdict
    kinds = ", ".join(f"{o.verb} {r.count(o)}" for o in FAILURES if r.count(o))
    text = (f"`{v.name}` failed in {sum(r.count(o) for o in FAILURES)} of {v.seeds} seeds ({kinds}), rate "
            f"{_g(v.failure_rate, '.2f')} (95% CI {_g(v.failure_lo, '.2f')}-{_g(v.failure_hi, '.2f')})")
    if v.name != BASELINE:
        text += f", Fisher p vs baseline {_g(v.fisher_p, '.2g')}"
        text += ": significantly more often than the baseline" if v.fails_more else ""
    return text


def winner(rows: Sequence[VariantRow]) -> VariantRow | None:
    """The starred variant's row; None when no variant is shown better than the baseline."""
    return next((r for r in rows if r.best), None)


def verdict_lines(rows: Sequence[VariantRow], metric: str, final_samples: int = 0) -> list[str]:
    """Failures first, then the primary metric's answer, then each variant's own sentence from studies.verdict."""
    name = LABEL[metric]
    failing = [r for r in rows if any(r.count(o) for o in FAILURES)]
    if failing:
        lines = ["**Failures**: " + "; ".join(_failures(r) for r in failing)
                 + ". Failed seeds count in their variant's n and stay out of its metric's mean."]
    else:
        lines = ["**Failures**: none; every seed with a result finished."]
    top = winner(rows)
    if top is not None:
        v, base = top.verdict, next(r.verdict for r in rows if r.name == BASELINE)
        lines.append(f"**Final {name}**: `{v.name}` is better than the baseline: {_g(v.mean)} against "
                     f"{_g(base.mean)}, Δ {_g(v.welch.diff, '+.3g')} (95% CI {_g(v.welch.lo, '+.3g')} to "
                     f"{_g(v.welch.hi, '+.3g')}, Holm p {_g(v.p_holm, '.3g')}).")
    else:
        lines.append(f"**Final {name}**: no variant is shown better than the baseline.")
    lines += [f"`{r.name}`: {r.verdict.text}." for r in rows]
    if metric == rec.KID and 0 < final_samples < 2048:
        lines.append(f"FID, shown beside KID, is computed on only {final_samples} generated images: below 2,048 it "
                     "is biased upwards, by an amount that depends on the generator, so it is not tested; compare "
                     "it only with runs under the same protocol.")
    return lines


def secondary_lines(secondary: Mapping[str, Sequence[VariantVerdict]]) -> list[str]:
    """One line per variant whose recall or coverage differs significantly from the baseline's, under a heading
    that says they are secondary; with none, what difference the seeds could have missed."""
    if not secondary:
        return []
    names = " and ".join(LABEL[m] for m in secondary)
    lines = [f"**Diversity (secondary)**: {names} (higher is better: more of the real images' variety reached), "
             "each tested against the baseline with Welch's t-test, Holm-adjusted within that metric across the "
             "study's variants, on its own finished seeds. Secondary: they leave the primary verdict and its error "
             "rate as they are."]
    for m, verdicts in secondary.items():
        base = next(v for v in verdicts if v.name == BASELINE)
        for v in verdicts:
            if v.name == BASELINE or not v.significant:
                continue
            w = v.welch
            lines.append(f"`{v.name}`: {LABEL[m]} significantly {'higher' if w.diff > 0 else 'lower'} than the "
                         f"baseline's: {_g(v.mean, '.3g')} against {_g(base.mean, '.3g')}, Δ {_g(w.diff, '+.3g')} "
                         f"(95% CI {_g(w.lo, '+.3g')} to {_g(w.hi, '+.3g')}, Holm p {_g(v.p_holm, '.3g')}).")
    if len(lines) == 1:
        lines.append(f"No variant differs significantly from the baseline in {names}; differences smaller than "
                     f"these could have been missed: {'; '.join(_mde_range(m, vs) for m, vs in secondary.items())}.")
    floor = [LABEL[m] for m, vs in secondary.items() if max((v.mean for v in vs if math.isfinite(v.mean)),
                                                             default=math.nan) < NEAR_ZERO]
    if floor:
        which = " and ".join(floor)
        lines.append(f"{which[0].upper()}{which[1:]} {'is' if len(floor) == 1 else 'are'} below {NEAR_ZERO} in every "
                     "variant's mean: the samples reach almost no real image's neighbourhood, so this metric "
                     "cannot tell the variants apart here.")
    return lines


def _mde_range(metric: str, verdicts: Sequence[VariantVerdict]) -> str:
    """'recall 0.0014', 'coverage 0.077 to 0.16': the smallest detectable differences across the variants."""
    mdes = [v.mde for v in verdicts if math.isfinite(v.mde)]
    if not mdes:
        return f"{LABEL[metric]} –"
    lo, hi = _g(min(mdes), ".2g"), _g(max(mdes), ".2g")
    return f"{LABEL[metric]} {lo}" + ("" if lo == hi else f" to {hi}")


def headline(rows: Sequence[VariantRow], metric: str) -> dict[str, object]:
    """The best variant and its effect, for the reports index."""
    top = winner(rows)
    if top is None:
        return {"best": None, "effect": f"no variant shown better than the baseline ({LABEL[metric]})"}
    w = top.verdict.welch
    return {"best": top.name, "effect": f"Δ {LABEL[metric]} {_g(w.diff, '+.3g')} [{_g(w.lo, '+.3g')}, "
            f"{_g(w.hi, '+.3g')}], Holm p {_g(top.verdict.p_holm, '.3g')}"}
