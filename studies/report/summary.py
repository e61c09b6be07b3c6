"""The campaign summary: every variant of every report, against its study's baseline, in one table and one picture.

    python -m studies.report pooling     # rewrites reports/pooling.md, then reports/README.md with this summary

Built from the committed evidence alone (each report's reports/NAME/runs.csv), so it needs no tracking store
and a reader can recompute it. Per preset (a study on another preset answers another question): one row per
variant that is not a baseline, with its effect on the study's primary metric (mean difference from the
baseline, Welch 95% interval), Holm's p within its study (the study's own verdict, as its report gives it)
and Holm's p across every variant of the preset's campaign (the stricter family: it holds the error rate of
the whole table), its failures, and its recall and coverage; sorted by effect, improvements and harms both
shown. A forest plot per preset, grouped by study. Then a paragraph written from the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from core import config as config_mod
from core import records as rec
from core.errors import UserError
from studies.report import plots, stats
from studies.report.evidence import read_runs_csv, verdict_from_csv
from studies.verdict import ALPHA, VariantVerdict, holm, verdict

SUMMARY_PNG = "summary.png"
COMBINE = "combine"  # the study of the winners stacked (ablations/combine.py): its own question, not in the table


@dataclass(frozen=True)
class Effect:
    """One variant of one study against that study's baseline."""
    study: str
    preset: str
    metric: str  # the study's primary metric (fid | kid): lower is better
    base: VariantVerdict  # the study's baseline
    verdict: VariantVerdict  # Welch against the baseline, Holm within the study
    recall: float  # mean over the seeds the test counts; NaN where not recorded
    coverage: float
    p_campaign: float = math.nan  # Holm across every variant of the preset's campaign
    tuned: VariantVerdict | None = None  # the same variant in the study's --tune report: each at its own best rates
    baseline_runs: tuple[str, ...] = ()  # the runs behind the baseline (a reused one: its original): shared or not
    own_baseline: tuple[str, ...] = ()  # where the study's baseline departs from its preset (departures())

    @property
    def delta(self) -> float:
        w = self.verdict.welch
        return w.diff if w is not None else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        w = self.verdict.welch
        return (w.lo, w.hi) if w is not None else (math.nan, math.nan)

    @property
    def better(self) -> bool:
        return self.verdict.better

    @property
    def worse(self) -> bool:
        """Significantly worse within its study (Holm): a harm, shown as such."""
        return self.verdict.significant and self.delta > 0

    @property
    def campaign_significant(self) -> bool:
        return math.isfinite(self.p_campaign) and self.p_campaign < ALPHA


def departures(baseline: pd.Series, preset: str) -> tuple[str, ...]:
    """Where a study's baseline (a runs.csv row: its varied settings as columns) departs from its preset,
    "train.ema_kimg=0.0 (preset 10.0)": the ema study turns off the G_ema the cpu preset samples. Its variants
    were measured against that baseline, not the preset every other study and combine start from. The values
    are read back as the config reads --set (core.config.apply_overrides)."""
    cfg = config_mod.resolve(preset)
    defaults = config_mod.flatten(cfg)
    settings = {k: getattr(v, "item", lambda: v)() for k, v in baseline.items() if k in defaults and not pd.isna(v)}
    read = config_mod.flatten(config_mod.apply_overrides(cfg, settings))
    return tuple(f"{k}={read[k]} (preset {defaults[k]})" for k in settings if read[k] != defaults[k])


def _mean(runs: pd.DataFrame, ok: pd.Series, column: str) -> float:
    values = runs.loc[ok, column].to_numpy(float) if column in runs else np.array([])
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else math.nan


def study_effects(csv: Path) -> list[Effect]:
    """The effects of one report's variants, from its runs.csv (the study's own verdict, recomputed)."""
    study = read_runs_csv(csv)
    runs, metric = study.runs, study.metric
    verdicts = verdict(stats.records(runs, study.order, metric), rec.LABEL[metric], lower_is_better=True)
    ok = stats.counted(runs, metric)
    base = verdicts[0]
    plain = runs[runs["variant"] == base.name]
    own = departures(plain.iloc[0], study.preset)
    source = plain["run_id"].astype(str)
    if "reused_from" in plain:  # a reused run is its original: studies that reused one baseline share it
        source = plain["reused_from"].astype("string").fillna("").where(lambda r: r != "", source).astype(str)
    out = []
    for v in verdicts[1:]:
        mine = ok & (runs["variant"] == v.name)
        out.append(Effect(csv.parent.name, study.preset, metric, base, v,
                          _mean(runs, mine, f"final_{rec.RECALL}"), _mean(runs, mine, f"final_{rec.COVERAGE}"),
                          baseline_runs=tuple(sorted(source)), own_baseline=own))
    return out


