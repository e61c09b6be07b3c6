"""The sections of a report that describe a study rather than judge it: what was ablated, the setup, MLflow.

    python -m studies.report pooling     # "What was ablated and why", "Setup", "Open these runs in MLflow"

All of it comes from the study's MLflow params and tags (the parent run's env.* provenance, each child's
params), never from the machine the report is built on. Absolute paths of the machine that writes the report
(the store, the data, the command line) are shown relative to the working directory, or by their last parts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from core import records as rec
from core.config import RunConfig, flatten
from core.errors import UserError
from core.tracking import Store
from studies.mlflow_view import filter_url, view_key, view_url

KEY_PARAMS = ("model.resolution", "model.width", "model.z_dim", "train.batch_size", "train.kimg", "train.n_dis",
              "optim.lr_g", "optim.lr_d", "optim.beta1", "optim.beta2", "eval.fid_samples", "eval.fid_final_samples",
              "eval.primary_metric", "eval.g_mode")
VARIANT_IGNORES = ("train.seed", "model.g_params", "model.d_params", "derived.", "dataset.")  # not knobs of a variant
ENV_NOT_PACKAGES = ("git_commit", "git_dirty", "hostname", "platform", "cpu_count", "device", "cuda", "gpus", "command")
# an absolute path of two or more parts that is not inside a URL (sqlite:////abs/path is one)
ABSOLUTE = re.compile(r"(?:(?<=sqlite:///)|(?<![\w.~/#?=&%…-]))(/[\w.@+-]+(?:/[\w.@+-]+)+/?)")


def get(row: pd.Series, key: str, default: str = "") -> str:
    value = row.get(key, default)
    return default if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def md(frame: pd.DataFrame) -> str:
    """A markdown table, its cells made portable first (so the columns still line up)."""
    cells = frame.map(lambda v: portable(v) if isinstance(v, str) else v)
    return cells.to_markdown(index=False, disable_numparse=True)


def portable(text: str, cwd: Path | None = None) -> str:
    """Absolute paths of this machine rewritten: relative to `cwd` when they share more than the root, else
    '…/' and their last two parts. Paths whose first part does not exist here (URL paths) are left alone."""
    cwd = (cwd or Path.cwd()).resolve()

    def swap(match: re.Match) -> str:
        path = match.group(1)
        if not Path("/" + path.split("/")[1]).exists():
            return path
        if os.path.commonpath([cwd, path]) != "/":
            return os.path.relpath(path, cwd)
        return "…/" + "/".join(path.rstrip("/").split("/")[-2:])

    return ABSOLUTE.sub(swap, text)


def variant_order(parent: pd.Series, children: pd.DataFrame) -> list[str]:
    """The study's own order (baseline first), then any variant it did not list."""
    listed = [v for v in get(parent, f"tags.{rec.VARIANTS}").split(",") if v]
    present = list(dict.fromkeys(children[f"tags.{rec.VARIANT}"]))
    return [v for v in listed if v in present] + [v for v in present if v not in listed]


def run_params(children: pd.DataFrame, run_id: str) -> dict[str, str]:
    row = children[children["run_id"] == run_id].iloc[0]
    return {c[len("params."):]: str(row[c]) for c in children if c.startswith("params.") and pd.notna(row[c])}


def evidence(children: pd.DataFrame, runs: pd.DataFrame, preset: str, metric: str, final_samples: int) -> pd.DataFrame:
    """The report's runs as data (reports/NAME/runs.csv): one row per child run with its outcome, every final
    metric (KID with its standard error), its progress and speed, the settings its variants vary (params that
    differ between runs, seeds aside) and its MLflow run id, read from the same run table the report shows; the
    preset, primary metric and final sample count on every row, so the verdict can be recomputed from it."""
    params = {rid: run_params(children, rid) for rid in runs["run_id"]}
    keys = sorted({k for p in params.values() for k in p if not k.startswith(VARIANT_IGNORES)})
    varied = [k for k in keys if len({p.get(k) for p in params.values()}) > 1]
    finals = [c for c in runs if c.startswith("final_")]
    out = runs[["variant", "seed", "run", "outcome", *finals, "kid_std", "kimg", "img_per_s", "diverged_at_kimg",
                "run_id", "reused_from", "reused_study"]].copy()
    out["outcome"] = out["outcome"].astype(str)
    out = out.rename(columns={"kid_std": f"final_{rec.KID}_std"})
    for k in varied:
        out[k] = [params[rid].get(k, "") for rid in runs["run_id"]]
    out.insert(0, "preset", preset)
    out.insert(1, "primary_metric", metric)
    out.insert(2, "final_samples", final_samples)
    return out


def _count(value: str | None) -> str:
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return "–"


