"""A study's runs as jobs of a distributed work queue: an Optuna study whose trials are (variant, seed) pairs.

    python -m studies.run pooling --workers 4                  # four local workers: one per GPU, or cores/4 threads
    python -m studies.run --join pooling --storage postgresql://me@db/optuna --tracking-uri http://mlflow:5000

The engine is Optuna's storage, used as the queue: the launcher enqueues every run still to train as a trial
with fixed parameters (`enqueue_trial`); a worker takes the next waiting one (`ask`), trains it as the
sequential study does (`_run_one`), and completes it (`tell`). While it trains, the trial's heartbeat thread
beats; a worker that dies stops beating, and the next worker that looks for work fails that trial as stale
and re-queues a copy with the same parameters (RetryHeartbeatStaleTrialCallback, MAX_RETRY times). The copy's
worker finds the run's unfinished MLflow child run and its run folder (checkpoint.pt; a folder every worker
sees, on a shared filesystem in a cluster) and continues it from its last checkpoint in the same MLflow run: a
death costs the images since that checkpoint. A run that crashes for its own reasons is recorded `failed` by
`_run_one` and its trial completes: it is never retried.

Why Optuna's storage and not Ray or submitit: it is already the search's queue and dependency, tested here on
SQLite, PostgreSQL and journal files, with heartbeats for dead workers; its default is a SQLite file, so a
study on one machine needs no server; and it spans machines through any database they reach. Ray would add a
cluster runtime to install, start and keep alive beside the database MLflow needs anyway; submitit launches
Slurm jobs but holds no queue of its own (README's Slurm example launches `--join` workers with it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from core.errors import UserError
from core.tracking import RunTracker, Store
from studies.run.study import StudySpec, resolve_configs, run_one_job

QUEUE_PREFIX = "runs:"  # the queue of a study's runs: an Optuna study named runs:EXPERIMENT:PARENT_RUN_ID
SPEC_ATTR, PARENT_ATTR = "study_spec", "parent_run_id"  # the queue's user attributes: what a joining worker runs
WORKER_ATTR, RUN_ATTR = "worker", "mlflow_run_id"  # a job's user attributes, once taken
MAX_RETRY = 3  # a run whose worker died is re-queued at most this often


def queue_name(experiment: str, parent_id: str) -> str:
    return f"{QUEUE_PREFIX}{experiment}:{parent_id}"


def spec_json(spec: StudySpec) -> str:
    d = dataclasses.asdict(spec)
    d["workdir"] = str(spec.workdir)
    d.pop("notes")  # the launcher's tags (ETA): not a worker's business
    return json.dumps(d, sort_keys=True, default=str)


def spec_from_json(text: str) -> StudySpec:
    d = json.loads(text)
    d["workdir"] = Path(d["workdir"])
    for key in ("seeds", "variants"):
        d[key] = tuple(d[key])
    for key in ("base", "stacked"):
        d[key] = tuple(tuple(pair) for pair in d[key])
    return StudySpec(**d)


def default_workers() -> int:
    """One per visible GPU with CUDA, one without."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def _storage(url: str, heartbeat_s: int):
    from studies.search import Heartbeat, open_storage
    return open_storage(url, Heartbeat(interval_s=heartbeat_s, max_retry=MAX_RETRY))


def open_storage_of(url: str | None, heartbeat_s: int):
    """The queue's storage (the default SQLite file when None), or one line saying why it cannot be opened."""
    from studies.run.study import DEFAULT_QUEUE
    return _storage(url or DEFAULT_QUEUE, heartbeat_s)


def open_queue(url: str, heartbeat_s: int, spec: StudySpec, parent_id: str):
    """The queue of this study invocation, created with what a joining worker needs to know."""
    import optuna
    from studies.search import quiet_experimental
    with quiet_experimental():
        study = optuna.create_study(study_name=queue_name(spec.experiment, parent_id), storage=_storage(url, heartbeat_s),
                                    load_if_exists=True)
    study.set_user_attr(SPEC_ATTR, spec_json(spec))
    study.set_user_attr(PARENT_ATTR, parent_id)
    return study