def campaign(reports_dir: Path) -> dict[str, list[Effect]]:
    """Per preset, every variant of every report with a runs.csv, Holm across them all added."""
    by_preset: dict[str, list[Effect]] = {}
    tuned: dict[tuple[str, str, str], VariantVerdict] = {}  # (study, variant, preset) -> its tuned verdict
    for csv in sorted(reports_dir.glob("*/runs.csv")):
        if csv.parent.name.split("@")[0] == COMBINE:
            continue
        try:
            effects = study_effects(csv)
        except UserError:  # not a report's runs.csv: the index lists what it can
            continue
        for e in effects:
            if e.study.endswith(rec.TUNED_SUFFIX):  # beside its plain study's row, not a row of its own
                tuned[(e.study.removesuffix(rec.TUNED_SUFFIX), e.verdict.name, e.preset)] = e.verdict
            else:
                by_preset.setdefault(e.preset, []).append(e)
    for preset, effects in by_preset.items():
        by_preset[preset] = [replace(e, tuned=tuned.get((e.study, e.verdict.name, preset))) for e in effects]
    for preset, effects in by_preset.items():
        raw = [e.verdict.welch.p if e.verdict.welch is not None else math.nan for e in effects]
        adjusted = holm(raw) if raw else []
        by_preset[preset] = sorted((replace(e, p_campaign=float(p)) for e, p in zip(effects, adjusted)),
                                   key=lambda e: (not math.isfinite(e.delta), e.delta))
    return by_preset


def _best(reports_dir: Path, preset: str) -> list[Effect]:
    """Per study of `preset` whose own verdict calls a variant better than its baseline, that variant (the largest
    improvement); studies over a --base variant and a combine study have none."""
    best: dict[str, Effect] = {}
    for e in campaign(reports_dir).get(preset, []):
        if e.better and "@" not in e.study and e.study != COMBINE and (
                e.study not in best or e.verdict.gain > best[e.study].verdict.gain):
            best[e.study] = e
    return [e for _, e in sorted(best.items())]


def winners(reports_dir: Path, preset: str) -> list[tuple[str, str]]:
    """(ablation, variant): each study's best variant, better than its baseline, where that baseline is the
    preset itself; combine stacks them on the preset."""
    return [(e.study, e.verdict.name) for e in _best(reports_dir, preset) if not e.own_baseline]


def set_apart(reports_dir: Path, preset: str) -> list[str]:
    """A line per study whose best variant is better than a baseline that departs from the preset (not a
    winner: nothing compared it with the preset's own setting)."""
    return [f"`{e.study}={e.verdict.name}` is better than its study's baseline, which departs from the preset "
            f"({', '.join(e.own_baseline)}): not compared with the preset's own setting, so not stacked"
            for e in _best(reports_dir, preset) if e.own_baseline]


def _g(x: float, fmt: str = ".3g", sign: bool = False) -> str:
    return format(x, ("+" if sign else "") + fmt) if math.isfinite(x) else "–"


def _p(p: float) -> str:
    return "–" if not math.isfinite(p) else ("< 0.001" if p < 0.001 else format(p, ".3g"))


def _word(e: Effect) -> str:
    word = stats.reading(e.verdict)
    if word in ("better", "worse"):
        return f"**{word}**" + (" (campaign-wide too)" if e.campaign_significant else "")
    return word


def table(effects: list[Effect]) -> pd.DataFrame:
    rows = []
    for e in effects:
        lo, hi = e.interval
        v = e.verdict
        label = rec.LABEL[e.metric]
        rows.append({"study": f"[{e.study}]({e.study}.md)", "variant": f"`{v.name}`",
                     f"Δ {label} vs baseline [95% CI]": f"{_g(e.delta, sign=True)} [{_g(lo, sign=True)}, {_g(hi, sign=True)}]",
                     "baseline": _g(e.base.mean), "Holm p (study)": _p(v.p_holm),
                     "Holm p (campaign)": _p(e.p_campaign), "failed seeds": f"{v.failures} / {v.seeds}",
                     "recall": _g(e.recall), "coverage": _g(e.coverage),
                     "detectable Δ": _g(v.mde), "reading": _word(e)})
        if any(x.tuned is not None for x in effects):
            rows[-1][f"Δ {label} at own best rates (--tune)"] = _tuned(e.tuned)
    return pd.DataFrame(rows)


