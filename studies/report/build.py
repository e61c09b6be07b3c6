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

from core.config import RunConfig, flatten
from core.errors import UserError
from core.metrics import fid_name
from core.tracking import Store
from studies.mlflow_view import filter_url, view_key, view_url
from studies.report import plots, stats
from studies.report.index import INDEX_MARK, write_index

KEY_PARAMS = ("model.resolution", "model.width", "model.z_dim", "train.batch_size", "train.kimg", "train.n_dis",
              "optim.lr_g", "optim.lr_d", "optim.beta1", "optim.beta2", "eval.fid_samples", "eval.fid_final_samples",
              "eval.g_mode")
VARIANT_IGNORES = ("train.seed", "model.g_params", "model.d_params", "derived.", "dataset.")  # not knobs of a variant
TABLE_NOTE = (
    "Final FID is the run's `fid/final` metric. *In mean*: runs that finished with a final FID; diverged, failed and "
    "unfinished runs are counted but never averaged. Δ = variant mean − baseline mean (negative is better), with a "
    "95% percentile bootstrap interval (10,000 resamples of the seeds within each group, fixed RNG seed); "
    "*significant* when the interval excludes 0, *too few seeds* when a group has fewer than 2, and *provisional* "
    "below 3 (a bootstrap over 2 seeds can only reuse those 2 values, so its interval is too narrow). img/s: "
    "training throughput at the last log, mean over runs. ★ marks the lowest mean.")
ENV_NOT_PACKAGES = ("git_commit", "git_dirty", "hostname", "platform", "cpu_count", "device", "cuda", "gpus", "command")


def study_runs(store: Store, experiment: str, parent_id: str | None = None) -> tuple[pd.Series, pd.DataFrame]:
    """The parent run (latest if not given) and its child runs, one row each."""
    runs = store.runs_frame(experiment)
    if runs.empty or "tags.study" not in runs:
        raise UserError(f"experiment '{experiment}' holds no study runs; run `python -m studies.run` first")
    parents = runs[runs["tags.study"] == "parent"].sort_values("start_time", ascending=False)
    if parent_id:
        parents = parents[parents["run_id"] == parent_id]
    if parents.empty:
        raise UserError(f"no study parent run {parent_id or ''} in experiment '{experiment}'")
    parent = parents.iloc[0]
    if "tags.mlflow.parentRunId" not in runs:
        raise UserError(f"study run {parent['run_id']} in '{experiment}' has no child runs yet")
    children = runs[(runs["tags.mlflow.parentRunId"] == parent["run_id"]) & runs["tags.variant"].notna()].copy()
    if children.empty:
        raise UserError(f"study run {parent['run_id']} in '{experiment}' has no child runs yet")
    return parent, children


def _get(row: pd.Series, key: str, default: str = "") -> str:
    value = row.get(key, default)
    return default if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def _md(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, disable_numparse=True)


def _variant_order(parent: pd.Series, children: pd.DataFrame) -> list[str]:
    """The study's own order (baseline first), then any variant it did not list."""
    listed = [v for v in _get(parent, "tags.variants").split(",") if v]
    present = list(dict.fromkeys(children["tags.variant"]))
    return [v for v in listed if v in present] + [v for v in present if v not in listed]


def _params(children: pd.DataFrame, run_id: str) -> dict[str, str]:
    row = children[children["run_id"] == run_id].iloc[0]
    return {c[len("params."):]: str(row[c]) for c in children if c.startswith("params.") and pd.notna(row[c])}


