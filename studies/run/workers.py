"""A study's runs as jobs of a distributed work queue (studies/search/queue.py: an Optuna study whose trials are
(variant, seed) pairs), and the workers that train them.

    python -m studies.run pooling --workers 4                  # four local workers: one per GPU, or cores/4 threads
    python -m studies.run --join pooling --queue postgresql://me@db/optuna --tracking-uri http://mlflow:5000

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
import os
import sys
import time
from pathlib import Path

import torch

from core.errors import UserError
from core.tracking import RunTracker, Store
from studies.cli import join_all, start_workers
from studies.run.study import DEFAULT_QUEUE, StudySpec, resolve_configs, run_one_job, seeded

QUEUE_PREFIX = "runs:"  # the queue of a study's runs: an Optuna study named runs:EXPERIMENT:PARENT_RUN_ID
SPEC_ATTR, PARENT_ATTR = "study_spec", "parent_run_id"  # the queue's user attributes: what a joining worker runs
WORKER_ATTR, RUN_ATTR = "worker", "mlflow_run_id"  # a job's user attributes, once taken
IDLE_LOOK_S = 5.0  # a worker with nothing to take looks again this often (a study ends this soon after its last run)
JOIN_WAIT_S = 120  # `--join all`: how long a worker waits for the launcher's next study before it stops


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


def check_heartbeat(heartbeat_s: int) -> None:
    """Below 1 s, every running job counts as dead at once (a journal storage takes any interval)."""
    if heartbeat_s < 1:
        raise UserError(f"--heartbeat {heartbeat_s} must be >= 1 (seconds between a running job's heartbeats)")


def check_queue(url: str | None, heartbeat_s: int) -> None:
    """Open the queue's storage (the default SQLite file when None), or say in one line why it cannot be."""
    from studies.search import RunQueue
    check_heartbeat(heartbeat_s)
    RunQueue.connect(url or DEFAULT_QUEUE, heartbeat_s)


def open_queue(url: str, heartbeat_s: int, spec: StudySpec, parent_id: str):
    """The queue of this study invocation, created with what a joining worker needs to know."""
    from studies.search import RunQueue
    return RunQueue.create(url, heartbeat_s, queue_name(spec.experiment, parent_id),
                           {SPEC_ATTR: spec_json(spec), PARENT_ATTR: parent_id})


def enqueue(queue, jobs: list[tuple[str, int]]) -> None:
    queue.enqueue([{"variant": v, "seed": s} for v, s in jobs])


def work(spec: StudySpec, store: Store | str, parent_id: str, url: str, heartbeat_s: int, worker: int,
         images=None, progress: bool = False) -> int:
    """One worker: take jobs until none waits and none runs elsewhere (a running one may still die and come
    back); returns the number of jobs it ran."""
    from core.build import share_images
    from core.data import load_images
    from studies.cli import data_roots
    from studies.search import RunQueue
    store = Store(store) if isinstance(store, str) else store
    configs = resolve_configs(spec)
    first = next(iter(configs.values()))
    images = images or load_images(first.data, first.model.resolution, roots=data_roots())
    shared = share_images(first, images)
    queue = RunQueue.load(url, heartbeat_s, queue_name(spec.experiment, parent_id))
    parent = RunTracker(store.client, parent_id)
    ran = 0
    while True:
        job = queue.take()
        if job is None:
            if not queue.pending()[1]:
                return ran
            time.sleep(min(max(1.0, heartbeat_s / 2), IDLE_LOOK_S))  # another worker's job may still die and be
                                                                      # queued again
            continue
        variant, seed = str(job.params["variant"]), int(job.params["seed"])
        queue.note(job, WORKER_ATTR, f"{os.uname().nodename}:{os.getpid()}:{worker}")
        try:
            with queue.beating(job):
                run_id = run_one_job(spec, store, parent, variant, seed, seeded(configs[variant], seed), shared,
                                     progress)
        except UserError:  # a broken config fails its job for good; Ctrl-C or a kill leaves the job RUNNING, so
            queue.fail(job)  # that its heartbeat stops and another worker takes it over
            raise
        queue.note(job, RUN_ATTR, run_id)
        queue.done(job)
        ran += 1


def _worker_main(*args, **kwargs) -> None:
    from studies.cli import guard
    sys.exit(guard(lambda: work(*args, **kwargs)))


def run_workers(spec: StudySpec, store: Store, parent_id: str, jobs: list[tuple[str, int]], *, url: str,
                heartbeat_s: int, workers: int, progress: bool = False) -> None:
    """Enqueue `jobs`, start `workers` local worker processes (each on its own GPU, or on cores/workers threads)
    and wait for them; a job left unfinished afterwards is an error naming it."""
    queue = open_queue(url, heartbeat_s, spec, parent_id)
    enqueue(queue, jobs)
    join_all(start_workers(workers, _worker_main, lambda i: (spec, store.uri, parent_id, url, heartbeat_s, i),
                           "study-worker", {"progress": progress}))
    left = queue.unfinished()
    if left:
        names = ", ".join(f"{j['variant']}-s{j['seed']}" for j in left[:6])
        raise UserError(f"{len(left)} runs did not finish ({names}); rerun the same command to resume them")


def join(experiment: str, url: str, tracking_uri: str | None, heartbeat_s: int, data: str | None,
         progress: bool = False) -> int:
    """`--join`: one more worker on a running study (or, for 'all', on each study the launcher queues in turn),
    from any machine that reaches both stores; returns the runs it trained."""
    from studies.search import RunQueue
    check_heartbeat(heartbeat_s)
    prefix = QUEUE_PREFIX if experiment == "all" else f"{QUEUE_PREFIX}{experiment}:"
    ran, idle_since = 0, time.monotonic()
    store = Store(tracking_uri)
    while True:
        queue = RunQueue.find(url, heartbeat_s, prefix)
        if queue is None:
            if ran and (experiment != "all" or time.monotonic() - idle_since > JOIN_WAIT_S):
                return ran
            if experiment != "all" or time.monotonic() - idle_since > JOIN_WAIT_S:
                raise UserError(f"no study '{experiment}' with runs left to train in {url}; start one with "
                                "python -m studies.run")
            time.sleep(max(1.0, heartbeat_s / 2))
            continue
        spec = spec_from_json(queue.attrs[SPEC_ATTR])
        if data:  # this machine's copy of the data (data.root is a machine key: not part of a run's identity)
            spec = dataclasses.replace(spec, overrides={**spec.overrides, "data.root": data})
        ran += work(spec, store, queue.attrs[PARENT_ATTR], url, heartbeat_s, 0, progress=progress)
        idle_since = time.monotonic()
        if experiment != "all":
            return ran


def eta_workers(total_s: float, runs: int, workers: int, cuda: bool) -> float:
    """The ETA of `runs` runs over `workers`: on GPUs each worker has its own device, so the runs split (a run
    is not divisible: ceil); on a CPU the workers share its cores, so the total stays as measured."""
    if not cuda or workers <= 1 or runs == 0:
        return total_s
    return total_s * math.ceil(runs / workers) / runs