def _tuned(v: VariantVerdict | None) -> str:
    """The tuned study's effect of the same variant, each variant at its own best rates; – without one."""
    if v is None or v.welch is None:
        return "–"
    w = v.welch
    return f"{_g(w.diff, sign=True)} [{_g(w.lo, sign=True)}, {_g(w.hi, sign=True)}], {stats.reading(v)}"


def paragraph(preset: str, effects: list[Effect]) -> str:
    """Which tricks help this model under this preset, which hurt, which could not be told apart."""
    studies = sorted({e.study for e in effects})
    metric = rec.LABEL[effects[0].metric] if len({e.metric for e in effects}) == 1 else "the primary metric"
    seeds = sorted({e.verdict.seeds for e in effects})
    seeds_text = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"

    def named(group: list[Effect]) -> str:
        return "; ".join(f"`{e.study}` `{e.verdict.name}` (Δ {metric} {_g(e.delta, sign=True)} "
                         f"[{_g(e.interval[0], sign=True)}, {_g(e.interval[1], sign=True)}])" for e in group)
    helps, hurts = [e for e in effects if e.better], [e for e in effects if e.worse]
    unclear = [e for e in effects if not e.better and not e.worse]
    parts = [f"Under the `{preset}` preset, {len(effects)} variants of {len(studies)} studies, {seeds_text} seeds "
             f"each, every one against its own study's baseline ({metric}, lower is better)."]
    parts.append(f"Shown to help (Holm within its study): {named(helps)}." if helps
                 else "No variant is shown to help.")
    if hurts:
        parts.append(f"Shown to hurt: {named(hurts)}.")
    campaign_wide = [e for e in effects if e.campaign_significant]
    parts.append(f"Across the whole table (Holm over all {len(effects)}), "
                 + (f"{len(campaign_wide)} stay{'s' if len(campaign_wide) == 1 else ''} significant: "
                    + ", ".join(f"`{e.study}` `{e.verdict.name}`" for e in campaign_wide) + "."
                    if campaign_wide else "none stays significant."))
    if unclear:
        mdes = [e.verdict.mde for e in unclear if math.isfinite(e.verdict.mde)]
        detect = (f"; at these seeds a difference of {_g(min(mdes))} to {_g(max(mdes))} {metric} would have been "
                  "detected with 80% power" if mdes else "")
        parts.append("Not told apart from the baseline: "
                     + ", ".join(f"`{e.study}` `{e.verdict.name}`" for e in unclear) + detect + ".")
    parts += shared_baseline(effects, metric)
    own = {e.study: e.own_baseline for e in effects if e.own_baseline}
    if own:
        parts.append("Measured against a baseline of their own, not the preset: "
                     + "; ".join(f"`{s}` ({', '.join(d)})" for s, d in sorted(own.items()))
                     + "; their Δ compare them with that, not with the preset's own setting.")
    retuned = [e for e in effects if e.tuned is not None]
    if retuned:
        parts.append("With every variant at its own best learning rates (`--tune`, the same search budget each), "
                     + "; ".join(f"`{e.study}` `{e.verdict.name}` is {_tuned(e.tuned)}" for e in retuned) + ".")
    return " ".join(parts)


def shared_baseline(effects: list[Effect], metric: str) -> list[str]:
    """Where studies share one baseline (the same runs, reused), their Δ share its sampling error: a baseline mean
    that came out high makes every variant look better at once. Said with the share of point estimates on each
    side of zero, so a common shift is not read as evidence for each trick."""
    groups: dict[tuple[str, ...], list[Effect]] = {}
    for e in effects:
        if e.baseline_runs:
            groups.setdefault(e.baseline_runs, []).append(e)
    out = []
    for group in groups.values():
        studies = sorted({e.study for e in group})
        base = group[0].base
        if len(studies) < 2:
            continue
        below = sum(e.delta < 0 for e in group if math.isfinite(e.delta))
        se = base.sd / math.sqrt(base.finished) if base.finished > 1 else math.nan
        out.append(f"{len(studies)} studies ({', '.join(f'`{s}`' for s in studies)}) share one baseline, the same "
                   f"{len(group[0].baseline_runs)} runs ({metric} {_g(base.mean)} ± {_g(base.sd)} sd, standard "
                   f"error {_g(se)}), so its error moves all {len(group)} of their Δ alike: {below} of them "
                   f"{'lies' if below == 1 else 'lie'} below zero, and a shift common to all of them is no evidence "
                   "for any one trick.")
    return out


