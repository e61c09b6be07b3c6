"""A study around its runs: a crash, kills before and after a checkpoint, --fresh, a finished study run again,
studies.report --parent, several failure modes in one run, a NaN final FID, and data found without --data.

Each test drives `python -m studies.run` in-process (its `main`) on runs of a few tiny steps, with a stand-in
FID (tests/helpers.py) where the test is about what happens around FID rather than FID itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ablations import Ablation, registry
from core.hooks import Hooks
from core.tracking import Store
from core.trainer import Trainer
from studies.report.__main__ import main as report_main
from studies.run.__main__ import main
from tests.conftest import TINY
from tests.helpers import g_fid, git_head, install_fake_fid, md_table

LOSSES = ("loss/d", "loss/g", "d/real", "d/fake")


def flags(cache_dir: Path, seeds: int = 1, **sets) -> list[str]:
    """TINY runs (4 steps of 8 images, a log every step), no FID unless a test sets eval.fid_final_samples."""
    merged = {**TINY, "data.max_images": 48, "data.cache_dir": str(cache_dir), "eval.fid_final_samples": 0,
              **{k.replace("__", "."): v for k, v in sets.items()}}
    return ["--seeds", str(seeds), "--no-progress", *[a for k, v in merged.items() for a in ("--set", f"{k}={v}")]]


@pytest.fixture
def in_dir(tmp_path, monkeypatch, _migrated_mlflow_db):
    """in_dir(name) -> a working directory with an empty, migrated ./mlflow.db, made the current one."""
    import shutil

    def enter(name: str = "") -> Path:
        cwd = tmp_path / name
        cwd.mkdir(exist_ok=True)
        shutil.copy(_migrated_mlflow_db, cwd / "mlflow.db")
        monkeypatch.chdir(cwd)
        monkeypatch.setenv("HOME", str(cwd))
        return cwd
    return enter


def runs_of(cwd: Path, experiment: str):
    """(parents, children) DataFrames of the study store in cwd, children by run name."""
    runs = Store(f"sqlite:///{cwd / 'mlflow.db'}").runs_frame(experiment)
    parents = runs[runs["tags.study"] == "parent"].sort_values("start_time")
    return parents, runs[runs["tags.study"] == "child"].set_index("tags.mlflow.runName")


def register(monkeypatch, cls: type[Ablation]) -> None:
    monkeypatch.setitem(registry._REGISTRY, cls.name, cls)


def test_reading_a_store_leaves_the_default_store_of_the_next_command_alone(in_dir, tmp_path, _migrated_mlflow_db):
    """Store.runs_frame goes through MLflow's global URI; it must not leave it behind in MLFLOW_TRACKING_URI,
    where the next Store() of the process (a second study, a test) would take it for the user's choice."""
    import os
    import shutil
    cwd = in_dir()
    other = Store(f"sqlite:///{shutil.copy(_migrated_mlflow_db, tmp_path / 'other.db')}")
    other.start_run("elsewhere", "r", {}).finish()
    assert len(other.runs_frame("elsewhere")) == 1
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert Store().uri == f"sqlite:///{cwd / 'mlflow.db'}"


# ---- a crash ------------------------------------------------------------------------------------------------
class Boom(Hooks):
    def d_targets(self, step, real, fake):
        if step == 2:
            raise RuntimeError("boom at step 2")
        return real, fake


class CrashCheck(Ablation):
    """Test-only: the middle variant crashes in its third step; the variants before and after it must run."""
    name = "crashcheck"
    variants = {"baseline": {}, "boom": {"train.real_label": 0.95}, "after": {"train.real_label": 0.9}}

    def hooks(self, variant):
        return [Boom()] if variant == "boom" else []


