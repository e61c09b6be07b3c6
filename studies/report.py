"""Write reports/NAME.md from what MLflow holds (never from in-memory state).

    python -m studies.report pooling                 # latest study of the 'pooling' experiment
    python -m studies.report pooling --parent RUN_ID # a specific study invocation
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pandas as pd

from core.errors import UserError
from core.tracking import Store


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
    children = runs[runs.get("tags.mlflow.parentRunId") == parent["run_id"]].copy()
    children["seed"] = children["tags.seed"].astype(int)
    return parent, children.sort_values(["tags.variant", "seed"])


def _col(frame: pd.DataFrame, name: str) -> pd.Series:
    return frame[name] if name in frame else pd.Series([float("nan")] * len(frame), index=frame.index)


def run_table(children: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "variant": children["tags.variant"], "seed": children["seed"],
        "outcome": _col(children, "tags.outcome").fillna("unfinished"),
        "final FID": _col(children, "metrics.fid/final"), "best FID": _col(children, "metrics.fid/best"),
        "kimg": _col(children, "metrics.progress/kimg"), "img/s": _col(children, "metrics.perf/img_per_s"),
        "run id": children["run_id"],
    }).reset_index(drop=True)


def variant_table(runs: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Per variant: runs, finished runs, final FID mean and standard deviation over seeds, best FID."""
    rows = []
    for variant in order:
        r = runs[runs["variant"] == variant]
        ok = r[r["outcome"] == "finished"]
        rows.append({"variant": variant, "runs": len(r), "finished": len(ok),
                     "final FID mean": ok["final FID"].mean(), "final FID std": ok["final FID"].std(ddof=1),
                     "best FID": r["best FID"].min()})
    return pd.DataFrame(rows)


def _fmt(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, floatfmt=".2f")


def write_report(store: Store, experiment: str, reports_dir: Path = Path("reports"),
                 parent_id: str | None = None) -> Path:
    parent, children = study_runs(store, experiment, parent_id)
    order = str(parent.get("tags.variants", "")).split(",") or sorted(children["tags.variant"].unique())
    runs = run_table(children)
    summary = variant_table(runs, [v for v in order if v in set(runs["variant"])])
    img_dir = reports_dir / experiment
    if img_dir.exists():
        shutil.rmtree(img_dir)
    grids = {}
    for variant in summary["variant"]:
        grids[variant] = _last_grid(store, runs[runs["variant"] == variant], img_dir / f"{variant}.png")

    lines = [f"# Ablation study: {experiment}", "",
             f"Study run `{parent['run_id']}` (preset `{parent.get('tags.preset')}`, base `{parent.get('tags.base')}`, "
             f"seeds {parent.get('tags.seeds')}). Numbers are read from the MLflow store `{store.uri}`.", "",
             "## Final FID per variant (mean and standard deviation over finished seeds)", "", _fmt(summary), "",
             "## Every run", "", _fmt(runs), "", "## Samples (same fixed z for every variant, last grid of the first seed)", ""]
    for variant, grid in grids.items():
        lines += [f"### {variant}", "", f"![{variant}]({experiment}/{grid.name})" if grid else "_no sample grid logged_", ""]
    lines += ["## Open these runs in MLflow", "", "```", f"mlflow ui --backend-store-uri {store.uri} --host 127.0.0.1",
              "```", ""]
    reports_dir.mkdir(parents=True, exist_ok=True)
    path = reports_dir / f"{experiment}.md"
    path.write_text("\n".join(lines))
    return path


def _last_grid(store: Store, runs: pd.DataFrame, dst: Path) -> Path | None:
    """Copy the last logged sample grid of the variant's first seed that has one."""
    for run_id in runs["run id"]:
        grids = sorted(p for p in store.list_artifacts(run_id, "samples") if p.endswith(".png"))
        if grids:
            local = store.download(run_id, grids[-1], dst.parent / ".download")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(local, dst)
            shutil.rmtree(dst.parent / ".download", ignore_errors=True)
            return dst
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="experiment (ablation study) name, e.g. pooling")
    parser.add_argument("--parent", default=None, help="parent run id of the study (default: the latest)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--reports", type=Path, default=Path("reports"), help="output folder (default: reports)")
    args = parser.parse_args(argv)
    try:
        path = write_report(Store(args.tracking_uri), args.name, args.reports, args.parent)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
