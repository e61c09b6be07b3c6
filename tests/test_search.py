"""studies.search: a tiny Optuna LR search end to end, its MLflow record, shared storages, resume and --lr-from."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from glob import glob
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from core.errors import UserError
from core.tracking import Store
from studies.search.__main__ import main as search_main
from studies.search.orchestrate import run_search
from studies.search.storage import Heartbeat, open_storage
from studies.search.trial import SearchSpec, make_pruner
from tests.conftest import TINY
from tests.helpers import g_fid, install_fake_fid, set_flags

REPO = Path(__file__).resolve().parents[1]
TRIAL_KIMG = 0.048  # 6 steps of 8 images; with evals=2, FID at 16 and 32 images (reported) and 48 (final)


def tiny_overrides(synthetic_root: Path, cache_dir: Path) -> dict[str, object]:
    return {**TINY, "data.root": str(synthetic_root), "data.cache_dir": str(cache_dir)}


def child_runs(store: Store, experiment: str, parent_id: str):
    runs = store.runs_frame(experiment)
    return runs[runs["tags.mlflow.parentRunId"] == parent_id]


# ---- one tiny search, shared by the tests that read it -----------------------------------------------------
@pytest.fixture(scope="module")
def searched(tmp_path_factory, synthetic_root, cache_dir, _migrated_mlflow_db):
    """4 trials: 0 forced to diverge (lr_d=1e20), 1 made to prune at its first report, 2 and 3 complete."""
    tmp = tmp_path_factory.mktemp("search")
    spec = SearchSpec(study="tiny", storage=f"sqlite:///{tmp / 'optuna.db'}", trials=4, evals=2, trial_kimg=TRIAL_KIMG,
                      preset="quick", overrides=tiny_overrides(synthetic_root, cache_dir), workdir=tmp / "runs")
    store = Store(f"sqlite:///{shutil.copy(_migrated_mlflow_db, tmp / 'mlflow.db')}")  # schema made once per session
    study = optuna.create_study(study_name=spec.name, storage=spec.storage, direction="minimize")
    study.enqueue_trial({"lr_g": 2e-4, "lr_d": 1e20})  # far outside the range: NaN losses on the first step
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        mp.chdir(tmp)  # MLflow's default artifact root is ./mlruns
        mp.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number == 1)
        warnings.filterwarnings("ignore", "Fixed parameter lr_d with value 1e\\+20 is out of range")
        parent_id = run_search(spec, store)
    return SimpleNamespace(tmp=tmp, spec=spec, store=store, parent_id=parent_id,
                           study=optuna.load_study(study_name=spec.name, storage=spec.storage))


@pytest.mark.slow
def test_tiny_search_records_each_trial_and_a_diverged_trial_never_wins(searched):
    study, store, spec = searched.study, searched.store, searched.spec
    trials = sorted(study.trials, key=lambda t: t.number)
    S = optuna.trial.TrialState
    assert [t.state for t in trials] == [S.FAIL, S.PRUNED, S.COMPLETE, S.COMPLETE]
    assert trials[0].params["lr_d"] == 1e20
    assert study.best_trial.number == min(trials[2:], key=lambda t: t.value).number
    assert study.best_value == min(t.value for t in trials[2:])
    for t in trials[2:]:  # two reports each, at the same images seen for every trial
        assert sorted(t.intermediate_values) == [16, 32]
    assert sorted(trials[1].intermediate_values) == [16]  # stopped at its first report

    parents = store.runs_frame(spec.experiment).query("`tags.search` == 'parent'")
    assert list(parents["run_id"]) == [searched.parent_id] and parents["status"].iloc[0] == "FINISHED"
    children = child_runs(store, spec.experiment, searched.parent_id)
    assert sorted(children["tags.trial"].astype(int)) == [0, 1, 2, 3]
    by_number = {int(row["tags.trial"]): row for _, row in children.iterrows()}
    expected = {0: ("failed", "FAILED"), 1: ("pruned", "FINISHED"), 2: ("complete", "FINISHED"), 3: ("complete", "FINISHED")}
    for number, (state, status) in expected.items():
        row = by_number[number]
        assert (row["tags.state"], row["status"]) == (state, status), number
        assert float(row["params.trial.lr_d"]) == trials[number].params["lr_d"]
        assert float(row["params.optim.lr_g"]) == trials[number].params["lr_g"]  # the config the run trained with
    assert by_number[0]["tags.outcome"] == "diverged" and "non-finite losses" in by_number[0]["tags.error"]
    # pruned at its first report (16 images): it stopped there and spent no final FID
    assert by_number[1]["tags.outcome"] == "stopped" and not math.isfinite(by_number[1]["metrics.fid/final"])
    assert [step for step, _ in store.metric_history(by_number[1]["run_id"], "fid/fid16")] == [16]
    curve = store.metric_history(by_number[2]["run_id"], "fid/fid16")  # execute_run logs the FID curve
    assert [step for step, _ in curve] == [16, 32, 48]
    assert by_number[2]["metrics.search/objective"] == trials[2].value
    # the search optimises the quick preset's primary metric, KID: each complete trial's value is its final KID,
    # and what the pruner saw are its training-time KIDs
    assert {by_number[n]["params.derived.primary_metric"] for n in (2, 3)} == {"kid"}
    for n in (2, 3):
        assert trials[n].value == by_number[n]["metrics.kid/final"] != by_number[n]["metrics.fid/final"]
        kids = dict(store.metric_history(by_number[n]["run_id"], "kid/kid16"))
        assert trials[n].intermediate_values == {step: kids[step] for step in (16, 32)}

    parent = parents.iloc[0]
    assert float(parent["params.best.lr_g"]) == study.best_params["lr_g"]
    assert float(parent["params.best.lr_d"]) == study.best_params["lr_d"]
    assert int(parent["params.best.trial"]) == study.best_trial.number
    assert (parent["tags.trials_complete"], parent["tags.trials_pruned"], parent["tags.trials_failed"]) == ("2", "1", "1")
    assert "fid_reference" in store.list_artifacts(searched.parent_id)  # what every trial was scored against
    plots = set(store.list_artifacts(searched.parent_id, "optuna_plots"))
    assert {"optuna_plots/optimization_history.png", "optuna_plots/intermediate_values.png"} <= plots
    summary = json.loads(store.download(searched.parent_id, "summary.json", searched.tmp / "dl").read_text())
    assert summary["best"]["number"] == study.best_trial.number and summary["states"]["failed"] == 1
    # param importances need >= 2 complete trials, which this study has: drawn, not skipped
    assert "optuna_plots/param_importances.png" in plots and summary["plots_skipped"] == {}, summary["plots_skipped"]


@pytest.mark.slow
def test_resuming_adds_trials_and_refuses_other_settings(searched, monkeypatch):
    monkeypatch.chdir(searched.tmp)
    spec, store = searched.spec, searched.store
    with pytest.raises(UserError, match="was started with eval.fid_every_kimg"):
        run_search(dataclasses.replace(spec, evals=0, trials=1), store)
    parent_id = run_search(dataclasses.replace(spec, trials=1), store)
    study = optuna.load_study(study_name=spec.name, storage=spec.storage)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3, 4]
    assert study.trials[4].state.is_finished()
    assert len(child_runs(store, spec.experiment, parent_id)) == 1
    assert len(store.runs_frame(spec.experiment).query("`tags.search` == 'parent'")) == 2


@pytest.mark.slow
def test_lr_from_feeds_the_best_pair_to_a_study_and_records_where_it_came_from(searched, monkeypatch):
    from studies.run import __main__ as run

    monkeypatch.chdir(searched.tmp)
    spec, store = searched.spec, searched.store
    study = optuna.load_study(study_name=spec.name, storage=spec.storage)
    best = study.best_trial
    overrides = {**spec.overrides, "train.kimg": 0.016}
    rc = run.main(["pooling", "--variants", "baseline", "--seeds", "1", "--lr-from", spec.name, "--storage",
                   spec.storage, "--tracking-uri", store.uri, "--workdir", str(searched.tmp / "runs"), "--reports",
                   str(searched.tmp / "reports"), "--no-progress", *set_flags(overrides)])
    assert rc == 0
    runs = store.runs_frame("pooling")
    parent = runs[runs["tags.study"] == "parent"].iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]]
    assert len(children) == 1
    for _, child in children.iterrows():
        assert float(child["params.optim.lr_g"]) == best.params["lr_g"]
        assert float(child["params.optim.lr_d"]) == best.params["lr_d"]
        assert child["tags.lr_from.study"] == spec.name and int(child["tags.lr_from.trial"]) == best.number
    for source in ("params", "tags"):
        assert parent[f"{source}.lr_from.study"] == spec.name
        assert parent[f"{source}.lr_from.storage"] == spec.storage
        assert int(parent[f"{source}.lr_from.trial"]) == best.number
        assert parent[f"{source}.lr_from.metric"] == "kid"  # the search's objective, under its own name
        assert float(parent[f"{source}.lr_from.kid"]) == best.value
        assert f"{source}.lr_from.fid" not in parent
    assert str(best.params["lr_g"]) in parent["params.study.overrides"]


def test_a_pruned_trial_skips_its_final_fid_and_a_nan_final_fid_fails_the_trial(tmp_path, monkeypatch, synthetic_root,
                                                                              cache_dir, empty_store_db):
    """With a stand-in FID: trial 0 is pruned at its first report, trial 1 trains with finite losses to a NaN final
    FID, trial 2 completes. Only trial 2 can win; trial 0 never computes its final FID (24 samples)."""
    calls = install_fake_fid(monkeypatch, lambda cfg, G, n: math.nan if cfg.optim.lr_g == 1e-4 and n == 24 else g_fid(G))
    monkeypatch.chdir(tmp_path)
    spec = SearchSpec(study="nan", storage=f"sqlite:///{tmp_path / 'optuna.db'}", trials=3, evals=2,
                      trial_kimg=TRIAL_KIMG, workdir=tmp_path / "runs",
                      overrides={**tiny_overrides(synthetic_root, cache_dir), "eval.fid_final_samples": 24})
    study = optuna.create_study(study_name=spec.name, storage=spec.storage, direction="minimize")
    for lr_g in (2e-4, 1e-4, 3e-4):
        study.enqueue_trial({"lr_g": lr_g, "lr_d": 2e-4})
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number == 0)
    store = Store(f"sqlite:///{empty_store_db}")
    parent_id = run_search(spec, store)
    S = optuna.trial.TrialState
    study = optuna.load_study(study_name=spec.name, storage=spec.storage)
    assert [t.state for t in study.trials] == [S.PRUNED, S.FAIL, S.COMPLETE] and study.best_trial.number == 2
    # (seed, samples) of every FID: trial 0 one report and no final; trials 1 and 2 two reports and a final each
    assert calls == [(0, 16)] + [(0, 16), (0, 16), (0, 24)] * 2
    by_number = {int(r["tags.trial"]): r for _, r in child_runs(store, spec.experiment, parent_id).iterrows()}
    assert not math.isfinite(by_number[0]["metrics.fid/final"]) and by_number[0]["tags.state"] == "pruned"
    nan_trial = by_number[1]
    assert (nan_trial["tags.state"], nan_trial["status"], nan_trial["tags.error"]) == ("failed", "FAILED",
                                                                                      "final KID is nan")
    assert all(math.isfinite(nan_trial[f"metrics.{k}"]) for k in ("loss/d", "loss/g"))
    assert math.isnan(nan_trial["metrics.fid/final"]) and math.isnan(nan_trial.get("metrics.search/objective", math.nan))
    assert (by_number[2]["tags.state"], by_number[2]["metrics.search/objective"]) == ("complete", study.best_value)


def test_search_lr_searches_then_runs_the_study_on_the_best_pair(tmp_path, monkeypatch, synthetic_root, cache_dir,
                                                                 empty_store_db):
    """`studies.run --search-lr` for real (a one-trial search, stand-in FID), with data found through CELEBA_ROOT."""
    from studies.run import __main__ as run
    install_fake_fid(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CELEBA_ROOT", str(synthetic_root))
    overrides = {**TINY, "data.cache_dir": str(cache_dir), "data.max_images": 48}
    assert run.main(["pooling", "--preset", "quick", "--variants", "baseline", "--seeds", "1", "--search-lr",
                     "--search-trials", "1", "--no-progress", *set_flags(overrides)]) == 0
    study = optuna.load_study(study_name="lr-quick", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    store = Store(f"sqlite:///{empty_store_db}")
    search = store.runs_frame("search-lr-quick")
    assert sorted(search["tags.search"]) == ["parent", "trial"]
    runs = store.runs_frame("pooling")
    (child,) = [r for _, r in runs.iterrows() if r["tags.study"] == "child"]
    assert float(child["params.optim.lr_g"]) == trial.params["lr_g"]
    assert float(child["params.optim.lr_d"]) == trial.params["lr_d"]
    assert (child["tags.lr_from.study"], child["tags.lr_from.trial"], child["tags.lr_from.searched_now"]) == (
        "lr-quick", "0", "True")
    assert child["params.dataset.source"].startswith(f"folder:{synthetic_root}")


# ---- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["--ablation", "nope"], "unknown ablation 'nope'; known: .*pooling"),
    (["--ablation", "pooling", "--variant", "max"], "ablation 'pooling' has no variant 'max'"),
    (["--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot open Optuna storage 'postgresql://nobody@"),
    (["--storage", "journal:/nonexistent/dir/lr.journal"], "cannot open Optuna storage .*does not exist"),
    (["--lr-min", "1e-3", "--lr-max", "1e-5"], "need 0 < min < max"),
    (["--lr-min", "0"], "need 0 < min < max"),
    (["--trials", "0"], "--trials 0 must be >= 1"),
    (["--set", "optim.lr_d=1e-4"], "optim.lr_d is what the search varies"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_no_runs(tmp_path, monkeypatch, capsys, synthetic_root, cache_dir, args, message):
    monkeypatch.chdir(tmp_path)
    rc = search_main([*args, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-progress",
                      *set_flags(tiny_overrides(synthetic_root, cache_dir))])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    import re
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "runs").exists()
    if (tmp_path / "mlflow.db").exists():
        assert Store(f"sqlite:///{tmp_path / 'mlflow.db'}").find_runs("search-lr-default") == []


def test_lr_search_makes_no_sense_for_a_study_that_varies_lrs(tmp_path, monkeypatch, capsys):
    from ablations import registry
    from studies.run import __main__ as run

    class Ttur(registry.Ablation):
        name = "ttur_like"
        variants = {"baseline": {}, "fast_d": {"optim.lr_d": 4e-4}}

    monkeypatch.setitem(registry._REGISTRY, "ttur_like", Ttur)
    monkeypatch.chdir(tmp_path)
    for argv, message in [(["ttur_like", "--lr-from", "lr-default"], "LR search makes no sense for study 'ttur_like'"),
                          (["pooling", "--lr-from", "lr-default", "--set", "optim.lr_g=1e-4"], "conflicts with --lr-from"),
                          (["pooling", "--lr-from", "lr-default"], "Optuna storage 'sqlite:///optuna.db' does not exist")]:
        assert run.main(argv) == 2
        assert message in capsys.readouterr().err
    assert run.main(["ttur_like", "--search-lr"]) == 2
    assert "LR search makes no sense for study 'ttur_like'" in capsys.readouterr().err
    assert run.main(["pooling", "--search-lr", "--dry-run"]) == 0  # validates the search, runs nothing
    capsys.readouterr()
    assert search_main(["--ablation", "ttur_like", "--variant", "fast_d"]) == 2
    assert "LR search makes no sense on top of it" in capsys.readouterr().err
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "runs").exists()


# ---- the pruner, on made-up FID curves ---------------------------------------------------------------------
def test_pruner_waits_for_patience_then_compares_best_fid_with_the_median():
    study = optuna.create_study(direction="minimize", pruner=make_pruner())
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for i in range(5):  # finished trials with FID 100 at every evaluation
        study.add_trial(optuna.create_trial(params={"x": 0.5}, distributions=dist, value=100.0 + i,
                                            intermediate_values={16: 100.0, 32: 100.0, 48: 100.0}))

    def pruned_after(curve):
        trial = study.ask(dist)
        for step, value in zip((16, 32, 48), curve):
            trial.report(value, step)
        return trial.should_prune()

    assert not pruned_after([300, 200, 150])  # bad but still improving: patience holds
    assert not pruned_after([300, 400])  # worse once: not yet judged
    assert pruned_after([300, 400, 350])  # no better than its best for one evaluation, and above the median
    assert not pruned_after([90, 120, 110])  # noisy, but its best beats the median


# ---- heartbeats: a killed worker's trial is failed and retried ---------------------------------------------
HANGING_WORKER = """
import sys, time, optuna
from studies.search.storage import Heartbeat, open_storage
study = optuna.load_study(study_name="hb", storage=open_storage(sys.argv[1], Heartbeat(interval_s=1, grace_s=2)))
def objective(trial):
    trial.suggest_float("x", 0, 1)
    time.sleep(0.5)  # let the heartbeat thread write once
    print("running", flush=True)
    time.sleep(600)