def enqueue(study, jobs: list[tuple[str, int]]) -> None:
    """Each (variant, seed) once: a job already in the queue, in any state, is not added again (resume)."""
    for variant, seed in jobs:
        study.enqueue_trial({"variant": variant, "seed": seed}, skip_if_exists=True)


def _job(frozen) -> tuple[str, int] | None:
    params = frozen.system_attrs.get("fixed_params") or frozen.params
    return (str(params["variant"]), int(params["seed"])) if "variant" in params and "seed" in params else None


def pending(study) -> tuple[int, int]:
    """(waiting, running) jobs of the queue."""
    from optuna.trial import TrialState
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return states.count(TrialState.WAITING), states.count(TrialState.RUNNING)


def next_job(study):
    """The next waiting job as an asked trial, after failing (and re-queueing) the stale ones; None when none waits.
    Two workers racing for the last job: the loser's ask creates an empty trial, failed at once and skipped."""
    import optuna
    from optuna.trial import TrialState
    from studies.search import quiet_experimental
    while True:
        with quiet_experimental():
            optuna.storages.fail_stale_trials(study)
        if not pending(study)[0]:
            return None
        with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize": work() beats itself
            warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
            trial = study.ask()
        if _job(study.get_trials(deepcopy=False)[trial.number]) is not None:
            # the first beat now: a worker that dies before its heartbeat thread starts still leaves a trace to
            # go stale (a RUNNING trial that never beat would never count as dead, and the queue would wait forever)
            study._storage.record_heartbeat(trial._trial_id)
            return trial
        study.tell(trial, state=TrialState.FAIL)  # lost the race: nothing in it


def work(spec: StudySpec, store: Store | str, parent_id: str, url: str, heartbeat_s: int, worker: int,
         images=None, progress: bool = False, threads: int = 0) -> int:
    """One worker: take jobs until none waits and none runs elsewhere (a running one may still die and come
    back); returns the number of jobs it ran. `threads` (CPU): torch's intra-op threads, 0 = as set."""
    import optuna
    from core.build import share_images
    from core.data import load_images
    from optuna.storages._heartbeat import get_heartbeat_thread  # optimize()'s own heartbeat, for ask/tell jobs
    from studies.cli import data_roots
    from studies.run.study import seeded
    if threads:
        torch.set_num_threads(threads)
    store = Store(store) if isinstance(store, str) else store
    configs = resolve_configs(spec)
    first = next(iter(configs.values()))
    images = images or load_images(first.data, first.model.resolution, roots=data_roots())
    shared = share_images(first, images)
    storage = _storage(url, heartbeat_s)
    study = optuna.load_study(study_name=queue_name(spec.experiment, parent_id), storage=storage)
    parent = RunTracker(store.client, parent_id)
    ran = 0
    while True:
        trial = next_job(study)
        if trial is None:
            if not pending(study)[1]:
                return ran
            time.sleep(max(1.0, heartbeat_s / 2))  # another worker's job may still die and be re-queued
            continue
        variant, seed = _job(study.get_trials(deepcopy=False)[trial.number])
        trial.set_user_attr(WORKER_ATTR, f"{os.uname().nodename}:{os.getpid()}:{worker}")
        try:
            with get_heartbeat_thread(trial._trial_id, storage):
                run_id = run_one_job(spec, store, parent, variant, seed, seeded(configs[variant], seed), shared,
                                     progress)
        except UserError:  # a broken config fails its job for good; Ctrl-C or a kill leaves the job RUNNING, so
            study.tell(trial, state=optuna.trial.TrialState.FAIL)  # that its heartbeat stops and another takes it over
            raise
        trial.set_user_attr(RUN_ATTR, run_id)
        study.tell(trial, 0.0)
        ran += 1


def _worker_main(*args, **kwargs) -> None:
    from studies.cli import guard
    sys.exit(guard(lambda: work(*args, **kwargs)))