def ablated_section(ablation: str, children: pd.DataFrame, runs: pd.DataFrame, order: list[str]) -> list[str]:
    """The ablation's rationale (its docstring) and, per variant, the params that differ from the baseline in MLflow."""
    from ablations import get_ablation
    try:
        plugin = get_ablation(ablation)
        doc, declared = " ".join((plugin.__doc__ or "").split()), plugin.variants
    except UserError:
        doc, declared = f"_The ablation '{ablation}' is not registered in this checkout; its rationale is unavailable._", {}
    firsts = {v: runs[runs["variant"] == v]["run_id"].iloc[0] for v in order}
    base = run_params(children, firsts[order[0]])
    rows = []
    for variant in order:
        mine = run_params(children, firsts[variant])
        changed = {k: v for k, v in mine.items() if base.get(k) != v and not k.startswith(VARIANT_IGNORES)}
        changed |= {k: "(unset)" for k in base if k not in mine and not k.startswith(VARIANT_IGNORES)}
        shown = ", ".join(f"`{k}={v}`" for k, v in sorted(changed.items()))
        code = ", ".join(f"`{k}={v}`" for k, v in declared.get(variant, {}).items())
        rows.append({"variant": variant, "overrides declared by the ablation": code or "–",
                     "settings that differ from the baseline run (MLflow params)":
                     shown or ("(the baseline)" if variant == order[0] else "(none: same config)"),
                     "G / D parameters": " / ".join(_count(mine.get(k)) for k in ("model.g_params", "model.d_params"))})
    return ["## What was ablated and why", "", doc, "", md(pd.DataFrame(rows)), ""]


def setup_section(parent: pd.Series, children: pd.DataFrame, runs: pd.DataFrame, order: list[str],
                  metric: str) -> list[str]:
    """Baseline config, base variant, data, length, seeds, hardware, packages, commit, metric protocol."""
    params = run_params(children, runs[runs["variant"] == order[0]]["run_id"].iloc[0])
    prefix = f"tags.{rec.ENV}"
    env = {c[len(prefix):]: get(parent, c) for c in parent.index if c.startswith(prefix) and get(parent, c)}
    lines = [_study_line(parent), _command_line(env), _data_line(params), _length_line(params, runs["kimg"].dropna()),
             _seeds_line(runs, order[0]), _hardware_line(children, env), _packages_line(env),
             _code_line(env), _metric_line(params, children, metric)]
    return ["## Setup", "", *lines, "", "Baseline configuration (key settings and every setting changed from the "
            "`RunConfig()` defaults):", "", md(_config_table(params)), ""]


def _study_line(parent: pd.Series) -> str:
    started = pd.Timestamp(parent["start_time"]).strftime("%Y-%m-%d %H:%M %Z")
    return (f"- **Study**: preset `{get(parent, f'tags.{rec.PRESET}')}`, "
            f"base variant `{get(parent, f'tags.{rec.BASE}', 'none')}`, "
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


def _seeds_line(runs: pd.DataFrame, baseline: str) -> str:
    """The seeds, and the baseline's own where it ran more (--baseline-seeds)."""
    per = runs.groupby("variant")["seed"].apply(lambda s: sorted(s.astype(int).unique()))
    others = sorted({s for v, seeds in per.items() if v != baseline for s in seeds})
    if baseline in per and len(per[baseline]) > len(others) > 0:
        return (f"- **Seeds**: {', '.join(map(str, others))} ({len(others)} per variant); the baseline "
                f"{', '.join(map(str, per[baseline]))} ({len(per[baseline])}: `--baseline-seeds`, its error enters "
                "every comparison); seeds weights, batches and z.")
    seeds = sorted({int(s) for s in runs["seed"]})
    return f"- **Seeds**: {', '.join(map(str, seeds))} ({len(seeds)} per variant; seeds weights, batches and z)."


def _hardware_line(children: pd.DataFrame, env: dict[str, str]) -> str:
    devices = sorted({get(r, f"tags.{rec.DEVICE_NAME}") or get(r, f"tags.{rec.DEVICE}")
                      for _, r in children.iterrows()} - {""})
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


def _metric_line(params: dict[str, str], children: pd.DataFrame, metric: str) -> str:
    prefix = f"tags.{rec.PROTOCOL}"
    protocol = {c[len(prefix):]: sorted(set(children[c].dropna().astype(str))) for c in children if c.startswith(prefix)}
    train, final = int(params.get("eval.fid_samples", 0) or 0), params.get("eval.fid_final_samples", "?")
    how = params.get("eval.primary_metric", "auto (recorded before the setting existed)")
    every = params.get("eval.fid_every_kimg", "?")
    during = ("no evaluations during training" if every in ("0", "0.0") else
              f"`{rec.train_key(rec.FID, train)}` and `{rec.train_key(rec.KID, train)}` during training on "
              f"{params.get('eval.fid_samples', '?')} samples every {every} kimg, from one Inception pass")
    return (f"- **Metric protocol**: primary metric **{metric.upper()}** (`eval.primary_metric={how}`: KID below "
            f"2,048 final samples, else FID). {during[0].upper()}{during[1:]}; final values (`{rec.final_key(rec.FID)}`, "
            f"`{rec.final_key(rec.KID)}`, `{rec.final_std_key(rec.KID)}`) on {final} samples; "
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
                "per group), sorted by name `VARIANT-sSEED`, led by the final primary metric and its standard error, "
                "then final precision, recall and coverage, the other metric, outcome and the varied settings; best-of-"
                "training values last.")
    else:
        link = f"<{filter_url(eid, pid)}> lists the study's child runs sorted by name `VARIANT-sSEED`."
    return ["## Open these runs in MLflow", "", "```bash", f"mlflow ui --backend-store-uri {store.uri} --host 127.0.0.1",
            "```", "", f"Then {link} Tick runs and press **Compare** to set them side by side. Study (parent) run "
            f"`{pid}` in experiment {eid}; every child run id is in the table above.", ""]
