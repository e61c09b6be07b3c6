"""Optuna search over the learning rates of G and D: each trial is a shortened training run scored by its final
FID, pruned early on its intermediate FIDs, and recorded as an MLflow child run of one parent run per invocation.

    python -m studies.search --preset quick --trials 20                   # ./optuna.db, study 'lr-quick'
    python -m studies.search --preset quick --ablation pooling --variant maxpool --search-beta1
    python -m studies.search --study lr-team --storage postgresql://me@db.lan/optuna --trials 40 --workers 4
    python -m studies.search --study lr-team --storage journal:/nfs/lr.journal --trials 10  # on each machine
    python -m studies.run pooling --preset quick --lr-from lr-quick        # a study with the best pair found
    python -m studies.run pooling --preset quick --search-lr               # search (20 trials), then the study

Each invocation adds exactly --trials trials to the study, shared out over its --workers; the same --study
name resumes it (with the same settings, or it is refused). On top of the usual order (preset, --base,
--ablation's variant, --set) the search sets each trial's train.kimg (--trial-kimg, default a quarter of the
resolved one), eval.fid_every_kimg (--evals reports per trial) and the searched optim.* keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import sys
import time
from pathlib import Path

import optuna

from ablations import get_ablation
from core.config import PRESETS, parse_set
from core.data import ImageSet, load_images
from core.errors import UserError
from core.tracking import RunTracker, Store
from studies.search.summary import summarize
from studies.search.storage import DEFAULT_STORAGE, Heartbeat, describe, load_study, open_storage
from studies.search.trial import (BETA1_RANGE, LR_KEYS, Objective, SearchSpec, TrialFailed, definition, make_pruner,
                                  make_sampler, validate_spec)
from studies.run.study import parse_base


def work(spec: SearchSpec, store: Store | str, parent_id: str, n_trials: int, worker: int, n_before: int,
         images: ImageSet | None = None, storage=None) -> None:
    """One worker: `n_trials` trials of the study, each an MLflow child of `parent_id`. A spawned worker gets
    the store's URI and opens everything itself; in-process, the already opened objects are reused."""
    store = Store(store) if isinstance(store, str) else store
    if images is None:
        cfg = validate_spec(spec)
        images = load_images(cfg.data, cfg.model.resolution)
    study = optuna.load_study(study_name=spec.name, storage=storage or open_storage(spec.storage, spec.heartbeat),
                              sampler=make_sampler(spec, n_before, worker), pruner=make_pruner())
    objective = Objective(spec, store, RunTracker(store.client, parent_id), images, worker)
    study.optimize(objective, n_trials=n_trials, catch=(TrialFailed,), gc_after_trial=False)