def test_a_crashing_run_is_recorded_failed_with_its_error_and_the_study_goes_on(in_dir, monkeypatch, synthetic_root,
                                                                               cache_dir):
    """Also the default data search: no --data, CELEBA_ROOT names the images."""
    register(monkeypatch, CrashCheck)
    monkeypatch.setenv("CELEBA_ROOT", str(synthetic_root))
    cwd = in_dir()
    assert main(["crashcheck", *flags(cache_dir)]) == 0
    parents, kids = runs_of(cwd, "crashcheck")
    assert list(parents["status"]) == ["FINISHED"]
    assert (kids.loc["boom-s0", "status"], kids.loc["boom-s0", "tags.outcome"]) == ("FAILED", "failed")
    assert kids.loc["boom-s0", "tags.error"] == "RuntimeError: boom at step 2"
    store = Store(f"sqlite:///{cwd / 'mlflow.db'}")
    trace = store.download(kids.loc["boom-s0", "run_id"], "error.txt", cwd / "dl").read_text()
    assert "Traceback" in trace and "in d_targets" in trace and "boom at step 2" in trace
    for name in ("baseline-s0", "after-s0"):  # before and after the crash
        assert (kids.loc[name, "status"], kids.loc[name, "tags.outcome"]) == ("FINISHED", "finished")
        assert [s for s, _ in store.metric_history(kids.loc[name, "run_id"], "loss/d")] == [8, 16, 24, 32]
    assert set(kids["params.dataset.source"]) == {f"folder:{synthetic_root / 'img_align_celeba'} (48 files)"}
    report = (cwd / "reports" / "crashcheck.md").read_text()
    every = md_table(report, "Every run")
    assert (every["boom-s0"]["outcome"], every["boom-s0"]["in test"]) == ("failed", "no")
    assert every["after-s0"]["outcome"] == "finished"
    outcomes = "finished / diverged / collapsed / d_saturated / failed"
    assert md_table(report, "Results per variant")["boom"][outcomes] == "0 / 0 / 0 / 0 / 1"  # a result: it failed


# ---- --fresh, a finished study run again, studies.report --parent -------------------------------------------
def test_fresh_starts_a_new_study_a_finished_one_is_not_trained_again_and_report_parent_picks_one(
        in_dir, monkeypatch, synthetic_root, cache_dir):
    import studies.run.study as study_mod
    trained = []
    execute = study_mod.execute_run
    monkeypatch.setattr(study_mod, "execute_run", lambda cfg, *a, **k: (trained.append(cfg), execute(cfg, *a, **k))[1])
    cwd = in_dir()
    args = ["pooling", "--variants", "maxpool", "--data", str(synthetic_root), *flags(cache_dir)]
    assert main(args) == 0 and len(trained) == 2
    parents, kids = runs_of(cwd, "pooling")
    (first,), ended = parents["run_id"], parents["end_time"].iloc[0]

    assert main(args) == 0  # finished: nothing trains, nothing is reopened
    parents, again = runs_of(cwd, "pooling")
    assert len(trained) == 2 and list(parents["run_id"]) == [first] and sorted(again["run_id"]) == sorted(kids["run_id"])
    assert list(parents["status"]) == ["FINISHED"] and parents["end_time"].iloc[0] == ended

    assert main([*args, "--fresh", "--no-reuse"]) == 0  # a new study: a new parent run and new child runs, trained
    parents, both = runs_of(cwd, "pooling")
    assert len(trained) == 4 and len(parents) == 2 and parents["run_id"].iloc[0] == first
    second = parents["run_id"].iloc[1]
    fresh_kids = both[both["tags.mlflow.parentRunId"] == second]
    assert sorted(fresh_kids.index) == ["baseline-s0", "maxpool-s0"] and (fresh_kids["status"] == "FINISHED").all()
    assert not set(fresh_kids["run_id"]) & set(kids["run_id"])

    for parent, kid_ids, out in ((first, kids["run_id"], "r-first"), (None, fresh_kids["run_id"], "r-latest")):
        argv = ["pooling", "--reports", str(cwd / out)] + (["--parent", parent] if parent else [])
        assert report_main(argv) == 0
        text = (cwd / out / "pooling.md").read_text()
        assert f"study run `{parent or second}`" in text
        shown = {row["MLflow run id"].strip("`") for row in md_table(text, "Every run").values()}
        assert shown == set(kid_ids)


# ---- kills --------------------------------------------------------------------------------------------------
def histories(cwd: Path, run_id: str, keys) -> dict[str, list[tuple[int, float]]]:
    store = Store(f"sqlite:///{cwd / 'mlflow.db'}")
    return {k: sorted(store.metric_history(run_id, k)) for k in keys}


