"""A study's runs as jobs of an Optuna queue: several workers train every run once, a dead worker's run is taken
over from its last checkpoint in the same MLflow run, a run that crashes on its own is failed once."""

from __future__ import annotations

import time

import optuna
import pytest

from core import records as rec
from core.tracking import Store
from studies.run import workers as q
from studies.search import RunQueue
from studies.run import study as study_mod
from studies.run.__main__ import main
from studies.run.study import StudySpec, run_study
from tests.conftest import TINY
from tests.helpers import mlflow_server, set_flags
from tests.test_study_outcomes import in_dir  # noqa: F401  (a fixture)


def _spec(synthetic_root, cache_dir, workdir) -> StudySpec:
    overrides = {**TINY, "data.root": str(synthetic_root), "data.max_images": 48, "data.cache_dir": str(cache_dir),
                 "eval.fid_final_samples": 0}
    return StudySpec(ablation="baseline", seeds=(0,), preset="quick", overrides=overrides, workdir=workdir)


def _study_queue(cwd, synthetic_root, cache_dir):
    """(store, queue URL, spec, parent run, queue) of a baseline study of TINY runs in `cwd`, 1 s heartbeats."""
    store = Store(f"sqlite:///{cwd / 'mlflow.db'}")
    url = f"sqlite:///{cwd / 'queue.db'}"
    spec = _spec(synthetic_root, cache_dir, cwd / "runs")
    parent = store.start_run("baseline", "parent", {rec.STUDY: rec.PARENT})
    return store, url, spec, parent, q.open_queue(url, 1, spec, parent.run_id)


def test_a_dead_workers_run_is_taken_over_from_its_checkpoint_in_the_same_mlflow_run(in_dir, synthetic_root,
                                                                                  cache_dir, monkeypatch):
    store, url, spec, parent, queue = _study_queue(in_dir(), synthetic_root, cache_dir)
    q.enqueue(queue, [("baseline", 0)])
    q.enqueue(queue, [("baseline", 0)])  # a resumed launcher enqueues again: nothing is added twice
    assert len(queue.jobs()) == 1

    # worker A takes the job, trains past its checkpoint at 16 images, and dies at the log of 24 (no more beats)
    taken = queue.take()
    assert taken.params == {"variant": "baseline", "seed": 0}
    def die(bar, nimg, stats):
        if nimg >= 24:
            raise KeyboardInterrupt
    monkeypatch.setattr(study_mod, "_advance", die)
    configs = study_mod.resolve_configs(spec)
    from core.build import share_images
    from core.data import load_images
    images = share_images(configs["baseline"], load_images(configs["baseline"].data, 32))
    with pytest.raises(KeyboardInterrupt):
        study_mod.run_one_job(spec, store, store.resume_run(parent.run_id), "baseline", 0,
                              study_mod.seeded(configs["baseline"], 0), images, progress=True)
    monkeypatch.undo()
    dead_run = study_mod.child_runs(store, "baseline", parent.run_id)[("baseline", 0)].info.run_id
    assert [state for _, state, _ in queue.jobs()] == ["RUNNING"]  # nobody told the queue

    time.sleep(3.5)  # 3 heartbeats of 1 s without a beat: the worker counts as dead
    ran = q.work(spec, store, parent.run_id, url, 1, worker=1, images=images.image_set)
    assert ran == 1
    children = study_mod.child_runs(store, "baseline", parent.run_id)
    run = children[("baseline", 0)]
    assert len(children) == 1 and run.info.run_id == dead_run  # the same MLflow run, not a second one
    assert run.data.tags[rec.OUTCOME] == "finished" and run.info.status == "FINISHED"
    steps = [step for step, _ in store.metric_history(dead_run, rec.LOSS_D)]
    assert steps == [8, 16, 24, 32]  # continued from the checkpoint at 16: 24 again, no duplicate, not from 0
    jobs = queue.jobs()
    assert [state for _, state, _ in jobs] == ["FAIL", "COMPLETE"]  # failed as stale, queued again, done
    assert jobs[1][0] == taken.params and jobs[1][2][q.RUN_ATTR] == dead_run
    assert queue.unfinished() == []


def test_a_run_that_crashes_on_its_own_is_failed_once_not_retried(in_dir, synthetic_root, cache_dir, monkeypatch):
    store, url, spec, parent, queue = _study_queue(in_dir(), synthetic_root, cache_dir)
    q.enqueue(queue, [("baseline", 0)])
    monkeypatch.setattr(study_mod, "execute_run", lambda *a, **kw: 1 / 0)
    assert q.work(spec, store, parent.run_id, url, 1, worker=0) == 1
    run = study_mod.child_runs(store, "baseline", parent.run_id)[("baseline", 0)]
    assert run.data.tags[rec.OUTCOME] == "failed" and "ZeroDivisionError" in run.data.tags["error"]
    assert [state for _, state, _ in queue.jobs()] == ["COMPLETE"]  # done: a result, not retried


