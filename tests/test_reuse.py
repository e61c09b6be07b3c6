"""Finished runs are reused, never retrained: a second study that needs a run the store already finished under
the same content key (config with seed, data, metric protocol, hooks, core's code) records it, tagged with
where it came from, instead of training it; any change of that key trains anew, and so does --no-reuse."""

from __future__ import annotations

import pytest

from core import identity
from studies.run.__main__ import main
from tests.helpers import install_fake_fid
from tests.test_study_outcomes import flags, in_dir, runs_of  # noqa: F401  (in_dir is a fixture)

SETS = {"eval.fid_final_samples": 16, "train.sample_every_kimg": 0.016}  # scored, with grids to follow


def _two_studies(cwd, synthetic_root, cache_dir, calls, *second_flags: str):
    """pooling (baseline + maxpool), then label_smoothing (baseline + real_0.9), 2 seeds each, one store."""
    data = ["--data", str(synthetic_root)]
    assert main(["pooling", "--variants", "maxpool", *data, *flags(cache_dir, seeds=2, **SETS)]) == 0
    trained_first = len(calls)
    assert main(["label_smoothing", "--variants", "real_0.9", *data, *flags(cache_dir, seeds=2, **SETS),
                 *second_flags]) == 0
    return runs_of(cwd, "pooling")[1], runs_of(cwd, "label_smoothing")[1], trained_first


def test_a_second_study_reuses_the_shared_baseline_and_reports_the_same_numbers(in_dir, synthetic_root, cache_dir,
                                                                              monkeypatch):
    calls = install_fake_fid(monkeypatch)
    cwd = in_dir()
    first, second, trained_first = _two_studies(cwd, synthetic_root, cache_dir, calls)
    assert trained_first == 4 and len(calls) == 6  # the second study trained (and scored) only real_0.9's 2 seeds
    from core.tracking import Store
    store = Store(f"sqlite:///{cwd / 'mlflow.db'}")
    for seed in (0, 1):
        reused, original = second.loc[f"baseline-s{seed}"], first.loc[f"baseline-s{seed}"]
        assert reused["tags.reused_from"] == original["run_id"] and reused["tags.reused_from_study"] == "pooling"
        assert reused["tags.run_key"] == original["tags.run_key"] and reused["tags.outcome"] == "finished"
        assert reused["metrics.kid/final"] == original["metrics.kid/final"]
        assert reused["params.optim.lr_g"] == original["params.optim.lr_g"]
        assert len(store.metric_history(reused["run_id"], "loss/d")) == 1  # no training history of its own
        assert len(store.metric_history(original["run_id"], "loss/d")) > 1
        assert not store.list_artifacts(reused["run_id"])  # grids and checkpoints stay with the original
    assert "tags.reused_from" not in second or second.loc["real_0.9-s0"].isna()["tags.reused_from"]
    # its report: the same baseline numbers as the first study's, the reuse named, the original's grids shown
    pooling = md_rows(cwd / "reports" / "pooling.md")
    smoothing = md_rows(cwd / "reports" / "label_smoothing.md")
    for seed in (0, 1):
        assert smoothing[f"baseline-s{seed}"]["final KID ± SE"] == pooling[f"baseline-s{seed}"]["final KID ± SE"]
        assert smoothing[f"baseline-s{seed}"]["reused from"].endswith("(pooling)")
    assert (cwd / "reports" / "label_smoothing" / "samples-baseline.png").is_file()


def md_rows(path):
    from tests.helpers import md_table
    return md_table(path.read_text(), "Every run")


def test_a_changed_key_or_no_reuse_trains_anew_and_an_unchanged_one_reuses_everything(in_dir, synthetic_root,
                                                                                       cache_dir, monkeypatch):
    calls = install_fake_fid(monkeypatch)
    cwd = in_dir()
    data = ["--data", str(synthetic_root)]
    assert main(["pooling", "--variants", "maxpool", *data, *flags(cache_dir, seeds=1, **SETS)]) == 0

    def trained(*extra: str, **sets) -> int:
        before = len(calls)
        assert main(["label_smoothing", "--variants", "real_0.9", "--fresh", *data,
                     *flags(cache_dir, seeds=1, **{**SETS, **sets}), *extra]) == 0
        return len(calls) - before

    assert trained(**{"train.kimg": 0.048}) == 2  # a trained key changed (6 steps instead of 4): both train
    with monkeypatch.context() as m:
        m.setattr(identity, "code_digest", lambda: "an-edit-of-core")
        assert trained() == 2  # core's code changed
    assert trained("--no-reuse") == 2  # asked to
    assert trained() == 0  # nothing changed: the baseline from pooling, real_0.9 from the --no-reuse study
    second = runs_of(cwd, "label_smoothing")[1]
    latest = second.sort_values("start_time").groupby(level=0).tail(1)
    assert set(latest["tags.reused_from_study"]) == {"pooling", "label_smoothing"}


def test_a_list_of_studies_trains_each_distinct_run_once_and_its_eta_counts_only_those(in_dir, synthetic_root,
                                                                                    cache_dir, monkeypatch, capsys):
    from studies import eta
    calls = install_fake_fid(monkeypatch)
    timed: list[list[str]] = []
    real_measure = eta.measure
    monkeypatch.setattr(eta, "measure", lambda configs, images, progress=False: (
        timed.append(list(configs)), real_measure(configs, images, progress))[1])
    cwd = in_dir()
    assert main(["pooling,label_smoothing", "--data", str(synthetic_root), *flags(cache_dir, seeds=1, **SETS)]) == 0
    err = capsys.readouterr().err
    assert "ETA " in err and "for 2 studies (6 runs to train, 1 reused)" in err  # 3 + 4 variants, one baseline
    assert timed[0] == ["baseline", "maxpool", "avgpool"]  # every pooling variant trains, so each is timed ...
    assert len(timed[1]) == 3 and "baseline" not in timed[1]  # ... and the shared baseline only once
    assert len(calls) == 6  # trained and scored: 6 distinct runs
    second = runs_of(cwd, "label_smoothing")[1]
    assert second.loc["baseline-s0", "tags.reused_from_study"] == "pooling"


