"""`--smoke`: every variant trains, checkpoints, resumes, samples and scores on this device, and nothing is kept."""

from __future__ import annotations

import torch

from core.data import load_images
from core.hooks import Hooks
from studies.preflight import SMOKE_STEPS, check_variant, preflight, smoke_config
from studies.run.__main__ import main as run_main
from studies.search.__main__ import main as search_main

TINY_FLAGS = ["--set", "model.width=0.125", "--set", "train.batch_size=8", "--set", "optim.lr_ref_batch=8",
              "--set", "eval.fid_batch=16", "--set", "eval.grid_size=4", "--set", "data.max_images=48",
              "--set", "train.device=cpu", "--no-progress"]


def test_run_smoke_checks_every_variant_and_writes_nothing(tmp_path, monkeypatch, synthetic_root, capsys):
    monkeypatch.chdir(tmp_path)
    code = run_main(["pooling", "--smoke", "--preset", "quick", "--data", str(synthetic_root), *TINY_FLAGS,
                     "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = [line for line in out.splitlines() if line.startswith(("ok", "FAIL"))]
    assert [line.split()[:2] for line in lines] == [["ok", "baseline"], ["ok", "maxpool"], ["ok", "avgpool"]]
    assert all(float(line.split()[2]) > 0 for line in lines)  # img/s measured
    assert "3 of 3 variants passed" in out
    # no tracking store, no run folders, no report: the user's study starts from nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    assert not any("fid-ref" in p.name for p in (tmp_path / "cache").iterdir())  # reference stats were throw-away


def test_search_smoke_checks_both_ends_of_the_lr_range(tmp_path, monkeypatch, synthetic_root, capsys):
    monkeypatch.chdir(tmp_path)
    code = search_main(["--smoke", "--preset", "quick", "--data", str(synthetic_root), "--lr-min", "1e-4",
                        "--lr-max", "5e-4", *TINY_FLAGS, "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert [line.split()[:2] for line in out.splitlines() if line.startswith("ok")] == [["ok", "lr=0.0001"],
                                                                                      ["ok", "lr=0.0005"]]
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


class _Explodes(Hooks):
    def d_targets(self, step, real, fake):
        raise RuntimeError("boom in d_targets")


def test_a_broken_variant_fails_the_preflight_with_one_line(tiny_cfg, synthetic_root):
    cfg = tiny_cfg()
    images = load_images(cfg.data, cfg.model.resolution)
    lines: list[str] = []
    ok = preflight({"fine": cfg, "broken": cfg}, images,
                   lambda name: [_Explodes()] if name == "broken" else [], report=lines.append)
    assert not ok
    assert lines[0].startswith("ok") and "fine" in lines[0]
    assert lines[1].startswith("FAIL") and "broken" in lines[1] and "boom in d_targets" in lines[1]
    assert "\n" not in lines[1] and lines[-1] == "preflight: 1 of 2 variants passed"


def test_resume_check_catches_a_resume_that_does_not_continue_exactly(tiny_cfg, tmp_path, monkeypatch):
    """The preflight's resume comparison can fail: a restore that drops the batch RNG state diverges."""
    from core.build import share_images
    from core.data import BatchSource
    cfg = smoke_config(tiny_cfg(), tmp_path / "cache")
    shared = share_images(cfg, load_images(tiny_cfg().data, cfg.model.resolution))
    assert check_variant("plain", cfg, shared, tmp_path / "a", None).ok
    monkeypatch.setattr(BatchSource, "load_state_dict", lambda self, state: None)
    result = check_variant("no-batch-rng", cfg, shared, tmp_path / "b", None)
    assert not result.ok and "bit-identical" in result.error
    assert SMOKE_STEPS % 2 == 0 and torch.get_num_threads() >= 1
