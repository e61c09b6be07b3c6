"""Nothing lost, nothing half-written: kills, divergence, failure modes, bad input, concurrent studies."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from core.hooks import Hooks
from core.tracking import Store
from tests.conftest import FP32_EAGER
from tests.helpers import build, md_table, set_flags

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--preset", "quick", "--seeds", "1", "--variants", "maxpool", "--no-progress",
         "--set", "data.max_images=64", "--set", "eval.fid_every_kimg=0", "--set", "eval.fid_final_samples=0",
         "--set", "train.batch_size=8", "--set", "optim.lr_ref_batch=8", "--set", "train.kimg=2.4",
         "--set", "train.log_every_kimg=0.04", "--set", "train.checkpoint_every_kimg=0.4",
         "--set", "train.sample_every_kimg=0.8", *set_flags(FP32_EAGER)]


def study(cwd: Path, data: Path, *extra: str) -> subprocess.Popen:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(cwd), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "studies.run", "pooling", "--data", str(data), *SMALL, *extra],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def children(cwd: Path):
    runs = Store(f"sqlite:///{cwd / 'mlflow.db'}").runs_frame("pooling")
    return runs[runs["tags.study"] == "child"].sort_values("tags.variant")


def final_state(cwd: Path, run_id: str) -> dict:
    return torch.load(cwd / "runs" / "pooling" / run_id / "checkpoint.pt", weights_only=True)


# 150 steps a run, a checkpoint every 25: long enough to kill the second run mid-way, short enough to run thrice
KILLED = ["--set", "train.kimg=1.2", "--set", "train.checkpoint_every_kimg=0.2", "--set", "train.sample_every_kimg=0.4"]


@pytest.mark.slow
def test_sigkilled_study_resumes_to_the_same_result(tmp_path, synthetic_root, _migrated_mlflow_db):
    import shutil
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for cwd in (straight, killed):
        cwd.mkdir()
        shutil.copy(_migrated_mlflow_db, cwd / "mlflow.db")  # a fresh store spends seconds in migrations
    proc = study(killed, synthetic_root, *KILLED)
    deadline = time.time() + 300
    # kill during the second run (maxpool), after it wrote a checkpoint, at whatever step it has reached
    while time.time() < deadline and len(list((killed / "runs" / "pooling").glob("*/checkpoint.pt"))) < 2:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = children(killed)
    assert len(partial) == 2 and sorted(partial["status"]) == ["FINISHED", "RUNNING"]

    assert study(killed, synthetic_root, *KILLED).wait() == 0  # the same command resumes
    assert study(straight, synthetic_root, *KILLED).wait() == 0
    a, b = children(straight), children(killed)
    assert len(b) == 2 and (b["status"] == "FINISHED").all() and (b["tags.outcome"] == "finished").all()
    assert list(b["run_id"]) == list(partial.sort_values("tags.variant")["run_id"])  # same MLflow runs continued
    store_a, store_b = Store(f"sqlite:///{straight / 'mlflow.db'}"), Store(f"sqlite:///{killed / 'mlflow.db'}")
    for (_, ra), (_, rb) in zip(a.iterrows(), b.iterrows()):
        sa, sb = final_state(straight, ra["run_id"]), final_state(killed, rb["run_id"])
        assert sa["step"] == sb["step"] == 150
        for net in ("G", "D"):
            for k in sa[net]:
                assert torch.equal(sa[net][k], sb[net][k]), (net, k)  # bit-identical on CPU
        for key in ("loss/d", "loss/g"):
            steps_a = [s for s, _ in store_a.metric_history(ra["run_id"], key)]
            hist_b = store_b.metric_history(rb["run_id"], key)
            assert sorted(s for s, _ in hist_b) == sorted(steps_a)  # no gap, no duplicated step
            assert dict(hist_b) == pytest.approx(dict(store_a.metric_history(ra["run_id"], key)))
    parents = Store(f"sqlite:///{killed / 'mlflow.db'}").runs_frame("pooling")
    assert (parents["tags.study"] == "parent").sum() == 1


def test_a_diverging_run_is_tagged_and_the_study_goes_on(tmp_path, synthetic_root, monkeypatch):
    """lr_d = 1e30 blows D's weights to inf in a step or two; baseline runs must still finish."""
    from studies.run.__main__ import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    import ablations.pooling as pooling
    monkeypatch.setitem(pooling.Pooling.variants, "maxpool", {"model.d_downsample": "maxpool", "optim.lr_d": 1e30})
    args = [a if a != "train.kimg=2.4" else "train.kimg=0.32" for a in SMALL]
    args[args.index("--seeds") + 1] = "2"
    assert main(["pooling", "--data", str(synthetic_root), *args]) == 0
    runs = children(tmp_path)
    by_variant = runs.groupby("tags.variant")["tags.outcome"].apply(set).to_dict()
    assert by_variant == {"baseline": {"finished"}, "maxpool": {"diverged"}}
    assert runs[runs["tags.variant"] == "maxpool"]["tags.diverged_at_nimg"].astype(int).min() > 0
    report = (tmp_path / "reports" / "pooling.md").read_text()
    every = md_table(report, "Every run")
    for name in ("maxpool-s0", "maxpool-s1"):  # listed with their outcome, out of the test
        assert (every[name]["outcome"], every[name]["in test"], every[name]["final FID"]) == ("diverged", "no", "–")
    assert {every[f"baseline-s{s}"]["outcome"] for s in (0, 1)} == {"finished"}
    row = md_table(report, "Results per variant")["maxpool"]
    assert (row["seeds (n)"], row["finished / diverged / collapsed / d_saturated / failed"]) == ("2", "0 / 2 / 0 / 0 / 0")
    verdict = report.split("## Verdict\n", 1)[1].split("\n## ", 1)[0]
    assert "`maxpool` failed in 2 of 2 seeds (diverged 2), rate 1.00 " in verdict  # failed seeds are results
    assert row["failure rate [95% CI]"].startswith("1.00 [")