def test_baseline_seeds_train_the_shared_baseline_once_and_every_verdict_uses_them_all(in_dir, synthetic_root,
                                                                                     cache_dir, monkeypatch, capsys):
    """--baseline-seeds 3 with --seeds 2: the baseline trains seeds 0-2 once for both studies, and each verdict
    is Welch's test of 2 variant seeds against 3 baseline seeds."""
    import numpy as np
    from scipy import stats

    from studies.report.summary import study_effects
    from studies.run.study import StudySpec, resolve_configs, study_key
    calls = install_fake_fid(monkeypatch)
    cwd = in_dir()
    data = ["--data", str(synthetic_root), "--baseline-seeds", "3"]
    assert main(["pooling", "--variants", "maxpool", *data, *flags(cache_dir, seeds=2, **SETS)]) == 0
    assert len(calls) == 5  # baseline 3 seeds, maxpool 2
    assert main(["label_smoothing", "--variants", "real_0.9", *data, *flags(cache_dir, seeds=2, **SETS)]) == 0
    assert len(calls) == 7  # only real_0.9's 2 seeds: the 3 baseline runs are reused
    first, second = runs_of(cwd, "pooling")[1], runs_of(cwd, "label_smoothing")[1]
    assert sorted(first.index) == ["baseline-s0", "baseline-s1", "baseline-s2", "maxpool-s0", "maxpool-s1"]
    for seed in range(3):
        assert second.loc[f"baseline-s{seed}", "tags.reused_from"] == first.loc[f"baseline-s{seed}", "run_id"]
    (effect,) = study_effects(cwd / "reports" / "pooling" / "runs.csv")
    kid = first["metrics.kid/final"]
    ref = stats.ttest_ind(kid[["maxpool-s0", "maxpool-s1"]], kid[["baseline-s0", "baseline-s1", "baseline-s2"]],
                          equal_var=False)
    assert (effect.verdict.seeds, effect.base.finished) == (2, 3)
    assert effect.verdict.welch.p == pytest.approx(ref.pvalue) and effect.delta == pytest.approx(
        np.mean(kid[["maxpool-s0", "maxpool-s1"]]) - np.mean(kid[["baseline-s0", "baseline-s1", "baseline-s2"]]))
    assert "the baseline 0, 1, 2 (3: `--baseline-seeds`" in (cwd / "reports" / "pooling.md").read_text()
    # a study without the flag keeps the key it always had (a campaign resumes its studies); with it, a new one
    import hashlib
    import json

    from core.config import flatten
    plain, same = StudySpec(ablation="pooling"), StudySpec(ablation="pooling", baseline_seeds=3)
    configs = resolve_configs(plain)
    before = json.dumps({"experiment": "pooling", "seeds": [0, 1, 2], "configs": {v: flatten(c) for v, c in
                                                                                 configs.items()}},
                        sort_keys=True, default=str)  # the key's blob before --baseline-seeds existed
    assert study_key(plain, configs) == study_key(same, configs) == hashlib.sha1(before.encode()).hexdigest()[:16]
    assert study_key(StudySpec(ablation="pooling", baseline_seeds=5), configs) != study_key(plain, configs)
    capsys.readouterr()
    assert main(["pooling", "--seeds", "3", "--baseline-seeds", "2", *data[:2]]) == 2
    assert "--baseline-seeds 2 must be >= --seeds 3" in capsys.readouterr().err


def test_a_run_interrupted_here_and_finished_elsewhere_is_reused_not_trained_again(in_dir, synthetic_root, cache_dir,
                                                                                 monkeypatch):
    """A study killed while it copied a reused run (its child has no outcome yet) resumes by copying it again:
    the stale child is discarded, nothing trains, and the study holds one copy tagged with the original."""
    from core import records as rec
    from core.tracking import Store
    calls = install_fake_fid(monkeypatch)
    cwd = in_dir()
    first, second, _ = _two_studies(cwd, synthetic_root, cache_dir, calls)
    store = Store(f"sqlite:///{cwd / 'mlflow.db'}")
    stale = second.loc["baseline-s0", "run_id"]
    store.client.delete_tag(stale, rec.OUTCOME)  # killed halfway through the copy: no result
    store.client.set_terminated(stale, "KILLED")
    parent = runs_of(cwd, "label_smoothing")[0]["run_id"].iloc[-1]
    store.client.set_terminated(parent, "KILLED")
    before = len(calls)
    assert main(["label_smoothing", "--variants", "real_0.9", "--data", str(synthetic_root),
                 *flags(cache_dir, seeds=2, **SETS)]) == 0
    assert len(calls) == before  # nothing trained or scored
    again = runs_of(cwd, "label_smoothing")[1]
    assert len(again.loc[["baseline-s0"]]) == 1 and again.loc["baseline-s0", "run_id"] != stale
    assert again.loc["baseline-s0", "tags.reused_from"] == first.loc["baseline-s0", "run_id"]
    assert again.loc["baseline-s0", "tags.outcome"] == "finished"
    assert store.client.get_run(stale).info.lifecycle_stage == "deleted"
