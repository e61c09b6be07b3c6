"""A report's markdown, section by section, from what MLflow holds: write_report builds reports/NAME.md.

    python -m studies.report pooling      # write_report(Store(), "pooling")
    python -m studies.run pooling         # calls write_report at the end of the study

Every number, curve and image is read back from the tracking store (params, tags, metric histories,
artifacts), so a report can be rebuilt or audited at any later time; reports/README.md, an index over every
report in the folder, is rewritten alongside.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from core import records as rec
from core.errors import UserError
from core.records import LABEL, other_family
from core.tracking import Store
from studies.report import plots, stats, tuned
from studies.report.index import INDEX_MARK, write_index
from studies.report.sections import (ablated_section, evidence, get, md, mlflow_section, portable, run_params,
                                     setup_section, variant_order)

def table_note(metric: str) -> str:
    name, other = LABEL[metric], LABEL[other_family(metric)]
    return (
        f"One row per variant; the primary metric is the run's `{rec.final_key(metric)}` ({name}), the other metric "
        f"(`{rec.final_key(other_family(metric))}`, {other}) is shown beside it on the same seeds. *seeds (n)*: "
        "runs with a result, failed ones included; the failure rate is failures / n with an exact (Clopper-Pearson) "
        "95% interval, and Fisher's exact test compares it with the baseline's. Means and sds are over finished "
        f"seeds only. Δ = variant mean − baseline mean (negative is better), with a 95% Welch t-interval; *Holm p* is "
        "Welch's p-value Holm-adjusted across the study's variants, and *significant* means Holm p < 0.05 (*too few "
        "seeds*: fewer than 2 finished seeds in a group). *MDE*: the smallest true difference this many seeds "
        "detects with 80% power (two-sided 5%, pooled seed-to-seed sd): a difference smaller than it could have been "
        "missed. ★ marks the variant with the largest significant improvement that does not fail significantly more "
        "often than the baseline; with none, nothing is starred. *precision*, *recall* (k = 3) and *coverage* "
        "(k = 5): fidelity and diversity from the same Inception features as the metric (core/prdc.py; higher is "
        "better), mean ± sd over the same seeds; recall and coverage are tested in the verdict's secondary lines. "
        "img/s: training throughput at the last log, mean over runs.")


def study_runs(store: Store, experiment: str, parent_id: str | None = None) -> tuple[pd.Series, pd.DataFrame]:
    """The parent run (latest if not given) and its child runs, one row each."""
    runs = store.runs_frame(experiment)
    if runs.empty or f"tags.{rec.STUDY}" not in runs:
        raise UserError(f"experiment '{experiment}' holds no study runs; run `python -m studies.run` first")
    parents = runs[runs[f"tags.{rec.STUDY}"] == rec.PARENT].sort_values("start_time", ascending=False)
    if parent_id:
        parents = parents[parents["run_id"] == parent_id]
    if parents.empty:
        raise UserError(f"no study parent run {parent_id or ''} in experiment '{experiment}'")
    parent = parents.iloc[0]
    if f"tags.{rec.PARENT_RUN}" not in runs:
        raise UserError(f"study run {parent['run_id']} in '{experiment}' has no child runs yet")
    children = runs[(runs[f"tags.{rec.PARENT_RUN}"] == parent["run_id"]) & runs[f"tags.{rec.VARIANT}"].notna()].copy()
    if children.empty:
        raise UserError(f"study run {parent['run_id']} in '{experiment}' has no child runs yet")
    return parent, children


def _pictures(store: Store, experiment: str, children: pd.DataFrame, runs: pd.DataFrame,
              rows: list[stats.VariantRow], order: list[str], metric: str, out: Path) -> list[str]:
    """Curves, sample grids and the timelapse, written under `out`; returns their markdown."""
    groups = {v: list(runs[runs["variant"] == v]["run_id"]) for v in order}
    samples = int(run_params(children, runs["run_id"].iloc[0]).get("eval.fid_samples", 0) or 0)
    panels = [(rec.train_key(m, samples), m) for m in (metric, other_family(metric))]
    source = dict(zip(runs["run_id"], runs["source_id"]))  # a reused run's history and grids are its original's
    held = plots.histories(store, sorted(set(source.values())),
                           [k for k, _ in panels] + [*plots.LOSS_KEYS, *plots.D_KEYS])
    hist = {rid: held[source[rid]] for rid in runs["run_id"]}
    # every run that trained to its end logged D's and G's statistics: none at all means they were logged under
    # other names, and the curves would be blank panels
    trained = list(runs.loc[runs["outcome"].isin(stats.EVALUATED), "run_id"])
    lost = [k for k in (*plots.LOSS_KEYS, *plots.D_KEYS) if trained and not any(hist[r][k] for r in trained)]
    if lost:
        raise UserError(f"no run records {', '.join(f'`metrics.{k}`' for k in lost)} although {len(trained)} trained "
                        "to the end; the store was written under other names: core/records.py names what a run records")
    final = runs[stats.counted(runs, metric)]
    smooth = plots.smoothing_window(hist, plots.LOSS_KEYS[0])
    plots.plot_metrics(hist, groups, panels, final, out / "metrics.png")
    fidelity = stats.recorded(runs, rec.final_key(rec.RECALL)) and final[f"final_{rec.RECALL}"].notna().any()
    if fidelity:
        plots.plot_fidelity_diversity(groups, final, order[0], out / "fidelity_diversity.png")
    plots.plot_pair(hist, groups, plots.LOSS_KEYS, ("D loss", "G loss (non-saturating)"), out / "losses.png", smooth)
    plots.plot_pair(hist, groups, plots.D_KEYS, ("D(x): D's mean output on real images",
                                                 "D(G(z)): D's mean output on generated images"),
                    out / "d_outputs.png", smooth)
    evaluated = any(hist[r][k] for r in runs["run_id"] for k, _ in panels)
    lines = ["## Curves", "", "Mean over seeds, band from the lowest to the highest seed; x = images seen. ◆: the "
             "final value on the final sample count, mean ± sd over finished seeds.", "",
             f"![{LABEL[metric]} and the other metric against images seen]({experiment}/metrics.png)" if evaluated else
             f"No run evaluated G during training (`eval.fid_every_kimg` = 0), so the metrics are the final values: "
             f"one point per finished seed, ◆ the variant's mean ± sd.\n\n"
             f"![final {LABEL[metric]} and the other metric per seed]({experiment}/metrics.png)", "",
             *([f"Fidelity against diversity at the end of training: precision against recall (k = 3) and density "
                f"against coverage (k = 5), one point per finished seed, ✕ the baseline's mean. Right is more "
                f"fidelity (samples inside the real images' manifold), up more diversity (real images reached by "
                f"the samples); a G that buys fidelity with diversity moves right and down.", "",
                f"![precision against recall per seed]({experiment}/fidelity_diversity.png)", ""] if fidelity else []),
             f"![G and D losses]({experiment}/losses.png)", "", f"![D(x) and D(G(z))]({experiment}/d_outputs.png)", "",
             "## Samples", "", "The last fixed-z grid of each variant (every run draws its grids from the same z, so "
             "images line up across variants); from its lowest finished seed.", ""]
    cells, heads = [], []
    for variant in order:
        mine = runs[runs["variant"] == variant]
        ok = stats.counted(mine, metric)
        for _, run in pd.concat([mine[ok], mine[~ok]]).iterrows():
            grids = plots.sample_artifacts(store, run["source_id"])
            if grids:
                plots.copy_artifact(store, run["source_id"], grids[-1], out / f"samples-{variant}.png")
                heads.append(f"{variant} (`{run['run']}`, {run['outcome']})")
                cells.append(f"![{variant} samples]({experiment}/samples-{variant}.png)")
                break
        else:
            heads.append(variant)
            cells.append("_no sample grid logged_")
    lines += [md(pd.DataFrame([cells], columns=heads)), ""]
    starred = stats.winner(rows)
    shown = starred.name if starred is not None else order[0]  # the starred variant, else the baseline
    done = final[final["variant"] == shown].sort_values(f"final_{metric}")
    gif = plots.timelapse_gif(store, done["source_id"].iloc[0], out / "timelapse.gif") if len(done) else None
    if gif:
        lines += [f"Training timelapse of {'the starred variant' if starred else 'the baseline'}'s run with the "
                  f"lowest final {LABEL[metric]}, `{done['run'].iloc[0]}` ({done[f'final_{metric}'].iloc[0]:.4g}),"
                  f" {gif[1]} fixed-z grid{'s' if gif[1] != 1 else ''}:", "",
                  f"![timelapse of {done['run'].iloc[0]}]({experiment}/timelapse.gif)", ""]
    return lines


def primary_metric(children: pd.DataFrame, order: list[str]) -> str:
    """The study's primary metric, as its first baseline seed recorded it; fid for runs from before it was recorded."""
    mine = children[children[f"tags.{rec.VARIANT}"] == order[0]]
    first = mine.iloc[mine[f"tags.{rec.SEED}"].astype(int).argsort(kind="stable")]["run_id"].iloc[0]
    return run_params(children, first).get(rec.PRIMARY_METRIC_PARAM, rec.FID)