def test_d_saturation_and_collapse_are_tagged(tiny_cfg):
    class ConstantG(torch.nn.Module):  # ignores z: the extreme of mode collapse
        def __init__(self, G):
            super().__init__()
            self.G = G

        def forward(self, z):
            return self.G(torch.zeros_like(z))

    from core.hooks import Hooks

    class Collapse(Hooks):
        def on_models_built(self, G, D):
            return ConstantG(G), D

    trainer = build(tiny_cfg(eval__collapse_nn_ratio=0.25, eval__fid_ref_images=32),
                        hooks=Collapse(), with_fid=True)
    trainer.G.z_dim = 128
    assert trainer.run().status == "collapsed" and "collapsed" in trainer.failures

    saturated = build(tiny_cfg(eval__saturation_loss_d=10.0, eval__saturation_loss_g=0.0,
                                   eval__saturation_logs=2), with_fid=False)
    result = saturated.run()
    # saturated from the first log (8 images) to the end: one episode, confirmed at the 2nd log interval
    assert result.status == "d_saturated" and saturated.failures["d_saturated"] == 8
    assert result.saturation_episodes == [[8, 32]]

    healthy = build(tiny_cfg(), with_fid=False)
    assert healthy.run().status == "finished" and not healthy.failures


@pytest.mark.slow
def test_a_healthy_quick_run_on_real_faces_is_not_collapsed_and_the_same_g_drawing_one_image_is(real_celeba,
                                                                                              cache_dir):
    """The `quick` preset's whole training (12 kimg) on real CelebA, scored by the real Inception network: its
    samples spread like real images do (dc/nn_ratio well above eval.collapse_nn_ratio), although precision, recall
    and coverage are still ~0 at this size. The same trained G fed one z for every sample is collapsed."""
    from core import config as config_mod
    from core import records as rec
    from core.metrics import MetricOptions, calc_metrics
    from core.sampling import evaluated_g
    cfg = config_mod.resolve("quick", {"data.root": str(real_celeba.parent), "data.cache_dir": str(cache_dir),
                                       "train.device": "cpu", "eval.fid_every_kimg": 0.0,
                                       "eval.fid_final_samples": 64, "eval.fid_ref_images": 64})
    # 64 real images: nn_ratio compares the first min(fake, real) of each, so more would go unused
    trainer = build(cfg, with_fid=True)
    result = trainer.run()
    ratio = trainer.metric_log.series(rec.NN_RATIO_KEY)[-1][1]
    assert result.status == "finished" and not trainer.failures, (result.status, ratio)
    assert ratio > 1.5 * cfg.eval.collapse_nn_ratio  # measured 0.44-0.46: not at the threshold's edge

    class OneZ(torch.nn.Module):
        def __init__(self, G):
            super().__init__()
            self.G = G

        def forward(self, z):
            return self.G(z[:1].expand_as(z).contiguous())

    ev = trainer.evaluate
    one = calc_metrics(MetricOptions(G=OneZ(evaluated_g(cfg, trainer.G, trainer.G_ema)), z_dim=cfg.model.z_dim,
                                     num_samples=16, ref=ev.ref, extractor=ev.extractor, device=ev.device,
                                     g_mode=cfg.eval.g_mode, batch=cfg.eval.fid_batch))  # 16 copies of one image
    assert one.diagnostics[rec.NN_RATIO_KEY] < cfg.eval.collapse_nn_ratio
    assert one.score(rec.RECALL).value == 0.0  # one image has balls of radius 0: no real image inside


