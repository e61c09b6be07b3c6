"""`python -m studies.run combine`: every study's best significant variant, from the committed reports, stacked
into one variant against the baseline; refused where two winners set the same key or none exists."""

from __future__ import annotations

import pandas as pd

from ablations import Ablation
from studies.report.summary import campaign, summary_section, winners
from studies.run.__main__ import main
from tests.helpers import install_fake_fid
from tests.test_study_outcomes import flags, in_dir, register, runs_of  # noqa: F401  (in_dir is a fixture)
from tests.test_summary import BASE, _write


def _reports(root):
    _write(root, "pooling", {"baseline": BASE, "maxpool": [0.12, 0.13, 0.14], "avgpool": [0.08, 0.09, 0.10]})
    _write(root, "label_smoothing", {"baseline": BASE, "real_0.9": [0.10, 0.11, 0.115], "real_0.8": BASE})
    _write(root, "ttur", {"baseline": BASE, "ratio_10": [0.30, 0.31, 0.32]})  # worse: never stacked


def test_combine_stacks_each_studys_best_variant_and_the_summary_ends_with_it(in_dir, synthetic_root, cache_dir,
                                                                             monkeypatch):
    install_fake_fid(monkeypatch)
    cwd = in_dir()
    _reports(cwd / "reports")
    sets = {"eval.fid_final_samples": 16, "train.sample_every_kimg": 0.016}
    assert main(["combine", "--data", str(synthetic_root), *flags(cache_dir, seeds=2, **sets)]) == 0
    parents, children = runs_of(cwd, "combine")
    # per study its best better variant (avgpool beats maxpool); the harm (ttur ratio_10) is not stacked
    assert parents.iloc[-1]["tags.stacked"] == "label_smoothing=real_0.9,pooling=avgpool"
    assert sorted(children.index) == ["baseline-s0", "baseline-s1", "stacked-s0", "stacked-s1"]
    stacked, baseline = children.loc["stacked-s1"], children.loc["baseline-s1"]
    assert (stacked["params.model.d_downsample"], stacked["params.train.real_label"]) == ("avgpool", "0.9")
    assert (baseline["params.model.d_downsample"], baseline["params.train.real_label"]) == ("stride", "1.0")
    text = (cwd / "reports" / "README.md").read_text()
    assert text.index("### Preset `cpu`") < text.index("### The winners stacked")  # the summary ends with it
    assert "(`label_smoothing=real_0.9`, `pooling=avgpool`), composed into one variant" in text  # what it stacked
    assert "combine/samples-stacked.png" in text and (cwd / "reports" / "combine" / "samples-stacked.png").is_file()
    assert all(e.study != "combine" for e in campaign(cwd / "reports")["cpu"])  # its own question, not in the table


def test_combine_is_refused_where_two_winners_set_one_key_or_none_exists(in_dir, synthetic_root, monkeypatch, capsys):
    class OtherPooling(Ablation):
        name = "other_pooling"
        variants = {"baseline": {}, "max": {"model.d_downsample": "maxpool"}}
    register(monkeypatch, OtherPooling)
    cwd = in_dir()
    assert main(["combine", "--data", str(synthetic_root), "--dry-run"]) == 2  # no reports: nothing to stack
    assert "nothing to stack" in capsys.readouterr().err
    _reports(cwd / "reports")
    _write(cwd / "reports", "other_pooling", {"baseline": BASE, "max": [0.05, 0.06, 0.07]})
    assert main(["combine", "--data", str(synthetic_root), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: combine: other_pooling=max and pooling=avgpool both set model.d_downsample; they cannot "
                   "be stacked (run the study over one with --base instead)"]


def _settings(study_dir, key: str, by_variant: dict[str, object]) -> None:
    """Add a varied setting's column to a runs.csv, as a report writes it (one value per variant)."""
    runs = pd.read_csv(study_dir / "runs.csv")
    runs[key] = runs["variant"].map(by_variant)
    runs.to_csv(study_dir / "runs.csv", index=False)


def test_a_variant_better_than_a_baseline_of_its_own_is_set_apart_not_stacked(in_dir, synthetic_root, capsys):
    cwd = in_dir()
    reports = cwd / "reports"
    _reports(reports)
    _settings(reports / "pooling", "model.d_downsample",  # the preset's own value: still a winner
              {"baseline": "stride", "maxpool": "maxpool", "avgpool": "avgpool"})
    # the ema study's baseline turns G_ema off; the cpu preset samples it (half-life 10 kimg)
    _write(reports, "ema", {"baseline": BASE, "ema_100": [0.05, 0.06, 0.07]})
    _settings(reports / "ema", "train.ema_kimg", {"baseline": 0.0, "ema_100": 100.0})
    assert winners(reports, "cpu") == [("label_smoothing", "real_0.9"), ("pooling", "avgpool")]
    assert main(["combine", "--data", str(synthetic_root), "--dry-run"]) == 0
    said = ("`ema=ema_100` is better than its study's baseline, which departs from the preset "
            "(train.ema_kimg=0.0 (preset 10.0)): not compared with the preset's own setting, so not stacked")
    assert f"combine: {said}" in capsys.readouterr().out.splitlines()
    text = "\n".join(summary_section(reports))
    assert f"- Preset `cpu`: {said}." in text
    assert "Measured against a baseline of their own, not the preset: `ema` (train.ema_kimg=0.0 (preset 10.0))" in text
