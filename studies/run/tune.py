"""`--tune N`: every variant of a study gets the same learning-rate search before it is compared (Lucic et al.
2018, "Are GANs Created Equal?": differences found at one shared setting often measure the tuning budget).

    python -m studies.run pooling --tune 6                 # pooling at the config's rates, 6 trials per variant, then
                                                           # pooling+tuned: each variant at its own best rates
    python -m studies.run pooling --tune 6 --tune-kimg 30  # trials of 30 kimg (default: a quarter of train.kimg)
    python -m studies.run all --tune 6                     # every study whose variants leave the rates free

The plain study runs first (reused where the store has it), then one search per variant (studies.search.tune:
same range, trial length, sampler seed and trial seeds, disjoint from the verdict's), then the tuned study, an
experiment of its own (NAME+tuned), whose report sets both verdicts side by side. A study whose variants set
the searched rates (ttur) is refused: tuning them per variant would erase what it compares; `all --tune`
leaves such studies out, saying so.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from core.errors import UserError
from core.records import TUNE_PLAIN, tune_tag
from studies.lr_handoff import BETA1_KEY, LR_KEYS, TUNE_TRIAL_SEED, LrChoice, TuneRequest
from studies.run.study import StudySpec, varied_keys


def refusal(spec: StudySpec) -> str | None:
    """Why `spec` cannot be tuned per variant, or None."""
    clash = sorted(varied_keys(spec) & {*LR_KEYS, BETA1_KEY})
    if clash:
        return (f"--tune: study '{spec.ablation}' varies {', '.join(clash)} itself; a search per variant would "
                "erase what it compares (run it plain, or search its shared rates with --search-lr)")
    return None


def tunable(specs: list[StudySpec], args: argparse.Namespace, every: bool) -> list[StudySpec]:
    """The specs that --tune applies to: all of them, or, for 'all', those whose variants leave the rates free
    (the others named on one line); bad combinations refused."""
    if args.tune < 0:
        raise UserError(f"--tune {args.tune} must be >= 1 trial per variant (0 = off)")
    if args.lr_from or args.search_lr:
        raise UserError("--tune searches every variant's rates itself; drop --lr-from / --search-lr")
    if max(args.seeds, args.baseline_seeds) > TUNE_TRIAL_SEED:
        flag = "--seeds" if args.seeds >= args.baseline_seeds else "--baseline-seeds"
        raise UserError(f"--tune trains its trials with seeds from {TUNE_TRIAL_SEED}; {flag} "
                        f"{max(args.seeds, args.baseline_seeds)} would reuse one as evidence")
    clash = sorted(set(LR_KEYS) & specs[0].overrides.keys())
    if clash:
        raise UserError(f"--set {', '.join(clash)} conflicts with --tune, which searches it")
    kept = []
    for spec in specs:
        why = refusal(spec)
        if why is None:
            kept.append(spec)
        elif every:
            print(f"note: {why}; left out", file=sys.stderr)
        else:
            raise UserError(why)
    if not kept:
        raise UserError("--tune: no study left to tune")
    return kept


def request(spec: StudySpec, variants: list[str], args: argparse.Namespace, workers: int) -> TuneRequest:
    """The searches of one study: the same budget for every variant."""
    return TuneRequest(ablation=spec.ablation, experiment=spec.experiment, variants=tuple(variants),
                       trials=args.tune, preset=spec.preset, base=spec.base, overrides=dict(spec.overrides),
                       storage=args.storage, trial_kimg=args.tune_kimg, workers=workers, workdir=spec.workdir)


def tuned_spec(spec: StudySpec, req: TuneRequest, choices: dict[str, LrChoice | None], tags: dict[str, object],
               plain_parent: str) -> StudySpec:
    """The tuned study: each variant at its best trial's rates (the config's where none completed), its budget
    recorded on every run, its choices and the plain study's parent run on its parent."""
    rates = {v: c.overrides for v, c in choices.items() if c is not None}
    notes = {**tags, TUNE_PLAIN: plain_parent,
             **{tune_tag(key.split(".")[-1], v): value for v, r in rates.items() for key, value in r.items()}}
    return dataclasses.replace(spec, tune=req.trials, tuned=rates, provenance={**spec.provenance, **req.budget()},
                               notes={**spec.notes, **notes})


def run_tuned(spec: StudySpec, req: TuneRequest, store, plain_parent: str, progress: bool) -> StudySpec:
    """Run (or finish) every variant's search; the tuned study to run next."""
    import studies.search as search  # Optuna is imported only when a study asks for a search
    choices, tags = search.tune(req, store, progress=progress)
    return tuned_spec(spec, req, choices, tags, plain_parent)