def final_checkpoint(cwd: Path, experiment: str, run_id: str) -> dict:
    return torch.load(cwd / "runs" / experiment / run_id / "checkpoint.pt", weights_only=True)


def assert_same_runs(straight: Path, killed: Path, experiment: str, keys) -> None:
    """Every child of the killed-and-resumed study ended as its uninterrupted twin: curves, weights, FID history."""
    a, b = runs_of(straight, experiment)[1], runs_of(killed, experiment)[1]
    assert sorted(a.index) == sorted(b.index) and (b["status"] == "FINISHED").all()
    for name in a.index:
        ha, hb = histories(straight, a.loc[name, "run_id"], keys), histories(killed, b.loc[name, "run_id"], keys)
        for key in keys:  # the same steps once each, and the same values (exact on a CPU)
            assert hb[key] == ha[key], (name, key)
        sa = final_checkpoint(straight, experiment, a.loc[name, "run_id"])
        sb = final_checkpoint(killed, experiment, b.loc[name, "run_id"])
        for net in ("G", "D"):
            for k in sa[net]:
                assert torch.equal(sa[net][k], sb[net][k]), (name, net, k)
        # the one record of logged metrics (FID and KID evaluations included)
        assert without_timing(sb["metrics"]) == without_timing(sa["metrics"])


def without_timing(history: dict) -> dict:
    """A checkpoint's metric history without the wall-clock rates (perf/*), which no two runs share."""
    return {k: v for k, v in history.items() if not k.startswith("perf/")}


def test_a_kill_before_the_first_checkpoint_restarts_that_run_in_the_same_mlflow_run(in_dir, monkeypatch,
                                                                                     synthetic_root, cache_dir):
    args = ["pooling", "--variants", "maxpool", "--data", str(synthetic_root), *flags(cache_dir)]
    straight = in_dir("straight")
    assert main(args) == 0

    killed = in_dir("killed")
    step = Trainer.train_step
    kills = []

    def die_in_the_second_step(self):  # the first log (8 images) is in MLflow; the first checkpoint (16) is not
        if self.step == 1 and self.tracker.run_id and not kills:  # a tracked run, not the ETA's timed steps
            kills.append(self.tracker.run_id)
            raise KeyboardInterrupt
        step(self)

    monkeypatch.setattr(Trainer, "train_step", die_in_the_second_step)
    assert main(args) == 130
    parents, kids = runs_of(killed, "pooling")
    assert list(parents["status"]) == ["KILLED"] and list(kids.index) == ["baseline-s0"]
    assert kids.loc["baseline-s0", "status"] == "KILLED" and kids.loc["baseline-s0", "run_id"] == kills[0]
    assert not list((killed / "runs").rglob("checkpoint.pt"))
    assert histories(killed, kills[0], ["loss/d"])["loss/d"] == histories(straight, runs_of(
        straight, "pooling")[1].loc["baseline-s0", "run_id"], ["loss/d"])["loss/d"][:1]

    assert main(args) == 0  # the same command: that run restarts from scratch in its own MLflow run
    parents, kids = runs_of(killed, "pooling")
    assert list(parents["status"]) == ["FINISHED"] and kids.loc["baseline-s0", "run_id"] == kills[0]
    assert_same_runs(straight, killed, "pooling", LOSSES)


class NoisyLabels(Hooks):
    """Noisy D targets drawn from torch's global RNG: a resume that does not restore it draws other noise."""

    def d_targets(self, step, real, fake):
        return real - 0.2 * torch.rand(real.shape), fake + 0.2 * torch.rand(fake.shape)


class ResumeCheck(Ablation):
    """Test-only: the plain configuration under a hook that draws from torch's global RNG at every D step."""
    name = "resumecheck"
    variants = {"baseline": {}}

    def hooks(self, variant):
        return [NoisyLabels()]