def test_join_needs_a_queue_and_finds_none_to_join(in_dir, capsys):
    cwd = in_dir()
    assert main(["--join", "pooling"]) == 2 and "--join needs --queue" in capsys.readouterr().err
    assert main(["--join", "pooling", "--queue", f"sqlite:///{cwd / 'q.db'}"]) == 2
    assert "no study 'pooling' with runs left to train" in capsys.readouterr().err
    assert main(["pooling", "--workers", "0"]) == 2
    capsys.readouterr()
    dead = "postgresql://nobody@127.0.0.1:1/queue"  # nothing listens on port 1
    for args in (["--join", "pooling", "--queue", dead], ["pooling", "--workers", "2", "--queue", dead, "--preset", "quick"]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: cannot open Optuna storage 'postgresql://nobody@127.0.0.1:1/")


def test_the_eta_splits_runs_over_gpus_but_not_over_shared_cpu_cores():
    assert q.eta_workers(900.0, 9, 4, cuda=True) == pytest.approx(300.0)  # ceil(9 / 4) = 3 rounds of 100 s
    assert q.eta_workers(900.0, 9, 4, cuda=False) == 900.0
    assert q.eta_workers(900.0, 9, 1, cuda=True) == 900.0


def test_a_study_spec_survives_the_queue(synthetic_root, cache_dir, tmp_path):
    spec = StudySpec(ablation="combine", seeds=(0, 2), preset="cpu", base=(("ttur", "ttur"),),
                     overrides={"train.kimg": 1.0}, variants=("baseline",), workdir=tmp_path,
                     stacked=(("pooling", "avgpool"),), notes={"eta": 1})
    back = q.spec_from_json(q.spec_json(spec))
    assert back == StudySpec(**{**spec.__dict__, "notes": {}})
    assert run_study  # the sequential path stays the default (one worker, no queue)


# ---- a real PostgreSQL queue, a real MLflow server, a worker killed with SIGKILL --------------------------------
from tests.test_search import postgres_url  # noqa: E402,F401  (a module fixture: a throwaway PostgreSQL server)


@pytest.fixture(scope="module")
def mlflow_http(tmp_path_factory, _migrated_mlflow_db):
    """A real MLflow server with an artifact store, over a fresh SQLite backend."""
    import shutil
    root = tmp_path_factory.mktemp("mlflow-server")
    db = shutil.copy(_migrated_mlflow_db, root / "mlflow.db")
    with mlflow_server(f"sqlite:///{db}", root, "--artifacts-destination", str(root / "artifacts")) as url:
        yield url


@pytest.mark.slow
def test_kill_9_of_a_worker_mid_run_on_postgresql_and_an_mlflow_server(tmp_path, postgres_url, mlflow_http,
                                                                      synthetic_root, cache_dir):
    """A quick study with two workers on a PostgreSQL queue reporting to an MLflow server; one is killed with SIGKILL
    after its run's first checkpoint. The other finishes the study: one finished run per (variant, seed), the killed
    run continued from its checkpoint in the same MLflow run with no duplicated step, and one report."""
    import os
    import re
    import signal
    import subprocess
    import sys
    from tests.test_search import REPO
    env = {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "OMP_NUM_THREADS": "1"}
    sets = {**TINY, "data.max_images": 48, "data.cache_dir": str(cache_dir), "eval.fid_final_samples": 0,
            "train.kimg": 1.6, "train.checkpoint_every_kimg": 0.4, "train.log_every_kimg": 0.08,
            "train.sample_every_kimg": 1.6}  # 200 steps a run, a checkpoint every 50
    cmd = [sys.executable, "-m", "studies.run", "pooling", "--variants", "maxpool", "--seeds", "1", "--preset", "quick",
           "--workers", "2", "--queue", postgres_url, "--tracking-uri", mlflow_http, "--heartbeat", "1",
           "--data", str(synthetic_root), "--no-progress", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    launcher = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    storage = RunQueue.connect(postgres_url, 1)
    killed_at = victim = None
    deadline = time.time() + 300
    while victim is None and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.5)
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        if not names:
            continue
        running = [t for t in optuna.load_study(study_name=names[0], storage=storage).get_trials()
                   if t.state == optuna.trial.TrialState.RUNNING and q.WORKER_ATTR in t.user_attrs]
        checkpoints = list((tmp_path / "runs" / "pooling").glob("*/checkpoint.pt"))
        if running and len(checkpoints) >= len(running):  # every running run has checkpointed at least once
            victim = running[0]
            os.kill(int(victim.user_attrs[q.WORKER_ATTR].split(":")[1]), signal.SIGKILL)
            killed_at = time.time()
    assert victim is not None, "no running job with a checkpoint to kill"
    out, err = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, err[-3000:]
    assert "2 workers share this CPU's cores" in err  # the ETA says what workers do here
    assert (tmp_path / "reports" / "pooling.md").is_file() and out.count("report ") == 1  # written once, at the end
    study = optuna.load_study(study_name=q.queue_name("pooling", re.search(
        r"parent run (\w+)", out).group(1)), storage=storage)
    trials = study.get_trials()
    from studies.search.queue import job_params
    retried = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE
               and job_params(t) == job_params(victim) and t.number != victim.number]
    assert [t.state for t in trials if t.number == victim.number] == [optuna.trial.TrialState.FAIL]
    assert len(retried) == 1 and RunQueue(study, storage).unfinished() == []
    takeover_s = retried[0].datetime_start.timestamp() - killed_at
    store = Store(mlflow_http)
    runs = store.runs_frame("pooling")
    children = runs[runs["tags.study"] == "child"]
    assert sorted(children["tags.mlflow.runName"]) == ["baseline-s0", "maxpool-s0"]
    assert (children["tags.outcome"] == "finished").all()
    assert sorted(t.user_attrs[q.RUN_ATTR] for t in trials if t.state == optuna.trial.TrialState.COMPLETE) == sorted(
        children["run_id"])  # each job's run is the one child of its (variant, seed)
    run_id = retried[0].user_attrs[q.RUN_ATTR]
    steps = [step for step, _ in store.metric_history(run_id, rec.LOSS_D)]
    assert steps == sorted(set(steps)) and steps[0] == 80 and steps[-1] == 1600  # every log once, in order
    print(f"takeover {takeover_s:.1f} s after the kill (heartbeat 1 s, grace 3 s)")


