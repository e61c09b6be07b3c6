"""The CPU benchmark's smoke run (its timings mean nothing here) and its bad input."""

import json

from studies.bench.cpu import main
from tests.conftest import write_synthetic_celeba


def test_bench_cpu_smoke_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    root = write_synthetic_celeba(tmp_path / "celeba", 64)  # one batch of the larger model
    out = tmp_path / "bench_cpu.json"
    assert main(["--data", str(root), "--rounds", "1", "--steps", "1", "--warmup", "3", "--workers", "0",
                 "--inception-images", "2", "--inception-batch", "2", "--no-memory", "--out", str(out),
                 "--set", f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    result = json.loads(out.read_text())
    for rows in result["trainer"].values():
        assert [r["key"] for r in rows] == ["suite auto", "suite fp32", "plain"]
        assert all(r["img_per_s"] > 0 for r in rows) and rows[2]["ratio_vs_plain"] == 1.0
        assert rows[1]["loss_check_max_rel_diff"] < 1e-5  # fp32 NCHW: the plain step's arithmetic
    assert result["inception"]["max_feature_diff_of_scale"] <= 1e-4
    assert "vs plain" in capsys.readouterr().out


def test_bench_cpu_bad_input_is_one_line_and_exit_2(capsys):
    assert main(["--rounds", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --rounds must be >= 1"