def test_a_kill_between_two_logs_resumes_exactly_with_fid_history_best_and_rng(in_dir, monkeypatch, synthetic_root,
                                                                              cache_dir):
    """Logs and FIDs every 2 steps, checkpoints every 3: killed right after the checkpoint at step 3, the run
    resumes with the loss sums since step 2, the FID at step 2 (its best) and torch's RNG state."""
    register(monkeypatch, ResumeCheck)
    install_fake_fid(monkeypatch)
    sets = dict(train__kimg=0.048, train__log_every_kimg=0.016, train__checkpoint_every_kimg=0.024,
                train__sample_every_kimg=0.024, eval__fid_every_kimg=0.016, eval__fid_final_samples=16)
    args = ["resumecheck", "--data", str(synthetic_root), *flags(cache_dir, **sets)]
    straight = in_dir("straight")
    assert main(args) == 0
    (run_id,) = runs_of(straight, "resumecheck")[1]["run_id"]
    fids = final_checkpoint(straight, "resumecheck", run_id)["metrics"]["fid/fid16"]
    assert [n for n, _ in fids] == [16, 32, 48]
    assert min(v for _, v in fids) == fids[0][1] < fids[-1][1]  # the best FID is from before the kill

    killed = in_dir("killed")
    save = Trainer.save_checkpoint
    kills = []

    def die_after_the_checkpoint(self):
        path = save(self)
        if self.step == 3 and self.tracker.run_id and not kills:
            kills.append(self.step)
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", die_after_the_checkpoint)
    assert main(args) == 130 and kills == [3]
    assert main(args) == 0
    keys = [*LOSSES, "fid/fid16", "fid/final", "fid/best"]
    assert_same_runs(straight, killed, "resumecheck", keys)
    best = histories(killed, runs_of(killed, "resumecheck")[1]["run_id"].iloc[0], ["fid/best"])["fid/best"]
    assert best == [(48, fids[0][1])]


# ---- outcomes ------------------------------------------------------------------------------------------------
def test_several_failure_modes_in_one_run_are_all_tagged_and_the_first_names_it(in_dir, monkeypatch, synthetic_root,
                                                                               cache_dir):
    """D saturated from the first log (8 images) to the end, and the final features collapsed (32): both recorded."""
    install_fake_fid(monkeypatch, nn_ratio=0.01)
    cwd = in_dir()
    sets = dict(eval__saturation_loss_d=10.0, eval__saturation_loss_g=0.0, eval__saturation_logs=2,
                eval__collapse_nn_ratio=0.25, eval__fid_final_samples=16)
    assert main(["baseline", "--data", str(synthetic_root), *flags(cache_dir, **sets)]) == 0
    run = runs_of(cwd, "baseline")[1].loc["baseline-s0"]
    assert (run["status"], run["tags.outcome"]) == ("FINISHED", "d_saturated")
    assert (run["tags.d_saturated_at_nimg"], run["tags.collapsed_at_nimg"]) == ("8", "32")
    every = md_table((cwd / "reports" / "baseline.md").read_text(), "Every run")
    assert (every["baseline-s0"]["outcome"], every["baseline-s0"]["in test"]) == ("d_saturated", "no")
    assert every["baseline-s0"]["D saturated"] == "0.008-0.032 kimg"


def test_a_nan_final_fid_with_finite_losses_is_recorded_and_kept_out_of_the_mean(in_dir, monkeypatch, synthetic_root,
                                                                                 cache_dir):
    """Seed 1 ends with NaN FID and KID (the stand-in's KID follows its FID) and finite losses: recorded as such,
    listed, and kept out of the test on the primary metric (KID on 16 samples), which only seed 0 enters."""
    install_fake_fid(monkeypatch, lambda cfg, G, n: math.nan if cfg.train.seed == 1 else g_fid(G))
    cwd = in_dir()
    assert main(["baseline", "--data", str(synthetic_root), *flags(cache_dir, seeds=2, eval__fid_final_samples=16)]) == 0
    kids = runs_of(cwd, "baseline")[1]
    assert math.isnan(kids.loc["baseline-s1", "metrics.fid/final"]) and math.isnan(kids.loc["baseline-s1", "metrics.kid/final"])
    assert all(math.isfinite(kids.loc["baseline-s1", f"metrics.{k}"]) for k in LOSSES)
    good = kids.loc["baseline-s0", "metrics.kid/final"]
    assert math.isfinite(good) and kids.loc["baseline-s0", "params.derived.primary_metric"] == "kid"
    report = (cwd / "reports" / "baseline.md").read_text()
    every = md_table(report, "Every run")
    assert (every["baseline-s1"]["in test"], every["baseline-s1"]["final FID"]) == ("no", "–")
    assert every["baseline-s0"]["in test"] == "yes"
    row = md_table(report, "Results per variant")["baseline"]
    assert row["seeds (n)"] == "2" and row["final KID (mean ± sd)"] == f"{good:.4g} (1 seed)"


