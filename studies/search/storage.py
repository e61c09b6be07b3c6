"""Where an Optuna study lives: an SQLAlchemy URL (SQLite file, PostgreSQL) or a journal file, with heartbeats.

    python -m studies.search --storage sqlite:///optuna.db                 # the default, one machine
    python -m studies.search --storage postgresql://me@db-host/optuna     # several machines
    python -m studies.search --storage journal:/nfs/lr.journal            # a journal file on a shared disk

Every storage that several workers share gets a heartbeat: a running trial whose worker stops beating (killed,
machine lost) is failed by the next worker that asks for a trial and re-queued once with the same parameters,
instead of staying RUNNING forever.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat  # the interface RDBStorage implements; no public alias
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from core.errors import UserError

HEARTBEAT_ATTR = "search:heartbeat"


@contextlib.contextmanager
def quiet_experimental():
    """Heartbeats, PatientPruner and multivariate TPE are marked experimental in Optuna; we chose them on purpose."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


@dataclass(frozen=True)
class Heartbeat:
    interval_s: int = 60  # a running trial records that it is alive this often
    grace_s: int = 0  # silence after which it counts as dead; 0 = 3 x interval_s
    max_retry: int = 1  # times a dead trial is re-queued with the same parameters

    @property
    def grace(self) -> int:
        return self.grace_s or 3 * self.interval_s


def journal_path(url: str) -> Path | None:
    """The file of a journal storage (`journal:PATH` or a path ending in .journal), else None."""
    if url.startswith("journal:"):
        return Path(url[len("journal:"):]).expanduser()
    if url.endswith(".journal") and "://" not in url:
        return Path(url).expanduser()
    return None


def describe(url: str) -> str:
    """The URL as it may be logged: never a password."""
    if journal_path(url) is not None:
        return url
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: open_storage reports it; here it is only shown
        return url


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal file with the heartbeat Optuna 5 gives only to RDBStorage.

    Each running trial's worker writes a timestamp into the trial's system attributes; a trial counts as dead
    when neither that timestamp nor its start is within the grace period. Workers on several machines
    sharing one journal on NFS must keep their clocks in sync (NTP) for this to be right.
    """

    def __init__(self, path: Path, heartbeat: Heartbeat):
        super().__init__(JournalFileBackend(str(path)))
        self._heartbeat = heartbeat
        self._stale_callback = RetryHeartbeatStaleTrialCallback(max_retry=heartbeat.max_retry)

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now, stale = time.time(), []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            # A retried trial inherits its dead parent's timestamp, so its own start counts as a beat too.
            started = trial.datetime_start.timestamp() if trial.datetime_start else now
            if now - max(trial.system_attrs.get(HEARTBEAT_ATTR, 0.0), started) > self._heartbeat.grace:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat.interval_s

    def get_heartbeat_stale_trial_callback(self):
        return self._stale_callback


def with_driver(url: str) -> str:
    """SQLAlchemy 2.1 maps postgresql:// to psycopg 3; fall back to psycopg2 (the test extra) if only it is installed."""
    if url.startswith("postgresql://") and not importlib.util.find_spec("psycopg") and importlib.util.find_spec("psycopg2"):
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def open_storage(url: str, heartbeat: Heartbeat = Heartbeat(), must_exist: bool = False) -> optuna.storages.BaseStorage:
    """Open (creating tables or the file if needed) an Optuna storage, or say in one line why it cannot be."""
    path = journal_path(url)
    sqlite_file = Path(url[len("sqlite:///"):]).expanduser() if url.startswith("sqlite:///") else None
    for file in (path, sqlite_file):
        if file is not None and must_exist and not file.is_file():
            raise UserError(f"Optuna storage '{url}' does not exist; run `python -m studies.search` first")
        if file is not None and not file.parent.is_dir():
            raise UserError(f"cannot open Optuna storage '{url}': folder {file.parent} does not exist")
    try:
        with quiet_experimental():
            if path is not None:
                return HeartbeatJournalStorage(path, heartbeat)
            # SQLite serialises writers; a generous lock timeout lets several local workers share one file.
            engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
            return RDBStorage(with_driver(url), engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat.interval_s,
                              grace_period=heartbeat.grace, heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                                  max_retry=heartbeat.max_retry))
    except Exception as exc:  # sqlalchemy (bad URL, refused connection, missing driver) and OS errors alike
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"cannot open Optuna storage '{describe(url)}': {first}; give one of "
                        "sqlite:///FILE.db, postgresql://USER@HOST/DB or journal:FILE") from None


def load_study(name: str, url: str, **kwargs) -> optuna.Study:
    """An existing study, or a UserError naming the studies the storage does hold."""
    storage = open_storage(url, must_exist=True)
    try:
        return optuna.load_study(study_name=name, storage=storage, **kwargs)
    except KeyError:
        known = optuna.get_all_study_names(storage)
        raise UserError(f"no Optuna study '{name}' in {describe(url)}; known: {', '.join(known) or 'none'}") from None
