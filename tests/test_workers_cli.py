"""Workers through the command line, in processes of their own: a second study joined from another process, --smoke
and --base with workers, and a study whose every worker was killed, resumed by the same command. (Apart from
tests/test_queue.py so that the test runner can put the two files on different cores.)"""

from __future__ import annotations

import time

import optuna
import pytest

from core import records as rec
from core.tracking import Store
from studies.run import workers as q
from studies.run.__main__ import main
from studies.search import RunQueue
from tests.helpers import cli_env, install_fake_fid, set_flags
from tests.test_queue import tiny_sets
from tests.test_study_outcomes import in_dir  # noqa: F401  (a fixture)


def _children(store: Store, experiment: str):
    """The child runs of `experiment`, as a DataFrame."""
    runs = store.runs_frame(experiment)
    return runs[runs["tags.study"] == rec.CHILD]


@pytest.mark.slow
def test_a_second_study_joined_from_another_process_shares_the_workers(tmp_path, synthetic_root, cache_dir,
                                                                        empty_store_db):
    """One launcher queues two studies in turn with one worker of its own; a `--join all` worker in another process
    trains jobs of both (it moves on to the second study by itself). Every run trains once, in one MLflow run,
    and both reports are written."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    env = cli_env(tmp_path)
    url, tracking = f"sqlite:///{tmp_path / 'queue.db'}", f"sqlite:///{empty_store_db}"
    RunQueue.connect(url, 2)  # the queue's tables, made before two processes race to make them
    # 2 s heartbeats: a worker out of jobs looks again every second, and a live one loaded by the other
    # processes on a test machine is not taken for dead (6 s of silence)
    common = ["--queue", url, "--tracking-uri", tracking, "--heartbeat", "2", "--no-progress"]
    # Both start together. The joiner is ready within its imports and then looks for a queue every second, while
    # the launcher first measures its ETA, then per study spawns its worker (seconds of imports and data loading
    # before it asks for a job): so the joiner, already warm, takes the first job of each study. It then waits
    # JOIN_WAIT_S (120 s, not settable from outside the process) for a third study, so it is stopped at the end.
    log = (tmp_path / "join.log").open("w")
    joiner = subprocess.Popen([sys.executable, "-m", "studies.run", "--join", "all", *common], cwd=tmp_path, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        launcher = subprocess.run([sys.executable, "-m", "studies.run", "pooling,loss", "--seeds", "1", "--preset",
                                   "quick", "--workers", "1", "--data", str(synthetic_root), *common,
                                   *set_flags(tiny_sets(cache_dir))], cwd=tmp_path, env=env, capture_output=True,
                                  text=True, timeout=600)
        assert launcher.returncode == 0, launcher.stderr[-3000:]
        assert joiner.poll() is None, (tmp_path / "join.log").read_text()[-3000:]  # still waiting for a next study
    finally:
        with contextlib.suppress(ProcessLookupError):  # it ended on its own: a failure, told above
            os.killpg(joiner.pid, signal.SIGKILL)
        joiner.wait()
        log.close()
    assert launcher.stdout.count("report ") == 2
    store = Store(tracking)
    queues = [s.study_name for s in optuna.get_all_study_summaries(RunQueue.connect(url, 2), include_best_trial=False)]
    for experiment, variants in (("pooling", ["avgpool", "baseline", "maxpool"]),
                                 ("loss", ["baseline", "hinge", "lsgan"])):  # loss's baseline: pooling's, reused
        children = _children(store, experiment)
        assert sorted(zip(children["tags.variant"], children["tags.seed"])) == [(v, "0") for v in variants]
        assert (children["status"] == "FINISHED").all() and (children["tags.outcome"] == "finished").all()
        assert (tmp_path / "reports" / f"{experiment}.md").is_file()
        [name] = [n for n in queues if n.startswith(f"{q.QUEUE_PREFIX}{experiment}:")]
        jobs = RunQueue.load(url, 2, name).jobs()
        assert [state for _, state, _ in jobs] == ["COMPLETE"] * 3
        assert sorted(attrs[q.RUN_ATTR] for _, _, attrs in jobs) == sorted(children["run_id"])
        takers = [int(attrs[q.WORKER_ATTR].split(":")[1]) for _, _, attrs in jobs]
        assert joiner.pid in takers, (experiment, takers, joiner.pid)  # the joined worker took jobs of both studies


@pytest.mark.slow
def test_smoke_and_base_keep_working_with_workers(in_dir, synthetic_root, cache_dir, capsys, monkeypatch):
    """--smoke --workers 2 preflights in this process: one line per variant and nothing in the stores; a study over
    a --base variant with two workers: its own experiment, every run on the base's settings, every job done."""
    cwd = in_dir()
    install_fake_fid(monkeypatch)  # the smoke's FID/KID (this process): what is tested is around it
    flags = ["pooling", "--variants", "maxpool", "--seeds", "1", "--preset", "quick", "--workers", "2",
             "--heartbeat", "2", "--data", str(synthetic_root), "--no-progress", *set_flags(tiny_sets(cache_dir))]
    assert main([*flags, "--smoke"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[:2] for line in out.splitlines() if line.startswith(("ok", "FAIL"))] == [
        ["ok", "baseline"], ["ok", "maxpool"]]
    store = Store(f"sqlite:///{cwd / 'mlflow.db'}")
    assert store.client.search_experiments(filter_string="name = 'pooling'") == []
    assert not (cwd / "runs").exists() and not (cwd / "reports").exists()
    assert not (cwd / "optuna.db").exists()  # the smoke needs no queue, and makes none
    queue_url = f"sqlite:///{cwd / 'optuna.db'}"

    assert main([*flags, "--base", "label_smoothing=real_0.9"]) == 0
    experiment = "pooling@label_smoothing=real_0.9"
    assert f"study {experiment}: parent run" in capsys.readouterr().out
    children = _children(store, experiment)
    assert sorted(children["tags.mlflow.runName"]) == ["baseline-s0", "maxpool-s0"]
    assert (children["tags.outcome"] == "finished").all() and (children["status"] == "FINISHED").all()
    assert set(children["tags.base"]) == {"label_smoothing=real_0.9"}
    assert set(children["params.train.real_label"]) == {"0.9"}  # the workers trained on the base variant
    assert set(children["params.model.d_downsample"]) == {"stride", "maxpool"}
    [name] = [s.study_name for s in optuna.get_all_study_summaries(queue_url, include_best_trial=False)]
    assert name.startswith(f"{q.QUEUE_PREFIX}{experiment}:")
    jobs = RunQueue.load(queue_url, 2, name).jobs()
    assert [state for _, state, _ in jobs] == ["COMPLETE"] * 2
    assert sorted(attrs[q.RUN_ATTR] for _, _, attrs in jobs) == sorted(children["run_id"])
    assert (cwd / "reports" / f"{experiment}.md").is_file()


@pytest.mark.slow
def test_a_study_whose_workers_were_all_killed_resumes_on_the_same_command(tmp_path, synthetic_root, cache_dir,
                                                                            empty_store_db):
    """The launcher and both its workers killed with SIGKILL once a run has logged past its checkpoint; the same
    command again finishes the study: one finished run per (variant, seed), every interrupted run continued in its
    own MLflow run with each log once."""
    import os
    import signal
    import subprocess
    import sys
    sets = tiny_sets(cache_dir, train__kimg=0.8, train__checkpoint_every_kimg=0.2, train__log_every_kimg=0.04,
                      train__sample_every_kimg=0.8)  # 100 steps a run, a checkpoint every 25, a log every 5
    cmd = [sys.executable, "-m", "studies.run", "pooling", "--variants", "maxpool", "--seeds", "1", "--preset",
           "quick", "--workers", "2", "--heartbeat", "2", "--data", str(synthetic_root), "--no-progress",
           *set_flags(sets)]
    env = cli_env(tmp_path)
    store = Store(f"sqlite:///{empty_store_db}")  # the command's default store, in its working directory
    with (tmp_path / "first.log").open("w") as log:
        launcher = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own process group: the launcher and its workers
        try:
            checkpointed = None
            deadline = time.time() + 300
            while checkpointed is None and time.time() < deadline and launcher.poll() is None:
                time.sleep(0.2)
                for path in (tmp_path / "runs" / "pooling").glob("*/checkpoint.pt"):
                    run_id = path.parent.name
                    logged = [step for step, _ in store.metric_history(run_id, rec.LOSS_D)]
                    # past its last checkpoint (one every 200 images): those logs come again after the resume
                    if store.client.get_run(run_id).info.status == "RUNNING" and logged and logged[-1] % 200:
                        os.killpg(launcher.pid, signal.SIGKILL)
                        checkpointed = run_id
                        break
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert checkpointed is not None, (tmp_path / "first.log").read_text()[-3000:]
    before = _children(store, "pooling")
    earlier = dict(zip(before["tags.mlflow.runName"], before["run_id"]))  # what the killed workers had started
    assert checkpointed in set(before.loc[before["status"] == "RUNNING", "run_id"])  # nobody told MLflow

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    parents = store.runs_frame("pooling")
    assert list(parents.loc[parents["tags.study"] == rec.PARENT, "status"]) == ["FINISHED"]  # the same study, resumed
    children = _children(store, "pooling")
    assert sorted(children["tags.mlflow.runName"]) == ["baseline-s0", "maxpool-s0"]
    assert (children["status"] == "FINISHED").all() and (children["tags.outcome"] == "finished").all()
    for name, run_id in zip(children["tags.mlflow.runName"], children["run_id"]):
        if name in earlier:
            assert run_id == earlier[name]  # continued in its own MLflow run, not a second one
        steps = [step for step, _ in store.metric_history(run_id, rec.LOSS_D)]
        assert steps == list(range(40, 801, 40)), (name, steps)  # every log once, in order
    assert (tmp_path / "reports" / "pooling.md").is_file()


def test_local_workers_share_the_cores_or_take_one_gpu_each(tmp_path, monkeypatch):
    """studies.cli.start_workers, which both a study's and a search's --workers use: on a CPU, n workers run
    cores/n torch threads each; with CUDA each sees one GPU (i mod the count); the caller's environment is kept."""
    import os

    import torch

    from studies.cli import join_all, start_workers
    from tests.helpers import say_threads_and_gpu  # a light module: each of the 5 children imports it
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "caller's")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)  # not this machine's count: torch's default differs
    cpu = start_workers(2, say_threads_and_gpu, lambda i: (str(tmp_path / f"cpu{i}"),), "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpu = start_workers(3, say_threads_and_gpu, lambda i: (str(tmp_path / f"gpu{i}"),), "gpu")
    join_all(cpu + gpu)
    assert [p.exitcode for p in cpu + gpu] == [0] * 5
    assert [(tmp_path / f"cpu{i}").read_text() for i in range(2)] == ["4 caller's"] * 2
    assert [(tmp_path / f"gpu{i}").read_text().split()[1] for i in range(3)] == ["0", "1", "0"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "caller's"
