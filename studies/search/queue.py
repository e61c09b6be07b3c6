"""A work queue in an Optuna storage: jobs as trials with fixed parameters, taken by workers that beat.

    queue = RunQueue.create("sqlite:///optuna.db", 60, "runs:pooling:PARENT", {"study_spec": ...})
    queue.enqueue([{"variant": "baseline", "seed": 0}, ...])    # never the same job twice
    job = queue.take()                                          # a waiting job, its first heartbeat recorded
    with queue.beating(job): ...                                # the worker's heartbeat while it works
    queue.done(job, {"mlflow_run_id": ...})

studies.run's workers (studies/run/workers.py) use it through the names studies.search exports. The storages
and their heartbeats are the search's (storage.py): a job whose worker stops beating for 3 intervals is failed by
the next worker that looks for work, and a copy with the same parameters is queued again (at most MAX_RETRY).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread  # optimize()'s own heartbeat, for ask/tell jobs
from optuna.trial import TrialState

from studies.search.storage import Heartbeat, open_storage, quiet_experimental

MAX_RETRY = 3  # a job whose worker died is queued again at most this often


@dataclass
class Job:
    params: dict  # the enqueued parameters
    trial: optuna.Trial


class RunQueue:
    """One queue: an Optuna study whose trials are jobs."""

    def __init__(self, study: optuna.Study, storage):
        self.study, self.storage = study, storage

    @staticmethod
    def connect(url: str, heartbeat_s: int):
        """The Optuna storage at `url` with this queue's heartbeat, or one line saying why it cannot be opened."""
        return open_storage(url, Heartbeat(interval_s=heartbeat_s, max_retry=MAX_RETRY))

    @classmethod
    def create(cls, url: str, heartbeat_s: int, name: str, attrs: dict[str, str]) -> RunQueue:
        storage = cls.connect(url, heartbeat_s)
        with quiet_experimental():
            study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True)
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        return cls(study, storage)

    @classmethod
    def load(cls, url: str, heartbeat_s: int, name: str) -> RunQueue:
        storage = cls.connect(url, heartbeat_s)
        return cls(optuna.load_study(study_name=name, storage=storage), storage)

    @classmethod
    def find(cls, url: str, heartbeat_s: int, prefix: str) -> RunQueue | None:
        """The oldest queue whose name starts with `prefix` that still has jobs waiting or running."""
        storage = cls.connect(url, heartbeat_s)
        for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
            if summary.study_name.startswith(prefix):
                queue = cls(optuna.load_study(study_name=summary.study_name, storage=storage), storage)
                if any(queue.pending()):
                    return queue
        return None

    @property
    def name(self) -> str:
        return self.study.study_name

    @property
    def attrs(self) -> dict:
        return self.study.user_attrs

    def enqueue(self, jobs: list[dict]) -> None:
        """Each job once: one already waiting, running or done is not added again (a resumed launcher); one whose
        every try failed (its workers died MAX_RETRY + 1 times, or it failed for good) is queued again: a new
        launch is the user's retry, as the launcher's error tells them."""
        live = [p for p, state, _ in self.jobs() if state != TrialState.FAIL.name]
        for params in jobs:
            if params not in live:
                self.study.enqueue_trial(params)
                live.append(params)

    def pending(self) -> tuple[int, int]:
        """(waiting, running) jobs."""
        states = [t.state for t in self.study.get_trials(deepcopy=False)]
        return states.count(TrialState.WAITING), states.count(TrialState.RUNNING)

    def take(self) -> Job | None:
        """The next waiting job, after failing (and re-queueing) the stale ones; None when none waits. Two
        workers racing for the last job: the loser's ask makes an empty trial, failed at once and skipped."""
        while True:
            with quiet_experimental():
                optuna.storages.fail_stale_trials(self.study)
            if not self.pending()[0]:
                return None
            with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize": beating() beats
                warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
                trial = self.study.ask()
            params = job_params(self.study.get_trials(deepcopy=False)[trial.number])
            if params:
                # the first beat now: a worker that dies before its heartbeat thread starts still leaves a trace
                # to go stale (a job that never beat would never count as dead, and would be waited for forever)
                self.storage.record_heartbeat(trial._trial_id)
                return Job(params, trial)
            self.study.tell(trial, state=TrialState.FAIL)

    @contextlib.contextmanager
    def beating(self, job: Job) -> Iterator[None]:
        with get_heartbeat_thread(job.trial._trial_id, self.storage):
            yield

    def note(self, job: Job, key: str, value: str) -> None:
        job.trial.set_user_attr(key, value)

    def done(self, job: Job) -> None:
        self.study.tell(job.trial, 0.0)

    def fail(self, job: Job) -> None:
        """A job that cannot run (a broken config): no worker takes it again in this launch; the next launch of
        the study queues it again (enqueue), once the user has fixed what broke it."""
        self.study.tell(job.trial, state=TrialState.FAIL)

    def jobs(self) -> list[tuple[dict, str, dict]]:
        """Every trial that is a job: (params, state name, user attributes), in order."""
        return [(p, t.state.name, t.user_attrs) for t in self.study.get_trials(deepcopy=False)
                if (p := job_params(t))]

    def unfinished(self) -> list[dict]:
        """Jobs with no completed trial (a stale trial's copy that completed counts as done)."""
        done, seen = [], []
        for params, state, _ in self.jobs():
            seen.append(params)
            if state == "COMPLETE":
                done.append(params)
        return [p for i, p in enumerate(seen) if p not in done and p not in seen[:i]]


def job_params(frozen) -> dict:
    """A trial's job parameters: enqueued (fixed), or copied by the stale-trial retry; {} for an empty trial."""
    return dict(frozen.system_attrs.get("fixed_params") or frozen.params)

