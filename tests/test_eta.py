"""--preset auto picks the hardware's preset; the ETA is measured, printed before training, recorded, and gates
a study longer than 12 hours behind --yes. The arithmetic is checked on made-up timings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import config as config_mod
from core.tracking import Store
from studies import eta
from studies.run.__main__ import main as run_main

REPO = Path(__file__).resolve().parents[1]


def _cfg(**layer):
    return config_mod.resolve("quick", {k.replace("__", "."): v for k, v in layer.items()})


def test_estimate_is_training_plus_every_inception_pass():
    a = _cfg(train__kimg=6.4, train__batch_size=32, eval__fid_every_kimg=3.2, eval__fid_samples=100,
             eval__fid_final_samples=200)  # 200 steps: one intermediate evaluation (3.2 kimg), none at the end
    b = _cfg(train__kimg=3.2, train__batch_size=64, eval__fid_every_kimg=0.0, eval__fid_final_samples=200)
    assert eta.evaluations(a) == 100 + 200 and eta.evaluations(b) == 200
    timings = eta.Timings({"a": 640.0, "b": 320.0}, inception_img_per_s=10.0)
    est = eta.estimate({"a": a, "b": b}, 3, timings, reference_images=500)
    assert est.runs == 6
    assert est.train_s == pytest.approx(3 * 6400 / 640 + 3 * 3200 / 320)  # 30 + 30
    assert est.eval_s == pytest.approx((3 * 300 + 3 * 200 + 500) / 10)  # 200
    assert est.total_s == pytest.approx(260.0)
    assert eta.estimate({"a": a}, 1, timings, 0).eval_s == pytest.approx(30.0)  # cached reference costs nothing
    compiled = eta.Timings({"a": 640.0, "b": 320.0}, 10.0, setup_s={"a": 7.0})  # a compiles 7 s in every run
    assert eta.estimate({"a": a, "b": b}, 3, compiled, 500).train_s == pytest.approx(60 + 3 * 7)


def test_tune_adds_its_trials_and_the_tuned_runs_to_the_study_it_follows():
    """--tune N: the searches' trials (each to its end, its own length) and the tuned study's runs, on the timings
    the plain study measured (the same models)."""
    a = _cfg(train__kimg=6.4, train__batch_size=32, eval__fid_every_kimg=0.0, eval__fid_final_samples=200)
    trial = _cfg(train__kimg=1.6, train__batch_size=32, eval__fid_every_kimg=0.0, eval__fid_final_samples=200)
    timings = eta.Timings({"a": 640.0}, inception_img_per_s=10.0)
    plain = eta.estimate({"a": a}, {"a": 1}, timings, 0, reused=2)  # 10 s training + 20 s FID, 2 runs reused
    both = plain.plus(eta.estimate({"a": trial}, {"a": 4}, timings, 0), eta.estimate({"a": a}, {"a": 3}, timings, 0))
    assert (both.runs, both.trials, both.reused) == (1 + 3, 4, 2)
    assert both.train_s == pytest.approx(10 + 4 * 2.5 + 3 * 10)
    assert both.total_s == pytest.approx(both.train_s + (1 + 4 + 3) * 20)
    assert "4 runs to train, 2 reused, 4 tuning trials" in both.line("study pooling")
    assert both.tags()["eta.trials"] == 4


def test_no_evaluation_costs_nothing_and_durations_read_well():
    assert eta.evaluations(_cfg(eval__fid_every_kimg=0.0, eval__fid_final_samples=0)) == 0
    assert [eta.format_duration(s) for s in (45, 600, 5 * 3600, 3 * 86400)] == ["45 s", "10 min", "5.0 h", "3.0 days"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without CUDA")
def test_dry_run_without_cuda_resolves_auto_to_the_cpu_preset(tmp_path):
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "studies.run", "pooling", "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0].startswith("preset cpu (no CUDA device")
    import json
    configs = json.loads(proc.stdout)["pooling"]
    cpu = config_mod.flatten(config_mod.resolve("cpu"))
    assert configs["baseline"]["model.resolution"] == cpu["model.resolution"] == 32
    assert configs["baseline"]["train.kimg"] == cpu["train.kimg"]


def test_cpu_preset_study_runs_end_to_end_with_its_eta_before_training(tmp_path, monkeypatch, synthetic_root, capsys,
                                                                      empty_store_db):
    monkeypatch.chdir(tmp_path)
    printed: list[str] = []
    real_train = eta._train_img_per_s
    monkeypatch.setattr(eta, "_train_img_per_s", lambda cfg, images, path=None: (printed.append("timed"),
                                                                                real_train(cfg, images, path=path))[1])
    code = run_main(["pooling", "--preset", "cpu", "--seeds", "1", "--data", str(synthetic_root),  # bars on
                     "--set", "train.batch_size=16",  # the preset's model on a quarter of its batch: 4x faster steps
                     "--set", "train.kimg=0.064", "--set", "eval.fid_final_samples=8", "--set", "eval.fid_ref_images=16",
                     "--set", "eval.fid_batch=8", "--set", "eval.grid_size=4", "--set", "train.device=cpu",
                     "--set", "eval.collapse_nn_ratio=0",  # 4 steps have not left the collapsed start
                     "--set", "eval.standing_batches=2",  # of 16 images each: what the test needs
                     "--set", f"data.cache_dir={tmp_path / 'cache'}",
                     # one path: measuring all of them on the preset's model would take minutes (test_fastpath.py)
                     "--set", "train.amp=fp32", "--set", "train.channels_last=off", "--set", "train.compile=off"])
    err = capsys.readouterr().err
    assert code == 0, err
    eta_at, ref_at = err.find("preset cpu (asked for with --preset); ETA "), err.find("FID reference statistics")
    run_at = err.find("baseline-s0")
    assert 0 <= eta_at < ref_at < run_at  # the ETA, then the (cold) reference with a bar of its own, then training
    eta_line = err[eta_at:].splitlines()[0]
    assert "FID on 8 samples" in err[run_at:]  # each run's final FID/KID pass has its bar too
    assert "study pooling (3 runs" in eta_line and printed == ["timed"] * 3  # every variant's model was timed
    runs = Store(f"sqlite:///{tmp_path / 'mlflow.db'}").runs_frame("pooling")
    parent = runs[runs["tags.study"] == "parent"].iloc[0]
    assert float(parent["tags.eta.total_s"]) > 0 and parent["tags.eta.runs"] == "3"
    assert parent["tags.preset"] == "cpu" and parent["tags.preset_reason"] == "asked for with --preset"
    children = runs[runs["tags.study"] == "child"]
    assert len(children) == 3 and (children["tags.outcome"] == "finished").all()
    assert set(children["params.model.width"]) == {str(config_mod.resolve("cpu").model.width)}


def test_a_study_over_12_hours_needs_yes(tmp_path, monkeypatch, synthetic_root, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(eta, "measure", lambda configs, images, progress=False: eta.Timings({k: 0.5 for k in configs},
                                                                                            0.5))
    flags = ["pooling", "--preset", "quick", "--seeds", "1", "--data", str(synthetic_root), "--no-progress",
             "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert run_main(flags) == 2  # 3 runs x 12,000 images at 0.5 img/s: 20 hours of training alone
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: preset quick (asked for with --preset); ETA ")
    assert "over 12 hours" in err[0] and "--yes" in err[0]
    assert not (tmp_path / "mlflow.db").exists()  # refused before the tracking store is opened


def test_a_study_far_over_the_limit_is_refused_from_a_probe_without_the_full_measurement(tmp_path, monkeypatch,
                                                                                         synthetic_root, capsys):
    monkeypatch.chdir(tmp_path)
    probed = []
    monkeypatch.setattr(eta, "probe", lambda configs, images: (probed.append(list(configs)),
                                                               eta.Timings({k: 0.01 for k in configs}, 1.0))[1])
    monkeypatch.setattr(eta, "measure", lambda *a, **kw: pytest.fail("measured although the probe was clear"))
    flags = ["pooling", "--preset", "default", "--seeds", "1", "--data", str(synthetic_root), "--no-progress",
             "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.device=cpu"]
    assert run_main(flags) == 2  # 3 runs x 2,000 kimg at 0.01 img/s: 19 years
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ETA roughly" in err[0] and "not measured further" in err[0] and "--yes" in err[0]
    assert probed == [["baseline", "maxpool", "avgpool"]]


def test_the_probe_times_one_small_step_and_a_few_inception_images(tiny_cfg, monkeypatch):
    from tests.helpers import images_for
    cfg = tiny_cfg(train__batch_size=16, eval__fid_batch=16)
    seen = []
    real_train, real_inception = eta._train_img_per_s, eta._inception_img_per_s
    monkeypatch.setattr(eta, "_train_img_per_s", lambda c, images, steps=eta.TIMED_STEPS, path=None: (
        seen.append((c.train.batch_size, steps, path.source)), real_train(c, images, steps, path))[1])
    monkeypatch.setattr(eta, "_inception_img_per_s", lambda c, images, batch=None: (
        seen.append(("inception", batch)), 5.0)[1])
    timings = eta.probe({"a": cfg, "b": cfg}, images_for(cfg))
    assert seen == [(eta.PROBE_BATCH, 1, "unmeasured"), ("inception", eta.PROBE_BATCH)]  # no path measured
    assert timings.train_img_per_s["a"] == timings.train_img_per_s["b"] > 0 and timings.inception_img_per_s == 5.0


def test_only_a_large_study_is_probed_first():
    quick, default = config_mod.resolve("quick"), config_mod.resolve("default")
    cpu = config_mod.resolve("cpu")
    assert not eta.worth_probing({"a": quick, "b": quick, "c": quick}, 3)
    assert not eta.worth_probing({"a": cpu, "b": cpu, "c": cpu}, 3)  # its full measurement takes seconds
    assert eta.worth_probing({"a": default}, 1)


def test_an_eta_timed_beside_other_busy_processes_says_it_errs_long():
    quiet, busy = eta.Timings({}, 1.0, other_load=0.05), eta.Timings({}, 1.0, other_load=0.6)
    assert eta.load_note([quiet, eta.Timings({}, 1.0)]) == ""  # NaN: no /proc/stat, nothing to say
    assert eta.load_note([quiet, busy]).startswith("; timed while other processes kept 60% of the CPU busy")
