"""The only module that talks to MLflow: a store, runs as trackers, and reads back for reports.

One experiment per ablation study, a parent run per invocation, a child run per variant x seed. Metrics are
logged against images seen (MLflow `step` = nimg) so batch-size variants line up in the compare view.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from core import records as rec
from core.errors import UserError

DEFAULT_URI = "sqlite:///mlflow.db"  # MLflow 3's own embedded default, in the working directory
PARAM_CHUNK = 100  # MLflow accepts at most 100 params per batch


class NullTracker:
    """Same methods as a run tracker, records nothing: for tests and dry runs."""
    run_id: str | None = None
    parent_id: str | None = None  # the run this one is a child of; None for a run of its own

    def log_params(self, params: dict[str, object]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, subdir: str | None = None) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def set_tags(self, tags: dict[str, object]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...

    @contextlib.contextmanager
    def watching_system(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def finishing(self) -> Iterator[None]:
        """Finish the run when the block ends: FINISHED, or KILLED when anything (Ctrl-C included) escapes it."""
        try:
            yield
        except BaseException:
            self.finish("KILLED")
            raise
        self.finish("FINISHED")

    def record_crash(self, exc: BaseException, **tags: object) -> None:
        """Record an unexpected exception on the run: an `error` tag (plus `tags`) and the traceback as error.txt."""
        self.set_tags({**tags, "error": f"{type(exc).__name__}: {exc}"[:500]})
        self.log_text("".join(traceback.format_exception(exc)), "error.txt")


def _retry(fn, *args, attempts: int = 8, **kwargs):
    """SQLite allows one writer at a time: another study writing to the same file makes a call fail with
    'database is locked'. Such calls are retried with backoff instead of losing the run's records."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt == attempts - 1 or "locked" not in str(exc):
                raise
            time.sleep(0.2 * 2**attempt)


class RunTracker(NullTracker):
    """One MLflow run, written through the client API (no global active run, safe for nested runs).

    `skip_until` drops metrics at steps already recorded, so a resumed run replaying the steps between its
    last checkpoint and the kill leaves no duplicated points in its curves.
    """

    def __init__(self, client, run_id: str, skip_until: int = -1, parent_id: str | None = None):
        self.client = client
        self.run_id = run_id
        self.skip_until = skip_until
        self.parent_id = parent_id

    def log_params(self, params):
        from mlflow.entities import Param
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), PARAM_CHUNK):
            _retry(self.client.log_batch, self.run_id, params=items[i:i + PARAM_CHUNK])

    def log_metrics(self, metrics, step):
        from mlflow.entities import Metric
        if step <= self.skip_until:
            return
        now = int(time.time() * 1000)
        _retry(self.client.log_batch, self.run_id,
               metrics=[Metric(k, float(v), now, int(step)) for k, v in metrics.items()])

    def log_artifact(self, path, subdir=None):
        _retry(self.client.log_artifact, self.run_id, str(path), subdir)

    def log_text(self, text, name):
        _retry(self.client.log_text, self.run_id, text, name)

    def set_tags(self, tags):
        from mlflow.entities import RunTag
        _retry(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, status="FINISHED"):
        _retry(self.client.set_terminated, self.run_id, status)

    @contextlib.contextmanager
    def watching_system(self) -> Iterator[None]:
        """MLflow's system metrics (CPU, memory, disk, network; each NVIDIA GPU's utilisation and memory where
        nvidia-ml-py finds one) while the block runs, under system/NODE/ so that a run taken over by another
        machine shows which did what; the run is tagged with the node and the GPU its worker was given. Every
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (MLflow's variable; default 10), against MLflow's own
        step count (a resumed run continues it)."""
        import socket
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        node = socket.gethostname().split(".")[0]
        self.set_tags({rec.SYSTEM_NODE: node, rec.SYSTEM_GPU: os.environ.get("CUDA_VISIBLE_DEVICES", "all")})
        with _quiet_system_metrics():
            monitor = SystemMetricsMonitor(self.run_id, node_id=node, resume_logging=True,
                                           tracking_uri=self.client.tracking_uri)
            monitor.start()
        try:
            yield
        finally:
            with _quiet_system_metrics():
                monitor.finish()


