"""The search itself: create or resume the Optuna study, share its trials out over worker processes, and record
the invocation as one MLflow parent run whose children are the trials.

    python -m studies.search --preset quick --trials 20 --workers 2   # two local processes, one study
    python -m studies.run pooling --preset quick --search-lr           # the same search, run by the study first

A spawned worker opens the stores and loads the images itself (`work`); with one worker the trials run in this
process on the objects already opened.
"""

from __future__ import annotations

import sys
import time

import optuna

from core import reference
from core.build import share_images
from core.data import ImageSet, load_images
from core.errors import UserError
from core.tracking import RunTracker, Store
from studies.cli import data_roots, guard, join_all, start_workers
from studies.search.storage import describe, open_storage
from studies.search.summary import summarize
from studies.search.trial import (BETA1_RANGE, Objective, objective_metric, SearchSpec, TrialFailed, definition, make_pruner,
                                  make_sampler, validate_spec)


def work(spec: SearchSpec, store: Store | str, parent_id: str, n_trials: int, worker: int, n_before: int,
         images: ImageSet | None = None, storage=None) -> None:
    """One worker: `n_trials` trials of the study, each an MLflow child of `parent_id`. A spawned worker gets
    the store's URI and opens everything itself; in-process, the already opened objects are reused."""
    store = Store(store) if isinstance(store, str) else store
    cfg = validate_spec(spec)
    if images is None:
        images = load_images(cfg.data, cfg.model.resolution, roots=data_roots())
    shared = share_images(cfg, images)  # on the device once per worker; every trial reads the same copy
    study = optuna.load_study(study_name=spec.name, storage=storage or open_storage(spec.storage, spec.heartbeat),
                              sampler=make_sampler(spec, n_before, worker), pruner=make_pruner())
    objective = Objective(spec, store, RunTracker(store.client, parent_id), shared, worker)
    study.optimize(objective, n_trials=n_trials, catch=(TrialFailed,), gc_after_trial=False)


def _worker_main(*args) -> None:
    sys.exit(guard(lambda: work(*args)))


def _run_workers(spec: SearchSpec, store: Store, parent_id: str, n_before: int, images: ImageSet, storage) -> None:
    """Share --trials out over the workers: each runs its own count, so the total is exact without a race."""
    n = min(spec.workers, spec.trials)
    quotas = [spec.trials // n + (i < spec.trials % n) for i in range(n)]
    if n == 1:
        return work(spec, store, parent_id, quotas[0], 0, n_before, images, storage)
    procs = start_workers(n, _worker_main, lambda i: (spec, store.uri, parent_id, quotas[i], i, n_before),
                          "search-worker")
    join_all(procs)
    failed = [f"worker {i} (exit code {p.exitcode})" for i, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"{', '.join(failed)} failed; see its messages above")


def open_search(spec: SearchSpec, progress: bool = False):
    """Validate, open the storage, load the images, create or resume the study: nothing runs yet."""
    cfg = validate_spec(spec)
    storage = open_storage(spec.storage, spec.heartbeat)
    images = load_images(cfg.data, cfg.model.resolution, progress=progress, roots=data_roots())
    study = optuna.create_study(study_name=spec.name, storage=storage, direction="minimize", load_if_exists=True)
    ours, stored = definition(spec, cfg), study.user_attrs.get("search")
    if stored is None:
        study.set_user_attr("search", ours)
    elif stored != ours:
        differ = sorted(k for k in ours.keys() | stored.keys() if ours.get(k) != stored.get(k))
        shown = ", ".join(f"{k}={stored.get(k)!r} (now {ours.get(k)!r})" for k in differ[:4])
        raise UserError(f"study '{spec.name}' was started with {shown}; rerun with those settings or pick a new --study")
    return cfg, storage, study, images


def run_search(spec: SearchSpec, store: Store, progress: bool = False, notes: dict[str, object] | None = None) -> str:
    """Add spec.trials trials to the study (resuming it if it exists); returns the MLflow parent run id.

    notes: tags for the parent run only (the preset's choice, the measured ETA)."""
    cfg, storage, study, images = open_search(spec, progress)
    reference.ensure_reference(cfg, images, progress)  # once, here: not by every worker at the same time
    n_before = len(study.trials)
    parent = store.start_run(spec.experiment, f"{spec.name} {time.strftime('%Y-%m-%d %H:%M')}", {
        "search": "parent", "study": spec.name, "storage": describe(spec.storage), "preset": spec.preset,
        "ablation": spec.ablation or "none", "variant": spec.variant,
        "base": ",".join(f"{a}={v}" for a, v in spec.base) or "none", "trials_before": n_before, **(notes or {})})
    parent.log_params({"search.study": spec.name, "search.storage": describe(spec.storage),
                       "search.trials": spec.trials, "search.workers": spec.workers, "search.preset": spec.preset,
                       "search.ablation": spec.ablation or "none", "search.variant": spec.variant,
                       "search.base": dict(spec.base), "search.overrides": spec.overrides,
                       "search.lr_min": spec.lr_range[0], "search.lr_max": spec.lr_range[1],
                       "search.beta1": list(BETA1_RANGE) if spec.search_beta1 else "not searched",
                       "search.trial_kimg": cfg.train.kimg, "search.evals": spec.evals, "search.seed": spec.seed,
                       "search.pruner": "PatientPruner(MedianPruner(n_startup_trials=5), patience=1)",
                       "search.sampler": "TPESampler(multivariate, constant_liar)"})
    with parent.finishing():
        reference.log_reference(parent, cfg, images)  # what every trial is scored against, kept with the search
        _run_workers(spec, store, parent.run_id, n_before, images, storage)
        study = optuna.load_study(study_name=spec.name, storage=storage)
        summarize(study, parent, parent.run_id, describe(spec.storage), spec.workdir / spec.experiment / parent.run_id,
                  objective_metric(cfg))
    return parent.run_id
