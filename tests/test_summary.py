"""The campaign summary in reports/README.md: built from the reports' runs.csv alone, improvements and harms both
shown, Holm within a study and across the campaign equal to scipy's Welch test adjusted by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from studies.report.index import write_index
from studies.report.summary import campaign

BASE = [0.150, 0.160, 0.170]
STUDIES = {  # study -> variant -> final KID per seed (NaN: a diverged seed)
    "good": {"baseline": BASE, "helps": [0.080, 0.090, 0.100], "same": [0.155, 0.175, 0.160]},
    "bad": {"baseline": BASE, "hurts": [0.300, 0.310, 0.325], "flaky": [0.150, 0.170, math.nan]},
}


def _write(reports, study: str, variants: dict[str, list[float]], preset: str = "cpu", reused_from: str = "") -> None:
    """reused_from: the study whose baseline runs this one's baseline reused (its run ids, as runs.csv says)."""
    rows = []
    for variant, values in variants.items():
        for seed, value in enumerate(values):
            reused = f"{reused_from}{variant}{seed}" if reused_from and variant == "baseline" else ""
            rows.append({"reused_from": reused, "preset": preset, "primary_metric": "kid", "final_samples": 500, "variant": variant,
                         "seed": seed, "run": f"{variant}-s{seed}",
                         "outcome": "diverged" if math.isnan(value) else "finished", "final_kid": value,
                         "final_fid": 100 * value, "final_recall": 0.1, "final_coverage": 0.2 if variant != "hurts" else 0.05,
                         "final_kid_std": 0.005, "kimg": 60.0, "img_per_s": 250.0, "run_id": f"{study}{variant}{seed}"})
    (reports / study).mkdir(parents=True)
    pd.DataFrame(rows).to_csv(reports / study / "runs.csv", index=False)


def _holm(p: list[float]) -> list[float]:
    order = np.argsort(p)
    out, running = np.empty(len(p)), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        out[i] = running
    return list(out)


def test_the_summary_shows_helps_and_harms_with_holm_in_the_study_and_across_the_campaign(tmp_path, monkeypatch):
    reports = tmp_path / "reports"
    for study, variants in STUDIES.items():
        _write(reports, study, variants)
    _write(reports, "elsewhere", {"baseline": BASE, "other": [0.1, 0.11, 0.12]}, preset="default")
    effects = campaign(reports)
    assert set(effects) == {"cpu", "default"}  # one family per preset: another preset asks another question
    cpu = effects["cpu"]
    assert [e.verdict.name for e in cpu] == ["helps", "flaky", "same", "hurts"]  # sorted by effect (flaky: +0.000)
    raw = []
    for e in cpu:
        values = [v for v in STUDIES[e.study][e.verdict.name] if math.isfinite(v)]
        ref = sps.ttest_ind(values, BASE, equal_var=False)
        assert e.delta == pytest.approx(np.mean(values) - np.mean(BASE))
        assert e.verdict.welch.p == pytest.approx(ref.pvalue)
        raw.append(ref.pvalue)
    for e, want in zip(cpu, _holm(raw)):  # across the campaign: all four variants of the preset
        assert e.p_campaign == pytest.approx(want)
    by_study = {}
    for e in cpu:  # within a study: its own two variants, as its report's verdict
        by_study.setdefault(e.study, []).append(e)
    for study in by_study.values():
        for e, want in zip(study, _holm([e.verdict.welch.p for e in study])):
            assert e.verdict.p_holm == pytest.approx(want)
    hurts = next(e for e in cpu if e.verdict.name == "hurts")
    assert hurts.worse and not hurts.better and hurts.coverage == pytest.approx(0.05)
    flaky = next(e for e in cpu if e.verdict.name == "flaky")
    assert flaky.verdict.failures == 1 and flaky.verdict.seeds == 3  # the diverged seed is a result

    from studies.report import plots
    drawn, draw = [], plots.plot_forest
    monkeypatch.setattr(plots, "plot_forest", lambda rows, *a: (drawn.extend(rows), draw(rows, *a))[1])
    text = write_index(reports).read_text()
    summary = text[text.index("## Campaign summary"):]
    assert "bad: flaky (1/3 failed)" in {r.label for r in drawn} and "bad: hurts" in {r.label for r in drawn}
    assert "### Preset `cpu`" in summary and "### Preset `default`" in summary
    assert "Shown to hurt: `bad` `hurts` (Δ KID +0.15" in summary and "Shown to help (Holm within its study): `good` `helps`" in summary
    assert "Not told apart from the baseline: `bad` `flaky`, `good` `same`" in summary
    row = next(line for line in summary.splitlines() if "`hurts`" in line and line.startswith("|"))
    assert "**worse**" in row and "0 / 3" in row
    assert "1 / 3" in next(line for line in summary.splitlines() if "`flaky`" in line and line.startswith("|"))
    assert "- Preset `cpu`: `python -m studies.run combine --preset cpu` would stack `good=helps`; not run yet." in summary
    assert "- Preset `default`: `python -m studies.run combine --preset default` would stack `elsewhere=other`" in summary
    assert (reports / "summary-cpu.png").stat().st_size > 0 and (reports / "summary-default.png").is_file()