def run_workers(spec: StudySpec, store: Store, parent_id: str, url: str, heartbeat_s: int, workers: int,
                jobs: list[tuple[str, int]], progress: bool = False) -> None:
    """Enqueue `jobs`, start `workers` local worker processes (each on its own GPU, or on cores/workers threads)
    and wait for them; a job left unfinished afterwards is an error naming it."""
    study = open_queue(url, heartbeat_s, spec, parent_id)
    enqueue(study, jobs)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    threads = 0 if gpus else max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")  # fresh interpreters: no forked torch threads or open database connections
    procs = []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        for i in range(workers):
            if gpus:  # the child's torch sees one GPU, as cuda:0: the run's config (and key) is the same everywhere
                os.environ["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
            proc = ctx.Process(target=_worker_main, args=(spec, store.uri, parent_id, url, heartbeat_s, i),
                               kwargs={"progress": progress, "threads": threads}, name=f"study-worker-{i}")
            proc.start()
            procs.append(proc)
    finally:
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    try:
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    left = unfinished(study)
    if left:
        raise UserError(f"{len(left)} runs did not finish ({', '.join(f'{v}-s{s}' for v, s in left[:6])}); "
                        "rerun the same command to resume them")


def unfinished(study) -> list[tuple[str, int]]:
    """Jobs with no completed trial (a failed trial's retry that completed counts as done)."""
    from optuna.trial import TrialState
    done, seen = set(), []
    for t in study.get_trials(deepcopy=False):
        job = _job(t)
        if job is None:
            continue
        seen.append(job)
        if t.state == TrialState.COMPLETE:
            done.add(job)
    return [j for j in dict.fromkeys(seen) if j not in done]


def find_queue(url: str, experiment: str):
    """The oldest queue of `experiment` (any experiment for 'all') in the storage that still has jobs to run."""
    import optuna
    storage = _storage(url, 60)
    prefix = QUEUE_PREFIX if experiment == "all" else f"{QUEUE_PREFIX}{experiment}:"
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
             if s.study_name.startswith(prefix)]
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        if any(pending(study)):
            return study
    raise UserError(f"no study '{experiment}' with runs left to train in {url}"
                    + (f" ({len(names)} finished)" if names else "") + "; start one with python -m studies.run")


JOIN_WAIT_S = 120  # `--join all`: how long a worker waits for the launcher's next study before it stops


def join(experiment: str, url: str, tracking_uri: str | None, heartbeat_s: int, data: str | None,
         progress: bool = False) -> int:
    """`--join`: one more worker on a running study (or, for 'all', on each study the launcher enqueues in turn),
    from any machine that reaches both stores; returns the runs it trained."""
    ran, idle_since = 0, time.monotonic()
    store = Store(tracking_uri)
    while True:
        try:
            study = find_queue(url, experiment)
        except UserError:
            if experiment != "all" and ran:
                return ran
            if experiment != "all" or time.monotonic() - idle_since > JOIN_WAIT_S:
                if ran:
                    return ran
                raise
            time.sleep(max(1.0, heartbeat_s / 2))
            continue
        spec = spec_from_json(study.user_attrs[SPEC_ATTR])
        if data:  # this machine's copy of the data (data.root is a machine key: not part of a run's identity)
            spec = dataclasses.replace(spec, overrides={**spec.overrides, "data.root": data})
        ran += work(spec, store, study.user_attrs[PARENT_ATTR], url, heartbeat_s, 0, progress=progress)
        idle_since = time.monotonic()
        if experiment != "all":
            return ran


def eta_workers(total_s: float, runs: int, workers: int, cuda: bool) -> float:
    """The ETA of `runs` runs over `workers`: on GPUs each worker has its own device, so the runs split (a run
    is not divisible: ceil); on a CPU the workers share its cores, so the total stays as measured."""
    if not cuda or workers <= 1 or runs == 0:
        return total_s
    return total_s * math.ceil(runs / workers) / runs

