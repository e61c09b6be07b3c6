"""The search's answer to a study that asks for learning rates: the best trial of an Optuna study, as an LrChoice.

    python -m studies.run pooling --preset quick --lr-from lr-quick   # choose_lr reads the best trial
    python -m studies.run pooling --preset quick --search-lr          # choose_lr adds 20 trials first
"""

from __future__ import annotations

import dataclasses

import optuna

from core import records as rec
from core.errors import UserError
from core.tracking import Store
from studies.lr_handoff import LrChoice, LrRequest
from studies.search.orchestrate import run_search
from studies.search.storage import describe, load_study
from studies.search.trial import SearchSpec, validate_spec


def best_choice(study_name: str, storage: str) -> LrChoice:
    """The best complete trial of an existing study, or a UserError saying how to get one."""
    study = load_study(study_name, storage)
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        raise UserError(f"Optuna study '{study_name}' has no complete trial yet; run `python -m studies.search "
                        f"--study {study_name}` for more trials")
    best, searched = study.best_trial, study.user_attrs.get("search", {})
    # the family whose final value the trials minimised; a study from before it was recorded minimised FID
    family = searched.get("search.objective", rec.FID)
    return LrChoice(study=study_name, storage=describe(storage), trial=best.number, metric=family, value=best.value,
                    params=dict(best.params), mlflow_run_id=best.user_attrs.get("mlflow_run_id", ""),
                    preset=searched.get("search.preset", "?"), trial_kimg=searched.get("train.kimg", "?"))


def search_spec(request: LrRequest) -> SearchSpec:
    """The search a request names: its study (or the default name), on the requesting study's settings."""
    return SearchSpec(study=request.study, storage=request.storage, trials=max(request.search_trials, 1),
                      preset=request.preset, base=request.base, overrides=dict(request.overrides),
                      workdir=request.workdir)


def check_lr_request(request: LrRequest) -> None:
    """Every bad input of the search a request would run, found before anything is written."""
    validate_spec(search_spec(request))


def choose_lr(request: LrRequest, store: Store | None = None, progress: bool = False) -> LrChoice:
    """Add request.search_trials trials first (recorded in `store`) when asked, then the study's best trial."""
    spec = search_spec(request)
    if request.search_trials:
        if store is None:
            raise ValueError("a request that searches first needs an MLflow store for its trials")
        run_search(spec, store, progress=progress)
    return dataclasses.replace(best_choice(spec.name, spec.storage), searched_now=request.search_trials > 0)