@contextlib.contextmanager
def _quiet_system_metrics() -> Iterator[None]:
    """MLflow logs every start and stop of its monitor at INFO: one line per run of a study."""
    logger = logging.getLogger("mlflow.system_metrics")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def store_uri(uri: str | None = None) -> str:
    """The tracking URI a Store opens: the given one, else MLFLOW_TRACKING_URI, else ./mlflow.db, with a SQLite
    path made absolute (MLflow caches stores by URI, so a relative path would keep pointing at the first cwd)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def check_store_uri(uri: str | None = None) -> None:
    """What can be checked in milliseconds, without creating anything: a SQLite store's folder exists, a database
    server accepts connections. Commands call it before minutes of work; MLflow itself retries an unreachable
    server for about a minute and a half before it gives up."""
    import socket
    from urllib.parse import urlsplit
    uri = store_uri(uri)
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise UserError(f"cannot open MLflow tracking store '{uri}': folder {folder} does not exist")
        return
    parts = urlsplit(uri)
    port = DB_PORTS.get(parts.scheme.split("+")[0])
    if port is None or not parts.hostname:
        return
    try:
        socket.create_connection((parts.hostname, parts.port or port), timeout=10).close()
    except OSError as exc:
        raise UserError(f"cannot open MLflow tracking store '{uri}': {parts.hostname}:{parts.port or port} "
                        f"does not answer ({exc.strerror or exc}); pass --tracking-uri or set MLFLOW_TRACKING_URI") from None


class Store:
    """An MLflow tracking store, opened and checked once, so a bad URI fails before any training."""

    def __init__(self, uri: str | None = None):
        self.uri = store_uri(uri)
        check_store_uri(self.uri)
        from mlflow import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # table-creation chatter on first use
        logging.getLogger("alembic").setLevel(logging.WARNING)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        try:
            with _init_lock(self.uri):
                self.client = MlflowClient(tracking_uri=self.uri)
                self.client.search_experiments(max_results=1)
        except Exception as exc:  # sqlalchemy, REST and filesystem errors all mean "cannot open"
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot open MLflow tracking store '{self.uri}': {first}; "
                            "pass --tracking-uri or set MLFLOW_TRACKING_URI") from None

    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:  # a model-training experiment: MLflow 3's UI then shows its runs, not the GenAI trace overview
            return self.client.create_experiment(name, tags={"mlflow.experimentKind": "custom_model_development"})
        except Exception:  # another process created it between our two calls
            return self.client.get_experiment_by_name(name).experiment_id

    def start_run(self, experiment: str, name: str, tags: dict[str, object], parent: RunTracker | None = None) -> RunTracker:
        tags = {k: str(v) for k, v in tags.items()}
        if parent is not None:
            tags["mlflow.parentRunId"] = parent.run_id
        run = _retry(self.client.create_run, self.experiment_id(experiment), run_name=name, tags=tags)
        return RunTracker(self.client, run.info.run_id, parent_id=parent.run_id if parent is not None else None)

    def resume_run(self, run_id: str) -> RunTracker:
        """Reopen an interrupted run so that its metric curves continue in place, without duplicates."""
        _retry(self.client.update_run, run_id, status="RUNNING")
        data = self.client.get_run(run_id).data
        last = max((m.step for k in data.metrics for m in self.client.get_metric_history(run_id, k)), default=-1)
        return RunTracker(self.client, run_id, skip_until=last, parent_id=data.tags.get("mlflow.parentRunId"))

    def discard_run(self, run_id: str) -> None:
        """Delete a run that holds no result (MLflow's soft delete: searches no longer find it, `mlflow gc` can
        restore or purge it)."""
        _retry(self.client.delete_run, run_id)

    def find_runs(self, experiment: str, filter_string: str = "") -> list:
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        return self.client.search_runs([exp.experiment_id], filter_string, max_results=10000)

    def find_tagged(self, tag: str, value: str) -> list:
        """Runs of every experiment whose tag `tag` is `value`, oldest first."""
        ids = [e.experiment_id for e in self.client.search_experiments(max_results=50000)]
        if not ids:
            return []
        runs = self.client.search_runs(ids, f"tags.`{tag}` = '{value}'", max_results=10000)
        return sorted(runs, key=lambda r: r.info.start_time)

    def experiment_name(self, experiment_id: str) -> str:
        return self.client.get_experiment(experiment_id).name

    def runs_frame(self, experiment: str, filter_string: str = ""):
        """All runs of an experiment as a DataFrame (params., metrics., tags. columns), like mlflow.search_runs."""
        import mlflow
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            raise UserError(f"no MLflow experiment '{experiment}' in {self.uri}; run the study first")
        # search_runs reads MLflow's global URI, and set_tracking_uri also exports it as MLFLOW_TRACKING_URI,
        # which the next Store() of this process (or a child process) would take for the user's choice
        env = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)
        try:
            return mlflow.search_runs([exp.experiment_id], filter_string, max_results=10000)
        finally:
            if env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = env

    def save_view(self, experiment: str, key: str, state: dict[str, object]) -> str | None:
        """Store a runs-table view (filter, sort, columns, grouping) that the MLflow UI opens by `key`.

        Returns None when saved, else why the store refused it (an MLflow error, e.g. a server that does not
        take experiment tags or a value over its length limit); callers go on without the view.
        """
        from mlflow.exceptions import MlflowException
        try:
            _retry(self.client.set_experiment_tag, self.experiment_id(experiment), f"mlflow.sharedViewState.{key}",
                   json.dumps(state))
        except MlflowException as exc:
            return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return None

    def has_view(self, experiment: str, key: str) -> bool:
        exp = self.client.get_experiment_by_name(experiment)
        return exp is not None and f"mlflow.sharedViewState.{key}" in exp.tags

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]

    def download(self, run_id: str, path: str, dst: Path) -> Path:
        dst.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, path, str(dst)))

    def list_artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        return [f.path for f in self.client.list_artifacts(run_id, path)]


@contextlib.contextmanager
def _init_lock(uri: str):
    """Serialise the first open of a local SQLite store: two processes creating its tables at once collide."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def dump_json(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
