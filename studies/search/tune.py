"""Equal tuning budgets (Lucic et al. 2018): one learning-rate search per variant of a study, all alike.

    python -m studies.run pooling --tune 6        # 6 trials per variant, then the study at each variant's best pair
    python -m studies.run pooling --tune 6        # again after a kill: only the trials still missing run

Every variant's search has the same range, trial length, sampler seed and trial seeds (trial k trains with
train.seed 1000 + k, never one of the verdict's seeds, so the winner's lucky trial is not reused as evidence).
Trials are not pruned: every one runs to its end (evals=0), so each variant spends the same compute, and no
intermediate evaluation is paid for (on a CPU, five of them cost more than the trial's training); with the few
trials a fair comparison can afford, the median pruner would hardly act anyway (it starts after 5 trials).
N counts the trials that spent budget (complete, pruned, or failed on their own: a diverging learning rate is a
result); a trial whose worker was interrupted runs again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna

from core.errors import UserError
from core.tracking import Store
from core.records import TUNE, tune_tag
from studies.lr_handoff import TUNE_TRIAL_SEED, LrChoice, TuneRequest
from studies.search.handoff import best_choice
from studies.search.orchestrate import run_search
from studies.search.storage import describe, journal_path, open_storage
from studies.search.trial import SearchSpec, spent, validate_spec


def variant_search(request: TuneRequest, variant: str, trials: int | None = None) -> SearchSpec:
    """The search of one variant (`trials` it adds: the whole budget unless given)."""
    return SearchSpec(study=request.search_name(variant), storage=request.storage,
                      trials=request.trials if trials is None else trials, workers=request.workers,
                      ablation=request.ablation, variant=variant, base=request.base,
                      preset=request.preset, overrides=dict(request.overrides), lr_range=request.lr_range,
                      trial_kimg=request.trial_kimg, evals=0, seed=request.sampler_seed, trial_seed=TUNE_TRIAL_SEED,
                      workdir=request.workdir)


def check_tune(request: TuneRequest) -> dict[str, object]:
    """Every bad input of the searches, found before anything is written; variant -> a trial's config."""
    if request.trials < 1:
        raise UserError(f"--tune {request.trials} must be >= 1 trial per variant")
    return {v: validate_spec(variant_search(request, v)) for v in request.variants}


def trials_left(request: TuneRequest) -> dict[str, int]:
    """variant -> trials its search must still run to reach the budget (the whole budget for a new search)."""
    file = journal_path(request.storage) or (Path(request.storage[len("sqlite:///"):])
                                             if request.storage.startswith("sqlite:///") else None)
    if file is not None and not file.is_file():  # nothing searched yet; and the ETA creates no file
        return dict.fromkeys(request.variants, request.trials)
    storage = open_storage(request.storage)
    names = set(optuna.get_all_study_names(storage))
    left = {}
    for variant in request.variants:
        name = request.search_name(variant)
        done = spent(optuna.load_study(study_name=name, storage=storage)) if name in names else 0
        left[variant] = max(0, request.trials - done)
    return left


def tune(request: TuneRequest, store: Store, progress: bool = False) -> tuple[dict[str, LrChoice | None], dict]:
    """Run (or finish) every variant's search; returns variant -> its best trial's rates (None where no trial
    completed: that variant keeps the config's rates), and the tuned study's parent tags saying so."""
    check_tune(request)
    choices: dict[str, LrChoice | None] = {}
    tags: dict[str, object] = {f"{TUNE}storage": describe(request.storage)}
    for variant, left in trials_left(request).items():
        spec = variant_search(request, variant, left)
        if left:
            run_search(spec, store, progress=progress, notes={f"{TUNE}of": request.experiment})
        tags[tune_tag("search", variant)] = spec.name
        try:
            choice = dataclasses.replace(best_choice(spec.name, spec.storage), searched_now=left > 0)
        except UserError:  # every trial pruned or failed: nothing better than the config's own rates is known
            choices[variant] = None
            tags[tune_tag("fallback", variant)] = "no trial completed; the config's rates"
            continue
        choices[variant] = choice
        tags.update({tune_tag("best_trial", variant): choice.trial, tune_tag("value", variant): choice.value})
    return choices, tags