def ablated_section(ablation: str, children: pd.DataFrame, runs: pd.DataFrame, order: list[str]) -> list[str]:
    """The ablation's rationale (its docstring) and, per variant, the params that differ from the baseline in MLflow."""
    from ablations import get_ablation
    try:
        plugin = get_ablation(ablation)
        doc, declared = " ".join((plugin.__doc__ or "").split()), plugin.variants
    except UserError:
        doc, declared = f"_The ablation '{ablation}' is not registered in this checkout; its rationale is unavailable._", {}
    firsts = {v: runs[runs["variant"] == v]["run_id"].iloc[0] for v in order}
    base = _params(children, firsts[order[0]])
    rows = []
    for variant in order:
        mine = _params(children, firsts[variant])
        changed = {k: v for k, v in mine.items() if base.get(k) != v and not k.startswith(VARIANT_IGNORES)}
        changed |= {k: "(unset)" for k in base if k not in mine and not k.startswith(VARIANT_IGNORES)}
        shown = ", ".join(f"`{k}={v}`" for k, v in sorted(changed.items()))
        code = ", ".join(f"`{k}={v}`" for k, v in declared.get(variant, {}).items())
        rows.append({"variant": variant, "overrides declared by the ablation": code or "–",
                     "settings that differ from the baseline run (MLflow params)":
                     shown or ("(the baseline)" if variant == order[0] else "(none: same config)")})
    return ["## What was ablated and why", "", doc, "", _md(pd.DataFrame(rows)), ""]


def setup_section(parent: pd.Series, children: pd.DataFrame, runs: pd.DataFrame, order: list[str]) -> list[str]:
    """Baseline config, base variant, data, length, seeds, hardware, packages, commit, FID protocol."""
    params = _params(children, runs[runs["variant"] == order[0]]["run_id"].iloc[0])
    env = {c[len("tags.env."):]: _get(parent, c) for c in parent.index if c.startswith("tags.env.") and _get(parent, c)}
    lines = [_study_line(parent), _command_line(env), _data_line(params), _length_line(params, runs["kimg"].dropna()),
             _seeds_line(sorted(runs["seed"].unique())), _hardware_line(children, env), _packages_line(env),
             _code_line(env), _fid_line(params, children)]
    return ["## Setup", "", *lines, "", "Baseline configuration (key settings and every setting changed from the "
            "`RunConfig()` defaults):", "", _md(_config_table(params)), ""]


def _study_line(parent: pd.Series) -> str:
    started = pd.Timestamp(parent["start_time"]).strftime("%Y-%m-%d %H:%M %Z")
    return (f"- **Study**: preset `{_get(parent, 'tags.preset')}`, base variant `{_get(parent, 'tags.base', 'none')}`, "
            f"study run `{parent['run_id']}`, started {started}.")


def _command_line(env: dict[str, str]) -> str:
    return f"- **Command**: `{env['command']}`" if env.get("command") else "- **Command**: not recorded"


def _data_line(params: dict[str, str]) -> str:
    side = params.get("model.resolution", "?")
    return (f"- **Data**: {params.get('dataset.source', '?')}, {params.get('dataset.images', '?')} images "
            f"({params.get('dataset.skipped', '0')} unreadable skipped) at {side}x{side} px.")


def _length_line(params: dict[str, str], reached: pd.Series) -> str:
    steps, batch = params.get("derived.steps", "?"), params.get("train.batch_size", "?")
    planned = f"- **Length**: {steps} G steps of batch {batch} = {params.get('train.kimg', '?')} kimg planned per run"
    return planned + (f"; runs reached {reached.min():.3g}-{reached.max():.3g} kimg." if len(reached) else ".")


def _seeds_line(seeds: list) -> str:
    return f"- **Seeds**: {', '.join(map(str, seeds))} ({len(seeds)} per variant; seeds weights, batches and z)."


def _hardware_line(children: pd.DataFrame, env: dict[str, str]) -> str:
    devices = sorted({_get(r, "tags.device_name") or _get(r, "tags.device") for _, r in children.iterrows()} - {""})
    line = f"- **Hardware**: {', '.join(devices) or 'not recorded'}"
    if "hostname" not in env:
        return line + " (host not recorded)."
    return (line + f"; host `{env['hostname']}`, {env.get('cpu_count', '?')} CPU cores, CUDA {env.get('cuda', '?')}, "
            f"{env.get('platform', '?')}.")


def _packages_line(env: dict[str, str]) -> str:
    # sorted: tags come back in an order that differs between processes, and a rebuilt report must not change
    packages = ", ".join(f"{k} {v}" for k, v in sorted(env.items()) if k not in ENV_NOT_PACKAGES)
    return f"- **Packages**: {packages or 'not recorded (the study predates provenance tags)'}."