study.optimize(objective, n_trials=1)
"""


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_killed_workers_trial_is_failed_by_heartbeat_and_retried(tmp_path, kind):
    url = f"sqlite:///{tmp_path / 'hb.db'}" if kind == "sqlite" else f"journal:{tmp_path / 'hb.journal'}"
    storage = open_storage(url, Heartbeat(interval_s=1, grace_s=2))
    study = optuna.create_study(study_name="hb", storage=storage)
    proc = subprocess.Popen([sys.executable, "-c", HANGING_WORKER, url], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "running"
    finally:
        proc.kill()
        proc.wait()
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.RUNNING]
    time.sleep(3)  # past the grace period
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    dead, retried = study.get_trials()
    assert dead.state == optuna.trial.TrialState.FAIL and retried.state == optuna.trial.TrialState.COMPLETE
    assert retried.params == dead.params
    assert retried.system_attrs["failed_trial"] == dead.number  # RetryHeartbeatStaleTrialCallback's mark


# ---- several workers on one study: SQLite, PostgreSQL (journal file above) ------------------------------------
def _pg_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1 in a temporary folder, stopped and deleted afterwards."""
    bindir = _pg_bindir()
    if bindir is None or not (bindir / "initdb").exists():
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl); .ci/run installs Debian's 'postgresql'")
    pytest.importorskip("psycopg2", reason="psycopg2-binary (the test extra) talks to PostgreSQL")
    root = Path(tempfile.mkdtemp(prefix="search-pg-"))  # under /tmp: pytest's tree is 0700 root, unreachable
    prefix: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        shutil.chown(root, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"] if shutil.which("runuser") else None

    def as_server_user(*cmd: str) -> None:
        full = [*prefix, *cmd] if prefix is not None else ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(cmd)]
        proc = subprocess.run(full, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{shlex.join(cmd)} failed: {proc.stdout}{proc.stderr}"

    data, port = root / "data", _free_port()
    as_server_user(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "search", "-E", "UTF8",
                   "--no-locale", "--no-sync")
    as_server_user(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
                   "-o", f"-h 127.0.0.1 -p {port} -k {root} -F", "start")
    try:
        as_server_user(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "search", "optuna")
        yield f"postgresql://search@127.0.0.1:{port}/optuna"
    finally:
        as_server_user(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory, _migrated_mlflow_db) -> str:
    """One MLflow store for the worker tests, copied from the session's migrated one (migrations cost seconds)."""
    return f"sqlite:///{shutil.copy(_migrated_mlflow_db, tmp_path_factory.mktemp('tracking') / 'mlflow.db')}"


@pytest.mark.slow
# SQLite (the default) and PostgreSQL (a cluster's). The journal file (a shared disk without a database) is
# opened by the same open_storage and tested above with a killed worker; its lock under concurrent writers is
# Optuna's JournalFileBackend's, so a third 35 s run of this test would check Optuna rather than this code.
@pytest.mark.parametrize("kind,trials", [("sqlite", 2), ("postgresql", 3)])
def test_two_workers_share_one_study_with_unique_trials_and_the_asked_total(kind, trials, tmp_path, request,
                                                                           tracking_uri, synthetic_root, cache_dir):
    # SQLite is the default, relative to the working directory
    storage = "sqlite:///optuna.db" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    env = {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "OMP_NUM_THREADS": "1"}  # two workers on two cores
    proc = subprocess.run([sys.executable, "-m", "studies.search", "--study", f"shared-{kind}", "--storage", storage,
                           "--trials", str(trials), "--workers", "2", "--evals", "0", "--trial-kimg", "0.016",
                           "--tracking-uri", tracking_uri, "--no-progress",
                           *set_flags({**tiny_overrides(synthetic_root, cache_dir), "eval.fid_final_samples": 8,
                                       "eval.fid_ref_images": 16, "eval.fid_batch": 8})],  # Inception: 5 images/s
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    url = f"sqlite:///{tmp_path / 'optuna.db'}" if kind == "sqlite" else storage
    study = optuna.load_study(study_name=f"shared-{kind}", storage=open_storage(url))
    assert sorted(t.number for t in study.trials) == list(range(trials))  # unique, and exactly as many as asked
    assert all(t.state.is_finished() for t in study.trials)
    store = Store(tracking_uri)
    runs = store.runs_frame(f"search-shared-{kind}")
    parent = runs[runs["tags.search"] == "parent"]
    (line,) = [line for line in proc.stderr.splitlines() if "; ETA " in line]  # printed, then kept on the parent
    reason = parent["tags.preset_reason"].iloc[0]
    assert line.startswith(f"preset {parent['tags.preset'].iloc[0]} ({reason}); ETA ") and reason
    assert float(parent["tags.eta.total_s"].iloc[0]) >= 0 and parent["tags.eta.runs"].iloc[0] == str(trials)
    children = child_runs(store, f"search-shared-{kind}", parent["run_id"].iloc[0])
    assert sorted(children["tags.trial"].astype(int)) == list(range(trials))
    assert set(children["tags.worker"]) == {"0", "1"}  # both workers took trials