def write_report(store: Store, experiment: str, reports_dir: Path = Path("reports"),
                 parent_id: str | None = None) -> Path:
    """Build reports/EXPERIMENT.md and reports/EXPERIMENT/ from the store, then refresh reports/README.md."""
    parent, children = study_runs(store, experiment, parent_id)
    order = variant_order(parent, children)
    metric = primary_metric(children, order)
    runs = stats.run_table(children, order, metric)
    rows = stats.variant_rows(runs, order, metric)
    final_samples = int(run_params(children, runs["run_id"].iloc[0]).get("eval.fid_final_samples", 0) or 0)
    verdict = stats.verdict_lines(rows, metric, final_samples)
    secondary = stats.secondary_lines(stats.secondary_verdicts(runs, order))
    ablation = get(parent, f"tags.{rec.ABLATION}", experiment.split("@")[0])

    reports_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{experiment}-", dir=reports_dir))  # swapped in only when complete
    staging.chmod(0o755)  # mkdtemp makes it private; the published folder should read like any other
    try:
        pictures = _pictures(store, experiment, children, runs, rows, order, metric, staging)
        plain_id = get(parent, f"tags.{rec.TUNE_PLAIN}")
        both = (tuned.sections(store, parent, runs, rows, order, metric,
                               study_runs(store, experiment.removesuffix(rec.TUNED_SUFFIX), plain_id), experiment, staging)
                if plain_id else [])  # a tuned study (--tune): both verdicts side by side
        evidence(children, runs, get(parent, f"tags.{rec.PRESET}"), metric, final_samples).to_csv(
            staging / "runs.csv", index=False)
        index = {"experiment": experiment, "parent": parent["run_id"], "preset": get(parent, f"tags.{rec.PRESET}"),
                 "started": pd.Timestamp(parent["start_time"]).strftime("%Y-%m-%d %H:%M"),
                 "seeds": int(runs.groupby("variant").size().max()), "variants": order, "metric": metric,
                 "runs": len(runs), "counted": int(stats.counted(runs, metric).sum()),
                 **stats.headline(rows, metric), "verdict": verdict[1]}
        name = LABEL[metric]
        lines = [f"<!-- {INDEX_MARK} {json.dumps(index)} -->",
                 f"# Ablation study: {experiment}", "",
                 f"_Generated by `python -m studies.report {experiment}` from the MLflow store `{store.uri}` "
                 f"(study run `{parent['run_id']}`, preset `{get(parent, f'tags.{rec.PRESET}')}`, primary metric "
                 f"{name}); every number and image below is read back from it._", "",
                 "## Verdict", "", *[f"- {s}" for s in verdict + secondary], "",
                 "## Results per variant", "", md(stats.display_summary(rows, metric)), "",
                 table_note(metric), "",
                 *both,
                 *pictures,
                 *ablated_section(ablation, children, runs, order),
                 *setup_section(parent, children, runs, order, metric),
                 "## Every run", "", "Best values are the lowest of the training evaluations (same sample count), "
                 "selected after the fact: they are not what a run delivers, and they never enter the test. A run "
                 "*reused from* another study was not trained again: the store had finished the same run (same "
                 "config and seed, data, metric protocol and core code); its curves and grids are the original's.", "",
                 md(stats.display_runs(runs, metric)), "",
                 f"The same runs as data, one row per run with every final metric and the varied settings: "
                 f"[{experiment}/runs.csv]({experiment}/runs.csv).", "",
                 *mlflow_section(store, experiment, parent)]
        (staging / "report.md").write_text(portable("\n".join(lines)))
        img_dir = reports_dir / experiment
        if img_dir.exists():
            shutil.rmtree(img_dir)
        (staging / "report.md").replace(reports_dir / f"{experiment}.md")
        staging.rename(img_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_index(reports_dir)
    return reports_dir / f"{experiment}.md"