@pytest.mark.parametrize("args,message", [
    (["--set", "train.batch_size=2"], "too small for BatchNorm"),
    (["--set", "optim.lr_g=-1e-4"], "optim.lr_g=-0.0001 must be a positive learning rate"),
    (["--set", "optim.lr_d=0"], "optim.lr_d=0.0 must be a positive"),
    (["--set", "train.kimg=0"], "train.kimg=0.0 must be > 0"),
    (["--seeds", "-1"], "--seeds -1 must be >= 1"),
    (["--set", "model.resolution=512"], "power of two between 16 and 256"),
    (["--set", "train.kimg=lots"], "train.kimg='lots' is not a valid float"),
    (["--variants", "maxpool,median"], "no variant 'median'"),
    (["--set", "model.size=3"], "unknown config key 'model.size'"),
    (["--tracking-uri", "sqlite:////nonexistent/dir/mlflow.db"], "folder /nonexistent/dir does not exist"),
])
def test_bad_input_matrix_leaves_no_residue(tmp_path, synthetic_root, args, message, monkeypatch, capsys):
    from tests.test_study_cli import run_cli
    argv = ["pooling", "--preset", "quick", "--no-progress", "--data", str(synthetic_root), *args]
    if "--tracking-uri" in args:  # a real process: what opening a store prints
        proc = run_cli(argv, tmp_path)
        code, err = proc.returncode, proc.stderr
    else:  # refused while the configs resolve: the same command in this process (no interpreter start-up)
        from studies.run.__main__ import main
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("HOME", str(tmp_path))
        code, err = main(argv), capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    left = {p.name for p in tmp_path.iterdir()} - {".cache", ".config"}  # HOME is tmp_path: caches of libraries
    assert not left, left  # no store, no runs, no reports
    assert not list(tmp_path.rglob("*partial*"))


def test_corrupt_data_and_bad_cache_files(tmp_path, synthetic_root):
    from tests.test_study_cli import run_cli
    bad = tmp_path / "bad" / "img_align_celeba"
    bad.mkdir(parents=True)
    (bad / "000001.jpg").write_bytes(b"not a jpeg")
    proc = run_cli(["pooling", "--preset", "quick", "--no-progress", "--data", str(bad.parent)], tmp_path)
    assert proc.returncode == 2 and "none of the 1 images" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not list(tmp_path.rglob("*.npy"))


RACE = """
import os, sys, time
from pathlib import Path
import mlflow

barrier, create = Path(sys.argv[1]), mlflow.MlflowClient.create_experiment


def create_together(self, name, *args, **kwargs):
    # Both studies found no experiment '{name}': create it at the same moment, so one of them loses the race.
    (barrier / f"ready-{os.getpid()}").touch()
    deadline = time.time() + 120
    while len(list(barrier.glob("ready-*"))) < 2 and time.time() < deadline:
        time.sleep(0.01)
    try:
        return create(self, name, *args, **kwargs)
    except Exception:
        (barrier / f"lost-{os.getpid()}").touch()
        raise


mlflow.MlflowClient.create_experiment = create_together
from studies.run.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


def test_two_studies_started_at_once_on_one_experiment_of_one_store(tmp_path, synthetic_root, empty_store_db):
    """Two pooling studies (other variants, so two studies) in one SQLite file, both creating experiment
    'pooling' at the same moment: the loser of that race takes the winner's experiment, and every write lands."""
    args = [a if a != "train.kimg=2.4" else "train.kimg=0.16" for a in SMALL if a not in ("--variants", "maxpool")]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(barrier), "pooling", "--variants", variant, "--data",
                               str(synthetic_root), *args], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
             for variant in ("maxpool", "avgpool")]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
    assert len(list(barrier.glob("ready-*"))) == 2 and len(list(barrier.glob("lost-*"))) == 1  # the race happened
    store = Store(f"sqlite:///{empty_store_db}")
    assert [e.name for e in store.client.search_experiments() if e.name != "Default"] == ["pooling"]
    runs = store.runs_frame("pooling")
    parents = runs[runs["tags.study"] == "parent"]
    assert len(parents) == 2 and (parents["status"] == "FINISHED").all()
    for variant in ("maxpool", "avgpool"):
        (parent,) = parents[parents["tags.variants"] == f"baseline,{variant}"]["run_id"]
        kids = runs[runs["tags.mlflow.parentRunId"] == parent]
        assert sorted(kids["tags.variant"]) == sorted(["baseline", variant]) and (kids["status"] == "FINISHED").all()
        for run_id in kids["run_id"]:  # every log interval of every run arrived: 0.16 kimg / 0.04 kimg
            assert [s for s, _ in store.metric_history(run_id, "loss/d")] == [40, 80, 120, 160]