def _failed(v: VariantVerdict) -> str:
    """A forest row's note of its failed seeds (results too: the interval is over the finished ones only)."""
    return f" ({v.failures}/{v.seeds} failed)" if v.failures else ""


def plot_forest(effects: list[Effect], path: Path) -> Path:
    """The preset's forest plot (studies.report.plots.plot_forest), grouped by study."""
    order = sorted(effects, key=lambda e: (e.study, e.verdict.name))
    metric = rec.LABEL[order[0].metric] if len({e.metric for e in order}) == 1 else "primary metric"
    rows = [plots.ForestRow(f"{e.study}: {e.verdict.name}" + _failed(e.verdict), e.study, e.delta, *e.interval,
                            e.verdict.significant, e.campaign_significant) for e in order]
    return plots.plot_forest(rows, f"Δ {metric} against the study's baseline, 95% Welch interval (left of 0 is better)",
                             f"preset {order[0].preset}: filled = significant in its study (Holm), star = across "
                             "the campaign", path)


def summary_section(reports_dir: Path) -> list[str]:
    """The summary's markdown for reports/README.md (and its forest plots), or nothing without any runs.csv."""
    presets = campaign(reports_dir)
    if not presets:
        return []
    lines = ["## Campaign summary", "",
             "Every variant of every report above, against its own study's baseline, recomputed from the reports' "
             "`runs.csv` (`python -m studies.report NAME` rebuilds it). Δ: the variant's mean final value minus "
             "the baseline's, Welch 95% interval; Holm p (study): the study's own verdict, as its report gives it; "
             f"Holm p (campaign): adjusted over every variant of the preset, which holds the error rate ({ALPHA:g}) "
             "of the whole table; detectable Δ: the smallest difference these seeds detect with 80% power. "
             "Recall and coverage: means over the seeds the test counts. Failed seeds count as results.", ""]
    for preset, effects in sorted(presets.items(), key=lambda kv: -len(kv[1])):
        name = SUMMARY_PNG if len(presets) == 1 else f"summary-{preset}.png"
        plot_forest(effects, reports_dir / name)
        lines += [f"### Preset `{preset}`", "", paragraph(preset, effects), "",
                  table(effects).to_markdown(index=False, disable_numparse=True), "", f"![forest plot]({name})", ""]
    return lines + combine_section(reports_dir, sorted(presets))


def combine_section(reports_dir: Path, presets: list[str]) -> list[str]:
    """The winners stacked (`python -m studies.run combine`): its verdict against the baseline and its grid; before
    it ran, what it would stack per preset, or that there is nothing to stack."""
    csv = reports_dir / COMBINE / "runs.csv"
    if not csv.is_file():
        lines = ["### The winners stacked", ""]
        for preset in presets:
            found = winners(reports_dir, preset)
            lines.append(f"- Preset `{preset}`: " + (
                "nothing to stack: no variant is shown better than its study's baseline, so "
                "`python -m studies.run combine` has no winner to compose." if not found else
                f"`python -m studies.run combine --preset {preset}` would stack "
                + ", ".join(f"`{a}={v}`" for a, v in found) + "; not run yet."))
            lines += [f"- Preset `{preset}`: {line}." for line in set_apart(reports_dir, preset)]
        return lines + [""]
    study = read_runs_csv(csv)
    grid = reports_dir / COMBINE / "samples-stacked.png"
    stacked = ", ".join(f"`{a}={v}`" for a, v in winners(reports_dir, study.preset))
    return ["### The winners stacked", "",
            f"[`combine`]({COMBINE}.md) (preset `{study.preset}`): every variant above that its own study shows "
            f"better than a baseline that is the preset itself ({stacked}), composed into one variant, `stacked`, "
            "against the baseline over the same seeds.", "",
            *[f"- {line}" for line in verdict_from_csv(csv)],
            *[f"- {line}." for line in set_apart(reports_dir, study.preset)], "",
            *([f"![stacked winners, last grid]({COMBINE}/samples-stacked.png)", ""] if grid.is_file() else [])]
