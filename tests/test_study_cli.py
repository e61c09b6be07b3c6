"""`python -m studies.run` end to end in a temporary directory, and its one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FP32_EAGER
from tests.helpers import set_flags

REPO = Path(__file__).resolve().parents[1]
FAST = ["--set", "train.kimg=0.32", "--set", "train.log_every_kimg=0.16", "--set", "eval.fid_every_kimg=0",
        "--set", "eval.fid_final_samples=8", "--set", "eval.fid_ref_images=16", "--set", "eval.fid_batch=8",
        "--set", "data.max_images=64", "--set", "eval.collapse_nn_ratio=0",  # 10 steps: still the collapsed start
        *set_flags(FP32_EAGER), "--no-progress"]  # 6 x 8 generated + 16 real + the ETA's 8 through Inception


def run_cli(args, cwd, module="studies.run"):
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(cwd), "OMP_NUM_THREADS": "1"}  # one thread per xdist worker
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_quick_pooling_study_end_to_end(tmp_path, synthetic_root, real_celeba, empty_store_db):
    proc = run_cli(["pooling", "--preset", "quick", "--seeds", "2", "--data", str(real_celeba.parent), *FAST], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from core.tracking import Store
    store = Store(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the default store, in the working directory
    runs = store.runs_frame("pooling")
    parents = runs[runs["tags.study"] == "parent"]
    children = runs[runs["tags.mlflow.parentRunId"] == parents["run_id"].iloc[0]]
    assert len(parents) == 1 and len(children) == 3 * 2
    assert sorted(zip(children["tags.variant"], children["tags.seed"])) == [
        (v, s) for v in ("avgpool", "baseline", "maxpool") for s in ("0", "1")]
    assert (children["status"] == "FINISHED").all() and (children["tags.outcome"] == "finished").all()
    assert set(children["params.model.d_downsample"]) == {"stride", "maxpool", "avgpool"}
    assert "fid_reference" in {a.path for a in store.client.list_artifacts(parents["run_id"].iloc[0])}

    report = (tmp_path / "reports/pooling.md").read_text()
    for _, row in children.iterrows():  # every run's final FID and KID, as MLflow holds them, are in the report
        assert f"{row['metrics.fid/final']:.4g}" in report and row["run_id"] in report
        assert f"{row['metrics.kid/final']:.4g} ± {row['metrics.kid/final_std']:.2g}" in report
    for variant in ("baseline", "maxpool", "avgpool"):
        assert (tmp_path / f"reports/pooling/samples-{variant}.png").is_file()
        assert f"(pooling/samples-{variant}.png)" in report


@pytest.mark.parametrize("args,message", [
    (["nope"], "unknown ablation 'nope'; known: .*pooling"),
    (["pooling", "--data", "/nonexistent/celeba"], "no CelebA images found \\(looked in /nonexistent/celeba\\)"),
    (["pooling", "--tracking-uri", "postgresql://nobody@127.0.0.1:1/none"], "cannot open MLflow tracking store"),
    (["pooling", "--preset", "huge"], "unknown preset 'huge'"),
    (["pooling", "--set", "model.resolution=48"], "power of two between 16 and 256"),
    (["pooling", "--set", "model.d_downsample=maxpool"], "varied by 'pooling'"),
    (["pooling", "--seeds", "0"], "--seeds 0 must be >= 1"),
    (["label_smoothing", "--base", "loss=hinge"], "train.loss=hinge has margins, not targets"),
    (["pooling", "--base", "loss=hinge", "--base", "loss=lsgan"], "sets train.loss, which another --base already sets"),
    (["leaky_bn", "--base", "spectral_norm=sn_no_bn"], "model.d_sn_keep_bn=false removes D's BatchNorm"),
    (["pooling", "--set", "train.augment=cutmix"], "train.augment='cutmix' is not one of: none, xflip, diffaug"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, synthetic_root, args, message, monkeypatch, capsys):
    data = [] if "--data" in args else ["--data", str(synthetic_root)]  # only the data case lacks data
    argv = [*args, *data, "--no-progress", *([] if "--preset" in args else ["--preset", "quick"])]
    if "--data" in args or "--tracking-uri" in args:  # what a real process prints while it opens data or a store
        proc = run_cli(argv, tmp_path)
        code, err = proc.returncode, proc.stderr
    else:  # refused before any of that: the same command in this process (no interpreter start-up)
        from studies.run.__main__ import main
        monkeypatch.chdir(tmp_path)
        code, err = main(argv), capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    import re
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "runs").exists()


def test_list_and_dry_run(tmp_path):
    proc = run_cli(["--list"], tmp_path)
    assert proc.returncode == 0 and "pooling" in proc.stdout and "maxpool" in proc.stdout
    proc = run_cli(["pooling", "--preset", "quick", "--dry-run"], tmp_path)
    assert proc.returncode == 0 and '"model.d_downsample": "avgpool"' in proc.stdout
    assert not (tmp_path / "mlflow.db").exists()


NO_FID = ["--set", "train.kimg=0.128", "--set", "train.log_every_kimg=0.064", "--set", "eval.fid_every_kimg=0",
          "--set", "eval.fid_final_samples=0", "--set", "data.max_images=64", "--no-progress"]


def skip_timed_steps(monkeypatch) -> None:
    """The ETA's timed training steps of every variant stand in at 1,000 img/s: tests/test_eta.py times them for
    real; here they would only add a build and four steps per variant."""
    from studies import eta
    monkeypatch.setattr(eta, "_train_img_per_s", lambda cfg, images, path=None: (1000.0, 0.0))


@pytest.fixture(scope="module")
def every_study(tmp_path_factory, synthetic_root, _migrated_mlflow_db):
    """`python -m studies.run all` (and the baseline study) once, in-process (no interpreter start-up), without FID, 4 steps a run, on an
    already migrated ./mlflow.db: every study of the registry in one store, shared by the tests that read it."""
    import shutil

    from core.tracking import Store
    from studies.run.__main__ import main
    cwd = tmp_path_factory.mktemp("all")
    shutil.copy(_migrated_mlflow_db, cwd / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setenv("HOME", str(cwd))
        skip_timed_steps(mp)
        for name in ("all", "baseline"):  # 'all' leaves out the baseline-only study, which every study contains
            assert main([name, "--preset", "quick", "--seeds", "1", "--data", str(synthetic_root), *NO_FID]) == 0
    return cwd, Store(f"sqlite:///{cwd / 'mlflow.db'}")


@pytest.mark.parametrize("name", [n for n in __import__("ablations").list_ablations() if n != "combine"])
def test_every_study_runs_quick_with_the_right_runs(name, every_study):  # combine: tests/test_combine.py
    from ablations import get_ablation
    from studies.run.study import StudySpec, left_out, resolve_configs
    cwd, store = every_study
    runs = store.runs_frame(name)
    children = runs[runs["tags.study"] == "child"]
    spec = StudySpec(ablation=name, preset="quick")  # batch_32 is the quick preset's own batch: left out
    assert sorted(children["tags.variant"]) == sorted(set(get_ablation(name).variants) - set(left_out(spec, resolve_configs(spec))))
    assert (children["tags.outcome"] == "finished").all() and (children["status"] == "FINISHED").all()
    for _, run in children.iterrows():  # each run really carries its variant's settings
        for key, value in get_ablation(name).overrides(run["tags.variant"]).items():
            assert run[f"params.{key}"] == str(value)
    assert (runs["tags.study"] == "parent").sum() == 1 and (cwd / "reports" / f"{name}.md").is_file()


def test_all_resolves_every_study_and_base_is_recorded(tmp_path, synthetic_root, monkeypatch, empty_store_db):
    from ablations import list_ablations
    from core.tracking import Store
    from studies.run.__main__ import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    skip_timed_steps(monkeypatch)
    assert main(["all", "--preset", "quick", "--dry-run"]) == 0
    assert main(["pooling", "--preset", "quick", "--seeds", "1", "--base", "ttur=ttur", "--variants", "maxpool",
                 "--data", str(synthetic_root), *NO_FID]) == 0
    runs = Store().runs_frame("pooling@ttur=ttur")
    children = runs[runs["tags.study"] == "child"]
    assert sorted(children["tags.variant"]) == ["baseline", "maxpool"]
    assert set(children["tags.base"]) == {"ttur=ttur"} and set(children["params.optim.lr_d"]) == {"0.0004"}
    assert "ttur=ttur" in (tmp_path / "reports" / "pooling@ttur=ttur.md").read_text()
    assert len(list_ablations()) >= 8