class HoldTheLock(Hooks):
    """At its step, holds an exclusive transaction on the SQLite store from another connection for hold_s."""

    def __init__(self, db: Path, at_step: int, hold_s: float):
        self.db, self.at_step, self.hold_s, self.held = db, at_step, hold_s, threading.Event()

    def d_targets(self, step, real, fake):
        if step == self.at_step and not self.held.is_set():
            locked = threading.Event()

            def hold():
                con = sqlite3.connect(self.db, timeout=30, isolation_level=None)
                con.execute("BEGIN EXCLUSIVE")
                locked.set()
                threading.Event().wait(self.hold_s)
                con.execute("COMMIT")
                con.close()
                self.held.set()

            threading.Thread(target=hold, daemon=True).start()
            assert locked.wait(30)
        return real, fake


def test_a_study_writing_through_a_locked_sqlite_store_retries_and_loses_nothing(tmp_path, monkeypatch, request,
                                                                                synthetic_root, empty_store_db):
    """Another connection holds the database for longer than the busy timeout while the study logs: MLflow's
    calls fail with 'database is locked', core.tracking retries them, and every metric still arrives.

    MLflow sets SQLite's busy timeout to 20 s in every session (PRAGMA busy_timeout = 20000); this test cuts it
    to 0.2 s by rewriting that statement, so that a 1 s lock outlasts it.
    """
    import re

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    import ablations.pooling as pooling
    import core.tracking as tracking
    from studies.run.__main__ import main

    rewritten = []

    def short_busy_timeout(conn, cursor, statement, parameters, context, executemany):
        shorter = re.sub(r"busy_timeout\s*=\s*\d+", "busy_timeout = 200", statement)
        rewritten.append(shorter != statement)
        return shorter, parameters

    event.listen(Engine, "before_cursor_execute", short_busy_timeout, retval=True)
    request.addfinalizer(lambda: event.remove(Engine, "before_cursor_execute", short_busy_timeout))
    errors = []
    retry = tracking._retry

    def recording_retry(fn, *args, **kwargs):
        def call(*a, **k):
            try:
                return fn(*a, **k)
            except Exception as exc:
                errors.append(str(exc))
                raise
        return retry(call, *args, **kwargs)

    monkeypatch.setattr(tracking, "_retry", recording_retry)
    hook = HoldTheLock(empty_store_db, at_step=1, hold_s=1.0)
    monkeypatch.setattr(pooling.Pooling, "hooks", lambda self, variant: [hook], raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    args = [a for a in SMALL if a not in ("--variants", "maxpool")]
    args = [{"train.kimg=2.4": "train.kimg=0.032", "train.log_every_kimg=0.04": "train.log_every_kimg=0.008"}.get(a, a)
            for a in args]
    assert main(["pooling", "--variants", "baseline", "--data", str(synthetic_root), *args]) == 0
    assert any(rewritten) and hook.held.is_set() and any("database is locked" in e for e in errors), errors
    store = Store(f"sqlite:///{empty_store_db}")
    runs = store.runs_frame("pooling")
    (run_id,) = runs[runs["tags.study"] == "child"]["run_id"]
    assert runs.set_index("run_id").loc[run_id, "tags.outcome"] == "finished"
    for key in ("loss/d", "loss/g", "d/real", "d/fake"):
        assert [s for s, _ in store.metric_history(run_id, key)] == [8, 16, 24, 32], key
