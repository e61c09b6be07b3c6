"""The CPU benchmark's smoke run (its timings mean nothing here) and its bad input."""

import json

from studies.bench.cpu import main
from tests.conftest import write_synthetic_celeba


def test_bench_cpu_smoke_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    root = write_synthetic_celeba(tmp_path / "celeba", 64)  # one batch of the larger model
    out = tmp_path / "bench_cpu.json"
    assert main(["--data", str(root), "--rounds", "1", "--steps", "1", "--warmup", "3", "--workers", "0",
                 "--models", "32px w0.125 b32,32px w0.25 b64", "--no-compile",
                 "--inception-images", "2", "--inception-batch", "2", "--no-memory", "--out", str(out),
                 "--set", f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    result = json.loads(out.read_text())
    assert list(result["trainer"]) == list(result["paths"]) == ["32px w0.125 b32", "32px w0.25 b64"]
    for model, rows in result["trainer"].items():
        assert [r["key"] for r in rows] == ["suite auto", "suite fp32", "plain"]
        assert all(r["img_per_s"] > 0 for r in rows) and rows[2]["ratio_vs_plain"] == 1.0
        assert rows[1]["loss_check_max_rel_diff"] < 1e-5  # fp32 NCHW: the plain step's arithmetic
        paths = result["paths"][model]
        assert sorted(r["path"] for r in paths["paths"]) == ["bf16+NCHW+eager", "bf16+NHWC+eager",
                                                             "fp32+NCHW+eager", "fp32+NHWC+eager"]  # --no-compile
        assert rows[0]["loop"] == f"suite {paths['chosen']} (auto)"
        assert paths["chosen"] == max(paths["paths"], key=lambda r: r["img_per_s"] or 0)["path"]
    assert not (tmp_path / "cache" / "fastpath.json").exists()  # the bench measures; it leaves the cache alone
    assert result["inception"]["max_feature_diff_of_scale"] <= 1e-4
    assert "vs plain" in capsys.readouterr().out


def test_bench_cpu_bad_input_is_one_line_and_exit_2(capsys):
    assert main(["--rounds", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --rounds must be >= 1"


def test_kid_curve_scores_an_untrained_and_a_trained_g_against_held_out_real_images(tmp_path, monkeypatch,
                                                                                    synthetic_root, cache_dir):
    """The curve the cpu preset was chosen from: points at the asked kimg, anchors, one grid; one run, no restarts."""
    from studies.bench.kid_curve import main as curve
    monkeypatch.setenv("HOME", str(tmp_path))
    out = tmp_path / "curve.json"
    assert curve(["--preset", "quick", "--data", str(synthetic_root), "--at", "0,0.064", "--modes", "train",
                  "--no-progress", "--out", str(out), *[a for kv in (
                      "data.max_images=48", f"data.cache_dir={cache_dir}", "eval.fid_final_samples=8",
                      "eval.fid_ref_images=16", "eval.fid_batch=8", "eval.grid_size=4") for a in ("--set", kv)]]) == 0
    result = json.loads(out.read_text())
    assert [round(p["kimg"], 3) for p in result["points"]] == [0.0, 0.064]  # two batches of 32
    assert result["points"][0]["train_s"] < 1e-3 < result["points"][1]["train_s"]  # kimg 0 trained nothing
    untrained, trained = (p["kid"] for p in result["points"])
    assert untrained != trained and result["untrained_over_last_kid"] == untrained / trained
    assert result["held_out_real"]["kid"] < untrained  # the last 8 of 48 real images, outside the reference
    assert set(result["last_by_mode"]) == {"train"} and (tmp_path / result["grid"]).is_file()


def test_kid_curve_bad_points_are_one_line_and_exit_2(capsys):
    from studies.bench.kid_curve import main as curve
    assert curve(["--at", "50,20"]) == 2
    assert capsys.readouterr().err.strip() == "error: --at must be ascending kimg values >= 0, got '50,20'"