def _code_line(env: dict[str, str]) -> str:
    if not env.get("git_commit"):
        return "- **Code**: git commit not recorded."
    dirty = " with uncommitted changes" if env.get("git_dirty") == "true" else ""
    return f"- **Code**: git commit `{env['git_commit']}`{dirty}."


def _fid_line(params: dict[str, str], children: pd.DataFrame) -> str:
    protocol = {c[len("tags.fid_protocol."):]: sorted(set(children[c].dropna().astype(str)))
                for c in children if c.startswith("tags.fid_protocol.")}
    return (f"- **FID protocol**: `fid/{fid_name(int(params.get('eval.fid_samples', 0) or 0))}` during training on "
            f"{params.get('eval.fid_samples', '?')} samples every {params.get('eval.fid_every_kimg', '?')} kimg; "
            f"final FID on {params.get('eval.fid_final_samples', '?')} samples; "
            + ", ".join(f"{k}={'/'.join(v)}" for k, v in sorted(protocol.items())) + ".")


def _config_table(params: dict[str, str]) -> pd.DataFrame:
    """Key settings and every setting of the baseline run that differs from RunConfig()'s default."""
    defaults = {k: str(v) for k, v in flatten(RunConfig()).items()}
    changed = [k for k in defaults if k in params and params[k] != defaults[k]]
    return pd.DataFrame([{"key": f"`{k}`", "baseline run": params.get(k, "–"), "RunConfig default": defaults[k],
                          "changed": "yes" if k in changed else ""}
                         for k in dict.fromkeys([*KEY_PARAMS, *changed]) if k in defaults])


def mlflow_section(store: Store, experiment: str, parent: pd.Series) -> list[str]:
    """How to open these runs in the MLflow UI, lined up by variant and seed with no filter to type."""
    pid, eid = parent["run_id"], parent["experiment_id"]
    if store.has_view(experiment, view_key(pid)):
        link = (f"<{view_url(eid, pid)}> opens the study's saved view: its child runs grouped by variant (mean "
                "per group), sorted by name `VARIANT-sSEED`, with final FID, outcome and the varied settings as "
                "columns.")
    else:
        link = f"<{filter_url(eid, pid)}> lists the study's child runs sorted by name `VARIANT-sSEED`."
    return ["## Open these runs in MLflow", "", "```bash", f"mlflow ui --backend-store-uri {store.uri} --host 127.0.0.1",
            "```", "", f"Then {link} Tick runs and press **Compare** to set them side by side. Study (parent) run "
            f"`{pid}` in experiment {eid}; every child run id is in the table above.", ""]