def test_provenance_names_the_commit_and_the_package_versions_it_can_know():
    from importlib.metadata import version

    from studies.run.provenance import PACKAGES, provenance
    tags = provenance()
    assert tags["env.git_commit"] == git_head() and tags["env.git_dirty"] in ("true", "false", "unknown")
    if git_head() != "unknown":
        assert tags["env.git_dirty"] in ("true", "false")
    assert tags["env.torch"] == torch.__version__  # with its build suffix
    for package in PACKAGES:
        if package != "torch":
            assert tags[f"env.{package}"] == version(package), package
    assert tags["env.command"] and tags["env.python"] and tags["env.cpu_count"] != "0"


def test_only_an_edit_of_the_code_makes_a_study_dirty_not_the_reports_it_rewrites(tmp_path, monkeypatch):
    import subprocess

    from studies.run import provenance as prov
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    for path in ("core/models.py", "reports/pooling.md", "README.md"):
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text("one\n")
    subprocess.run([*git[:3], "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    monkeypatch.setattr(prov, "REPO", tmp_path)
    (tmp_path / "reports/pooling.md").write_text("rewritten by a study\n")
    (tmp_path / "mlflow.db").write_text("")
    assert prov.provenance()["env.git_dirty"] == "false"
    (tmp_path / "core/models.py").write_text("edited\n")
    assert prov.provenance()["env.git_dirty"] == "true"


# ---- one vocabulary ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,says", [("kid/final", "no run records `metrics.kid/final` although 2 should"),
                                      ("loss/d", "no run records `metrics.loss/d` although 2 trained to the end")])
def test_a_key_renamed_on_the_writing_side_only_fails_the_report_loudly(key, says, in_dir, monkeypatch, synthetic_root,
                                                                        cache_dir, capsys):
    """A key logged under another name (the writer renamed, the reader not): the study's runs are all in MLflow,
    and the report refuses with one line naming the key instead of a table of blanks (the final KID, the primary
    metric) or blank curves (D's loss)."""
    from core.tracking import RunTracker
    install_fake_fid(monkeypatch)
    write = RunTracker.log_metrics

    def renamed(self, metrics, step):
        write(self, {(f"{key}_renamed" if k == key else k): v for k, v in metrics.items()}, step)

    monkeypatch.setattr(RunTracker, "log_metrics", renamed)
    cwd = in_dir()
    assert main(["baseline", "--data", str(synthetic_root), *flags(cache_dir, seeds=2, eval__fid_final_samples=16)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {says}"), err[-1]
    kids = runs_of(cwd, "baseline")[1]
    assert list(kids["tags.outcome"]) == ["finished", "finished"] and kids[f"metrics.{key}_renamed"].notna().all()
    assert not (cwd / "reports" / "baseline.md").exists()
    assert report_main(["baseline", "--reports", str(cwd / "reports")]) == 2


def test_every_run_logs_the_system_metrics_of_the_machine_it_ran_on(in_dir, monkeypatch, synthetic_root, cache_dir):
    import socket
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")  # a TINY run lasts about a second
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # as a worker on GPU 3 would have it
    cwd = in_dir()
    assert main(["baseline", "--data", str(synthetic_root), *flags(cache_dir)]) == 0
    _, kids = runs_of(cwd, "baseline")
    run = kids.loc["baseline-s0"]
    node = socket.gethostname().split(".")[0]
    assert (run["tags.system.node"], run["tags.system.gpu"]) == (node, "3")
    store = Store(f"sqlite:///{cwd / 'mlflow.db'}")
    for key in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
        history = store.metric_history(run["run_id"], f"system/{node}/{key}")
        assert history and all(v >= 0 for _, v in history), key
