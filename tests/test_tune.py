"""`studies.run NAME --tune N`: every variant's own learning-rate search with the same budget, the study again at
each variant's best pair, both verdicts in the report; resume without repeating trials; ttur refused."""

from __future__ import annotations

import math

import optuna
import pandas as pd
import pytest

from core.tracking import Store
from studies.lr_handoff import TUNE_TRIAL_SEED
from tests.conftest import TINY
from tests.helpers import install_fake_fid
from tests.test_search import set_flags


def _argv(cache_dir, *extra):
    overrides = {**TINY, "data.cache_dir": str(cache_dir), "data.max_images": 48}
    return ["pooling", "--preset", "quick", "--variants", "baseline,maxpool", "--seeds", "2", "--tune", "2",
            "--tune-kimg", str(TINY["train.kimg"]), "--no-progress", *extra, *set_flags(overrides)]


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch, synthetic_root, empty_store_db):
    install_fake_fid(monkeypatch, value=lambda cfg, G, n: 50 + 1e5 * cfg.optim.lr_g + cfg.train.seed)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CELEBA_ROOT", str(synthetic_root))
    return tmp_path


def _searches(tmp_path) -> dict[str, optuna.Study]:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    return {v: optuna.load_study(study_name=f"tune-quick-pooling={v}", storage=storage) for v in ("baseline", "maxpool")}


@pytest.mark.slow
def test_tune_searches_every_variant_alike_resumes_without_repeating_trials_and_runs_each_at_its_best_pair(
        tuned_dir, cache_dir, empty_store_db, monkeypatch):
    """`pooling --variants baseline,maxpool --seeds 2 --tune 2`, interrupted (Ctrl-C) in maxpool's first trial, then
    run again to its end: one test, since each run of the whole flow costs tens of seconds."""
    from studies.run import __main__ as run
    from studies.search import trial as trial_mod
    real = trial_mod.execute_run
    started: list[int] = []

    def dies_on_third(cfg, *args, **kwargs):  # the third trial overall (maxpool's first) is interrupted
        started.append(cfg.train.seed)
        if len(started) == 3:
            raise KeyboardInterrupt
        return real(cfg, *args, **kwargs)
    monkeypatch.setattr(trial_mod, "execute_run", dies_on_third)
    assert run.main(_argv(cache_dir)) == 130
    searches = _searches(tuned_dir)
    assert {v: [t.number for t in s.trials if t.state == optuna.trial.TrialState.COMPLETE]
            for v, s in searches.items()} == {"baseline": [0, 1], "maxpool": []}
    # the same sampler seed: the same startup points for every variant
    assert searches["maxpool"].trials[0].params == searches["baseline"].trials[0].params

    calls: list[int] = []
    monkeypatch.setattr(trial_mod, "execute_run", lambda cfg, *a, **k: (calls.append(cfg.train.seed), real(cfg, *a, **k))[1])
    assert run.main(_argv(cache_dir)) == 0
    assert len(calls) == 2  # only maxpool's two trials ran: baseline's finished ones were not repeated
    store = Store(f"sqlite:///{empty_store_db}")
    searches = _searches(tuned_dir)
    for variant, study in searches.items():  # 2 trials that spent budget each, in Optuna and in MLflow
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert len(complete) == 2 and all(t.state.is_finished() for t in study.trials)
        trials = store.runs_frame(f"search-tune-quick-pooling={variant}")
        trials = trials[(trials["tags.search"] == "trial") & (trials["status"] != "KILLED")]
        assert len(trials) == 2
        assert sorted(trials["params.train.seed"].astype(int)) == sorted(TUNE_TRIAL_SEED + t.number for t in complete)
    assert len(searches["maxpool"].trials) == 3  # the interrupted one spent no budget: its slot ran again

    runs = store.runs_frame("pooling+tuned")
    children = runs[runs["tags.study"] == "child"]
    assert sorted(zip(children["tags.variant"], children["params.train.seed"].astype(int))) == [
        ("baseline", 0), ("baseline", 1), ("maxpool", 0), ("maxpool", 1)]
    for _, child in children.iterrows():  # each at its own variant's best trial's pair
        best = searches[child["tags.variant"]].best_trial
        assert math.isclose(float(child["params.optim.lr_g"]), best.params["lr_g"], rel_tol=1e-12)
        assert math.isclose(float(child["params.optim.lr_d"]), best.params["lr_d"], rel_tol=1e-12)
    search_seeds = {TUNE_TRIAL_SEED + t.number for s in searches.values() for t in s.trials}
    assert not search_seeds & set(children["params.train.seed"].astype(int))  # no search seed in the verdict
    parent = runs[runs["tags.study"] == "parent"].iloc[0]
    assert (parent["params.tune.trials"], parent["params.tune.lr_range"]) == ("2", "1e-05..0.001")

    plain = store.runs_frame("pooling")  # the verdict at the baseline's rates, beside it
    plain_parent = plain[plain["tags.study"] == "parent"].iloc[0]
    assert plain_parent["tags.eta.trials"] == "4"  # the first ETA counted every trial,
    assert parent["tags.eta.trials"] == "2"  # the resumed one only those still to run
    assert parent["tags.tune.plain_parent"] == plain_parent["run_id"]
    assert plain.loc[plain["tags.study"] == "child", "params.optim.lr_g"].nunique() == 1
    report = (tuned_dir / "reports/pooling+tuned.md").read_text()
    assert "## Two answers" in report and "Verdict at the baseline's rates" in report and "## Verdict" in report
    trials_csv = pd.read_csv(tuned_dir / "reports/pooling+tuned/trials.csv")
    assert len(trials_csv) == 5 and trials_csv["counted"].sum() == 4
    assert (tuned_dir / "reports/pooling+tuned/searches.png").is_file()
    assert (tuned_dir / "reports/pooling.md").is_file()


def test_tune_refuses_a_study_that_varies_the_rates_and_all_leaves_it_out(tmp_path, monkeypatch, capsys):
    from studies.run import __main__ as run
    monkeypatch.chdir(tmp_path)
    assert run.main(["ttur", "--preset", "quick", "--tune", "2", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --tune: study 'ttur' varies optim.lr_d, optim.lr_g itself") and "\n" not in err
    assert run.main(["all", "--preset", "quick", "--tune", "2", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "note: --tune: study 'ttur' varies" in err and "left out" in err
    assert run.main(["pooling", "--base", "loss=hinge", "--tune", "2", "--preset", "quick", "--dry-run"]) == 0
    from studies.run.tune import request
    from studies.run.study import StudySpec
    req = request(StudySpec("pooling", base=(("loss", "hinge"),), preset="quick"), ["baseline", "maxpool"],
                  run.build_parser().parse_args(["pooling", "--tune", "2"]), workers=1)
    assert req.search_name("maxpool") == "tune-quick-pooling@loss=hinge=maxpool"  # a search over the base too
    for argv, message in [(["pooling", "--tune", "2", "--lr-from", "x"], "--tune searches every variant's rates itself"),
                          (["pooling", "--tune", "2", "--set", "optim.lr_g=1e-4"], "conflicts with --tune"),
                          (["pooling", "--tune", "-1"], "--tune -1 must be >= 1"),
                          (["pooling", "--tune", "2", "--seeds", "1001"], "seeds from 1000")]:
        assert run.main([*argv, "--preset", "quick", "--dry-run"]) == 2, argv
        assert message in capsys.readouterr().err