def _pictures(store: Store, experiment: str, children: pd.DataFrame, runs: pd.DataFrame, summary: pd.DataFrame,
              order: list[str], out: Path) -> list[str]:
    """Curves, sample grids and the timelapse, written under `out`; returns their markdown."""
    groups = {v: list(runs[runs["variant"] == v]["run_id"]) for v in order}
    params = _params(children, runs["run_id"].iloc[0])
    train_key = f"fid/{fid_name(int(params.get('eval.fid_samples', 0) or 0))}"
    hist = plots.histories(store, list(runs["run_id"]), [train_key, *plots.LOSS_KEYS, *plots.D_KEYS])
    final = runs[stats.counted(runs)]
    smooth = plots.smoothing_window(hist, plots.LOSS_KEYS[0])
    plots.plot_fid(hist, groups, train_key, final, out / "fid.png")
    plots.plot_pair(hist, groups, plots.LOSS_KEYS, ("D loss", "G loss (non-saturating)"), out / "losses.png", smooth)
    plots.plot_pair(hist, groups, plots.D_KEYS, ("D(x): D's mean output on real images",
                                                 "D(G(z)): D's mean output on generated images"),
                    out / "d_outputs.png", smooth)
    lines = ["## Curves", "", "Mean over seeds, band from the lowest to the highest seed; x = images seen.", "",
             f"![FID against images seen]({experiment}/fid.png)", "", f"![G and D losses]({experiment}/losses.png)", "",
             f"![D(x) and D(G(z))]({experiment}/d_outputs.png)", "",
             "## Samples", "", "The last fixed-z grid of each variant (every run draws its grids from the same z, so "
             "images line up across variants); from its lowest finished seed.", ""]
    cells, heads = [], []
    for variant in order:
        mine = runs[runs["variant"] == variant]
        for _, run in pd.concat([mine[stats.counted(mine)], mine[~stats.counted(mine)]]).iterrows():
            grids = plots.sample_artifacts(store, run["run_id"])
            if grids:
                plots.copy_artifact(store, run["run_id"], grids[-1], out / f"samples-{variant}.png")
                heads.append(f"{variant} (`{run['run']}`, {run['outcome']})")
                cells.append(f"![{variant} samples]({experiment}/samples-{variant}.png)")
                break
        else:
            heads.append(variant)
            cells.append("_no sample grid logged_")
    lines += [_md(pd.DataFrame([cells], columns=heads)), ""]
    best = summary[summary["best"]]
    if not best.empty:
        done = final[final["variant"] == best["variant"].iloc[0]].sort_values("final_fid")
        gif = plots.timelapse_gif(store, done["run_id"].iloc[0], out / "timelapse.gif") if len(done) else None
        if gif:
            lines += [f"Training timelapse of the best variant's best run, `{done['run'].iloc[0]}` (final FID "
                      f"{done['final_fid'].iloc[0]:.2f}), {gif[1]} fixed-z grid{'s' if gif[1] != 1 else ''}:", "",
                      f"![timelapse of {done['run'].iloc[0]}]({experiment}/timelapse.gif)", ""]
    return lines


def write_report(store: Store, experiment: str, reports_dir: Path = Path("reports"),
                 parent_id: str | None = None) -> Path:
    """Build reports/EXPERIMENT.md and reports/EXPERIMENT/ from the store, then refresh reports/README.md."""
    parent, children = study_runs(store, experiment, parent_id)
    order = _variant_order(parent, children)
    runs = stats.run_table(children, order)
    summary = stats.variant_summary(runs, order)
    params = _params(children, runs["run_id"].iloc[0])
    verdict = stats.verdict(summary, int(params["eval.fid_final_samples"]) if "eval.fid_final_samples" in params else None)
    ablation = _get(parent, "tags.ablation", experiment.split("@")[0])

    reports_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{experiment}-", dir=reports_dir))  # swapped in only when complete
    staging.chmod(0o755)  # mkdtemp makes it private; the published folder should read like any other
    try:
        pictures = _pictures(store, experiment, children, runs, summary, order, staging)
        index = {"experiment": experiment, "parent": parent["run_id"], "preset": _get(parent, "tags.preset"),
                 "started": pd.Timestamp(parent["start_time"]).strftime("%Y-%m-%d %H:%M"),
                 "seeds": int(runs.groupby("variant").size().max()), "variants": order,
                 "runs": len(runs), "counted": int(stats.counted(runs).sum()), **stats.headline(summary),
                 "verdict": verdict[0]}
        lines = [f"<!-- {INDEX_MARK} {json.dumps(index)} -->",
                 f"# Ablation study: {experiment}", "",
                 f"_Generated by `python -m studies.report {experiment}` from the MLflow store `{store.uri}` "
                 f"(study run `{parent['run_id']}`); every number and image below is read back from it._", "",
                 "## Verdict", "", *[f"- {s}" for s in verdict], "",
                 "## Final FID per variant", "", _md(stats.display_summary(summary)), "",
                 TABLE_NOTE, "",
                 *pictures,
                 *ablated_section(ablation, children, runs, order),
                 *setup_section(parent, children, runs, order),
                 "## Every run", "", _md(stats.display_runs(runs)), "",
                 *mlflow_section(store, experiment, parent)]
        (staging / "report.md").write_text("\n".join(lines))
        img_dir = reports_dir / experiment
        if img_dir.exists():
            shutil.rmtree(img_dir)
        (staging / "report.md").replace(reports_dir / f"{experiment}.md")
        staging.rename(img_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_index(reports_dir)
    return reports_dir / f"{experiment}.md"