def _worker_main(*args) -> None:
    try:
        work(*args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def _run_workers(spec: SearchSpec, store: Store, parent_id: str, n_before: int, images: ImageSet, storage) -> None:
    """Share --trials out over the workers: each runs its own count, so the total is exact without a race."""
    n = min(spec.workers, spec.trials)
    quotas = [spec.trials // n + (i < spec.trials % n) for i in range(n)]
    if n == 1:
        return work(spec, store, parent_id, quotas[0], 0, n_before, images, storage)
    ctx = mp.get_context("spawn")  # fresh interpreters: no forked torch threads or open database connections
    procs = [ctx.Process(target=_worker_main, args=(spec, store.uri, parent_id, q, i, n_before),
                         name=f"search-worker-{i}") for i, q in enumerate(quotas)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    failed = [f"worker {i} (exit code {p.exitcode})" for i, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"{', '.join(failed)} failed; see its messages above")


def open_search(spec: SearchSpec, progress: bool = False):
    """Validate, open the storage, load the images, create or resume the study: nothing runs yet."""
    cfg = validate_spec(spec)
    storage = open_storage(spec.storage, spec.heartbeat)
    images = load_images(cfg.data, cfg.model.resolution, progress=progress)
    study = optuna.create_study(study_name=spec.name, storage=storage, direction="minimize", load_if_exists=True)
    ours, stored = definition(spec, cfg), study.user_attrs.get("search")
    if stored is None:
        study.set_user_attr("search", ours)
    elif stored != ours:
        differ = sorted(k for k in ours.keys() | stored.keys() if ours.get(k) != stored.get(k))
        shown = ", ".join(f"{k}={stored.get(k)!r} (now {ours.get(k)!r})" for k in differ[:4])
        raise UserError(f"study '{spec.name}' was started with {shown}; rerun with those settings or pick a new --study")
    return cfg, storage, study, images


def run_search(spec: SearchSpec, store: Store, progress: bool = False) -> str:
    """Add spec.trials trials to the study (resuming it if it exists); returns the MLflow parent run id."""
    cfg, storage, study, images = open_search(spec, progress)
    n_before = len(study.trials)
    parent = store.start_run(spec.experiment, f"{spec.name} {time.strftime('%Y-%m-%d %H:%M')}", {
        "search": "parent", "study": spec.name, "storage": describe(spec.storage), "preset": spec.preset,
        "ablation": spec.ablation or "none", "variant": spec.variant,
        "base": ",".join(f"{a}={v}" for a, v in spec.base) or "none", "trials_before": n_before})
    parent.log_params({"search.study": spec.name, "search.storage": describe(spec.storage),
                       "search.trials": spec.trials, "search.workers": spec.workers, "search.preset": spec.preset,
                       "search.ablation": spec.ablation or "none", "search.variant": spec.variant,
                       "search.base": dict(spec.base), "search.overrides": spec.overrides,
                       "search.lr_min": spec.lr_range[0], "search.lr_max": spec.lr_range[1],
                       "search.beta1": list(BETA1_RANGE) if spec.search_beta1 else "not searched",
                       "search.trial_kimg": cfg.train.kimg, "search.evals": spec.evals, "search.seed": spec.seed,
                       "search.pruner": "PatientPruner(MedianPruner(n_startup_trials=5), patience=1)",
                       "search.sampler": "TPESampler(multivariate, constant_liar)"})
    status = "FINISHED"
    try:
        _run_workers(spec, store, parent.run_id, n_before, images, storage)
        study = optuna.load_study(study_name=spec.name, storage=storage)
        summarize(study, parent, parent.run_id, describe(spec.storage), spec.workdir / spec.experiment / parent.run_id)
    except BaseException:
        status = "KILLED"
        raise
    finally:
        parent.finish(status)
    return parent.run_id


# ---- handing the best pair to an ablation study (studies.run --lr-from / --search-lr) ----------------------
def best_overrides(study_name: str, storage: str) -> tuple[dict[str, object], dict[str, object]]:
    """The best trial's parameters as dotted overrides, and where they came from (MLflow params and tags)."""
    study = load_study(study_name, storage)
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        raise UserError(f"Optuna study '{study_name}' has no complete trial yet; run `python -m studies.search "
                        f"--study {study_name}` for more trials")
    best = study.best_trial
    overrides = {f"optim.{k}": v for k, v in best.params.items()}
    searched = study.user_attrs.get("search", {})
    provenance = {"lr_from.study": study_name, "lr_from.storage": describe(storage), "lr_from.trial": best.number,
                  "lr_from.fid": best.value, "lr_from.mlflow_run_id": best.user_attrs.get("mlflow_run_id", ""),
                  "lr_from.preset": searched.get("search.preset", "?"), "lr_from.trial_kimg": searched.get("train.kimg", "?"),
                  **{f"lr_from.{k}": v for k, v in best.params.items()}}
    return overrides, provenance


def add_lr_flags(p: argparse.ArgumentParser) -> None:
    """The flags with which studies.run takes its learning rates from a search."""
    g = p.add_argument_group("learning rates from an Optuna search (python -m studies.search)")
    g.add_argument("--lr-from", metavar="STUDY", default=None,
                   help="use the best lr_g, lr_d (and beta1) of this Optuna study (default: the config's own)")
    g.add_argument("--search-lr", action="store_true", help="first add --search-trials trials to the study "
                   "--lr-from (default name lr-PRESET[@BASE]), then run the study with its best pair (default: off)")
    g.add_argument("--search-trials", type=int, default=20, help="trials --search-lr adds (default: 20)")
    g.add_argument("--storage", default=DEFAULT_STORAGE,
                   help=f"Optuna storage: SQLAlchemy URL, journal:PATH or PATH.journal (default: {DEFAULT_STORAGE})")


def lr_for_study(spec, args: argparse.Namespace):
    """studies.run's StudySpec with the best LRs of an Optuna study (searched first with --search-lr) and their
    provenance; unchanged without --lr-from or --search-lr."""
    if not (args.lr_from or args.search_lr):
        return spec
    if args.search_trials < 1:
        raise UserError(f"--search-trials {args.search_trials} must be >= 1")
    varied = get_ablation(spec.ablation).varied_keys()
    clash = sorted(varied & {*LR_KEYS, "optim.beta1"})
    if clash:
        raise UserError(f"LR search makes no sense for study '{spec.ablation}': its variants set {', '.join(clash)}")
    clash = sorted(set(LR_KEYS) & spec.overrides.keys())
    if clash:
        raise UserError(f"--set {', '.join(clash)} conflicts with --lr-from/--search-lr, which set it")
    search = SearchSpec(study=args.lr_from or "", storage=args.storage, trials=args.search_trials,
                        preset=spec.preset, base=spec.base, overrides=spec.overrides, workdir=spec.workdir)
    if args.search_lr:
        validate_spec(search)
        if args.dry_run:  # the configs shown keep their own LRs: the search decides them
            return spec
        run_search(search, Store(args.tracking_uri), progress=not args.no_progress)
    overrides, provenance = best_overrides(search.name, search.storage)
    provenance["lr_from.searched_now"] = bool(args.search_lr)
    return dataclasses.replace(spec, overrides={**spec.overrides, **overrides},
                               provenance={**spec.provenance, **provenance})


# ---- command line ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="", help="Optuna study name; an existing one is resumed "
                   "(default: lr-PRESET[-ABLATION=VARIANT][@BASE=VARIANT])")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="SQLAlchemy URL (sqlite:///FILE.db, "
                   f"postgresql://USER@HOST/DB), journal:PATH or PATH.journal (default: {DEFAULT_STORAGE})")
    p.add_argument("--trials", type=int, default=20, help="trials this invocation adds, over all workers (default: 20)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes on the study (default: 1)")
    p.add_argument("--ablation", default="", help="search on top of this ablation's --variant (default: none)")
    p.add_argument("--variant", default="baseline", help="variant of --ablation (default: baseline)")
    p.add_argument("--base", action="append", default=[], metavar="ABLATION=VARIANT",
                   help="another ablation's variant under everything (repeatable; default: none)")
    p.add_argument("--preset", default="default", help=f"config preset: {' | '.join(PRESETS)} (default: default)")
    p.add_argument("--data", default=None, help="CelebA folder, zip or 'torchvision' (default: as studies.run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key except the searched ones (repeatable; default: none)")
    p.add_argument("--lr-min", type=float, default=1e-5, help="lower end of the lr_g/lr_d range (default: 1e-5)")
    p.add_argument("--lr-max", type=float, default=1e-3, help="upper end of the lr_g/lr_d range (default: 1e-3)")
    p.add_argument("--search-beta1", action="store_true",
                   help=f"also search Adam beta1 in [{BETA1_RANGE[0]}, {BETA1_RANGE[1]}] (default: off)")
    p.add_argument("--trial-kimg", type=float, default=0.0,
                   help="training length of a trial in kimg (default: 0 = a quarter of the resolved train.kimg)")
    p.add_argument("--evals", type=int, default=5, help="intermediate FIDs per trial, for pruning (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed (default: 0)")
    p.add_argument("--heartbeat", type=int, default=60, help="seconds between a running trial's heartbeats; "
                   "silent for 3x that, it is failed and retried once (default: 60)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--workdir", type=Path, default=Path("runs"), help="trial checkpoints and samples (default: runs)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config of a trial and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while decoding data (default: shown)")
    return p


def spec_from_args(args: argparse.Namespace) -> SearchSpec:
    overrides: dict[str, object] = dict(parse_set(args.set))
    if args.data is not None:
        overrides["data.root"] = args.data
    return SearchSpec(study=args.study, storage=args.storage, trials=args.trials, workers=args.workers,
                      ablation=args.ablation, variant=args.variant, base=parse_base(args.base), preset=args.preset,
                      overrides=overrides, lr_range=(args.lr_min, args.lr_max), search_beta1=args.search_beta1,
                      trial_kimg=args.trial_kimg, evals=args.evals, seed=args.seed,
                      heartbeat=Heartbeat(interval_s=args.heartbeat), workdir=args.workdir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = spec_from_args(args)
        if args.dry_run:
            from core.config import to_json
            print(to_json(validate_spec(spec)))
            return 0
        validate_spec(spec)  # bad input found before the MLflow store is created
        open_storage(spec.storage, spec.heartbeat)
        parent_id = run_search(spec, Store(args.tracking_uri), progress=not args.no_progress)
        print(f"search {spec.name}: parent run {parent_id} in MLflow experiment {spec.experiment}")
        try:
            overrides, provenance = best_overrides(spec.name, spec.storage)
        except UserError as exc:  # every trial pruned or failed: the search ran, there is just no winner yet
            print(exc)
            return 0
        print(f"best trial {provenance['lr_from.trial']} (FID {provenance['lr_from.fid']:.2f}): "
              + " ".join(f"{k}={v:.3g}" for k, v in overrides.items())
              + f"; use it with: python -m studies.run NAME --lr-from {spec.name} --storage {spec.storage}")
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished trials are in the study; rerun the same command to add more", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