def test_a_folder_without_evidence_has_no_summary(tmp_path):
    assert campaign(tmp_path) == {}
    assert "Campaign summary" not in write_index(tmp_path).read_text()


def test_the_summary_alone_is_rebuilt_without_a_store(tmp_path, monkeypatch, capsys):
    from studies.report.__main__ import main
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "reports", "good", STUDIES["good"])
    assert main([]) == 0 and "Campaign summary" in (tmp_path / "reports" / "README.md").read_text()
    _write(tmp_path / "bad-only", "bad", STUDIES["bad"])  # a harm, and nothing shown better
    assert "- Preset `cpu`: nothing to stack: no variant is shown better" in write_index(tmp_path / "bad-only").read_text()
    assert not (tmp_path / "mlflow.db").exists()  # no store was opened or made
    assert main(["--from-csv"]) == 2 and "need a report's name" in capsys.readouterr().err
    assert main(["--reports", "nowhere"]) == 2


def test_a_tuned_study_adds_its_effect_beside_the_plain_one_not_a_row_of_its_own(tmp_path):
    reports = tmp_path / "reports"
    for study, variants in STUDIES.items():
        _write(reports, study, variants)
    # at each variant's own best rates, `hurts` is no longer worse: the budget, not the trick
    _write(reports, "bad+tuned", {"baseline": BASE, "hurts": [0.150, 0.165, 0.160], "flaky": [0.15, 0.16, 0.17]})
    cpu = campaign(reports)["cpu"]
    assert sorted(e.study for e in cpu) == ["bad", "bad", "good", "good"]
    hurts = next(e for e in cpu if e.verdict.name == "hurts")
    ref = sps.ttest_ind([0.150, 0.165, 0.160], BASE, equal_var=False)
    assert hurts.tuned.welch.p == pytest.approx(ref.pvalue)
    assert next(e for e in cpu if e.verdict.name == "helps").tuned is None
    text = write_index(reports).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| [bad]") and "`hurts`" in line)
    assert "at own best rates (--tune)" in text and row.rstrip(" |").endswith("not told apart")
    assert "With every variant at its own best learning rates" in text


def test_studies_that_share_one_baseline_are_told_that_its_error_moves_all_their_effects_alike(tmp_path):
    from studies.report.summary import paragraph
    reports = tmp_path / "reports"
    _write(reports, "first", {"baseline": BASE, "a": [0.10, 0.12, 0.11]})
    _write(reports, "second", {"baseline": BASE, "b": [0.14, 0.15, 0.13], "c": [0.2, 0.21, 0.19]}, reused_from="first")
    _write(reports, "own", {"baseline": BASE, "d": [0.1, 0.1, 0.1]})  # the same values, but its own runs
    text = paragraph("cpu", campaign(reports)["cpu"])
    se = np.std(BASE, ddof=1) / math.sqrt(3)
    assert (f"2 studies (`first`, `second`) share one baseline, the same 3 runs (KID 0.16 ± 0.01 sd, standard error "
            f"{se:.3g}), so its error moves all 3 of their Δ alike: 2 of them lie below zero") in text
    assert "`own`" not in text.split("share one baseline")[0].split(".")[-1]  # its own baseline is not shared
    assert text.count("share one baseline") == 1
