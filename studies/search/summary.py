"""What a search leaves on its MLflow parent run: best parameters, a study summary and Optuna's own plots.

    python -m studies.search --preset quick --trials 20   # then the parent run's summary.json and optuna_plots/
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import optuna
from optuna.trial import TrialState

from core import records as rec
from core.tracking import dump_json
from studies.search.storage import quiet_experimental

# Optuna's plot, and how many complete trials it needs to say anything.
PLOTS = (("optimization_history", "plot_optimization_history", 1),
         ("param_importances", "plot_param_importances", 2),
         ("intermediate_values", "plot_intermediate_values", 1))


def render_plots(study: optuna.Study, out_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """PNGs via optuna.visualization.matplotlib; a plot that cannot be drawn yet is skipped with the reason."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    trials = study.get_trials(deepcopy=False)
    n_complete = sum(t.state == TrialState.COMPLETE for t in trials)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = [], {}
    for name, fn, need in PLOTS:
        if n_complete < need:
            skipped[name] = f"needs {need} complete trials, the study has {n_complete}"
            continue
        if name == "intermediate_values" and not any(t.intermediate_values for t in trials):
            skipped[name] = "no trial reported an intermediate value (--evals 0)"
            continue
        try:
            with quiet_experimental():
                ax = getattr(vis, fn)(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
        except Exception as exc:  # a plot is a convenience: never let it fail the search
            skipped[name] = f"{type(exc).__name__}: {exc}"[:300]
    return written, skipped


def state_label(state: TrialState) -> rec.TrialState:
    """complete | pruned | failed | running | waiting: the `state` tag of a trial's MLflow run."""
    return rec.TrialState.FAILED if state == TrialState.FAIL else rec.TrialState(state.name.lower())


def trial_row(t: optuna.trial.FrozenTrial) -> dict:
    return {"number": t.number, "state": state_label(t.state), "value": t.value, "params": t.params,
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id"), "intermediate": t.intermediate_values}


def summarize(study: optuna.Study, parent, parent_id: str, storage: str, out_dir: Path, family: str) -> dict:
    """Record the study's state on the parent run: best params (params), counts (tags), summary.json, plots.

    `family`: the metric the trials minimise (fid | kid), under whose name the best value is recorded."""
    trials = study.get_trials(deepcopy=False)
    counts = Counter(state_label(t.state) for t in trials)
    ours = [trial_row(t) for t in trials if t.user_attrs.get("search_parent") == parent_id]
    best = study.best_trial if counts[rec.TrialState.COMPLETE] else None
    plots, skipped = render_plots(study, out_dir)
    summary = {"study": study.study_name, "storage": storage, "direction": f"minimize final {rec.LABEL[family]}",
               "objective": rec.final_key(family), "trials": len(trials),
               "states": dict(counts), "best": trial_row(best) if best else None,
               "this_invocation": ours, "plots": [p.name for p in plots], "plots_skipped": skipped}
    parent.log_text(dump_json(summary), "summary.json")
    parent.set_tags({"trials": len(trials), "trials_added": len(ours),
                     **{f"trials_{s}": counts[s] for s in (rec.TrialState.COMPLETE, rec.TrialState.PRUNED,
                                                           rec.TrialState.FAILED)}})
    if best is not None:
        parent.log_params({"best.trial": best.number, **{f"best.{k}": v for k, v in best.params.items()}})
        parent.set_tags({"best_trial": best.number, rec.best_tag(family): best.value})
        parent.log_metrics({rec.search_best_key(family): best.value}, step=len(trials))
    for path in plots:
        parent.log_artifact(path, "optuna_plots")
    return summary