def test_a_joining_worker_reads_the_study_from_the_queue_and_trains_what_waits(in_dir, synthetic_root, cache_dir):
    store, url, spec, parent, queue = _study_queue(in_dir(), synthetic_root, cache_dir)
    q.enqueue(queue, [("baseline", 0), ("baseline", 1)])
    assert q.join("baseline", url, store.uri, 1, data=str(synthetic_root)) == 2  # this machine's copy of the data
    children = study_mod.child_runs(store, "baseline", parent.run_id)
    assert sorted(children) == [("baseline", 0), ("baseline", 1)]
    assert all(r.data.tags[rec.OUTCOME] == "finished" for r in children.values())
    assert children[("baseline", 1)].data.params["train.seed"] == "1"


# ---- the command line with workers: a second process joining, --base and --smoke, every worker killed ----------
def tiny_sets(cache_dir, **more) -> dict[str, object]:
    """TINY runs (4 steps of 8 images unless `more` says otherwise), no final FID."""
    return {**TINY, "data.max_images": 48, "data.cache_dir": str(cache_dir), "eval.fid_final_samples": 0,
            **{k.replace("__", "."): v for k, v in more.items()}}



def test_a_bad_heartbeat_or_a_queue_that_does_not_answer_is_one_line_and_writes_nothing(in_dir, synthetic_root,
                                                                                           cache_dir, capsys):
    """--heartbeat below 1 s would count every running job as dead at once (on a journal file, whose storage takes
    any interval, a second worker would train the same run beside the first): refused, like a dead queue, before
    anything is written."""
    cwd = in_dir()
    journal = cwd / "queue.journal"
    study = ["pooling", "--seeds", "1", "--preset", "quick", "--data", str(synthetic_root), "--no-progress",
             *set_flags(tiny_sets(cache_dir))]  # tiny runs: were it accepted, the test would fail in seconds
    dead = "postgresql://nobody@127.0.0.1:1/queue"  # nothing listens on port 1
    for args, says in ((["--queue", f"journal:{journal}", "--heartbeat", "0"], "--heartbeat 0 must be >= 1"),
                       (["--heartbeat", "-5"], "--heartbeat -5 must be >= 1"),  # the default queue
                       (["--queue", dead], "cannot open Optuna storage")):
        assert main([*study, "--workers", "2", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert main(["--join", "pooling", "--queue", f"journal:{journal}", "--heartbeat", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--heartbeat 0 must be >= 1" in err[0], err
    assert sorted(p.name for p in cwd.iterdir()) == ["mlflow.db"]  # no queue, no runs, no report
    assert Store(f"sqlite:///{cwd / 'mlflow.db'}").client.search_experiments(filter_string="name = 'pooling'") == []


def test_a_rerun_queues_again_a_job_whose_every_try_failed(in_dir, synthetic_root, cache_dir):
    """A job whose trials all failed (its worker died MAX_RETRY + 1 times, or it stopped on a UserError such as a
    checkpoint of another config) is queued again by the next launch: rerunning the same command resumes it."""
    store, url, spec, parent, queue = _study_queue(in_dir(), synthetic_root, cache_dir)
    q.enqueue(queue, [("baseline", 0)])
    queue.fail(queue.take())  # the last try, failed with no copy left to run
    assert queue.take() is None and queue.unfinished() == [{"variant": "baseline", "seed": 0}]
    q.enqueue(queue, [("baseline", 0)])  # the rerun's launcher
    q.enqueue(queue, [("baseline", 0)])  # and once queued again, not twice
    assert [state for _, state, _ in queue.jobs()] == ["FAIL", "WAITING"]
    assert q.work(spec, store, parent.run_id, url, 1, worker=0) == 1
    assert queue.unfinished() == []
    run = study_mod.child_runs(store, "baseline", parent.run_id)[("baseline", 0)]
    assert run.data.tags[rec.OUTCOME] == "finished"
