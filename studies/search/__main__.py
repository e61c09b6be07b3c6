"""Optuna search over the learning rates of G and D: each trial is a shortened training run scored by the final
value of the study's primary metric (`derived.primary_metric`: KID under `cpu` and `quick`, FID under `default`,
the metric a study's verdict compares), pruned early on its intermediate values, and recorded as an MLflow child
run of one parent run per invocation.

    python -m studies.search --preset quick --trials 20                   # ./optuna.db, study 'lr-quick'
    python -m studies.search --preset quick --ablation pooling --variant maxpool --search-beta1
    python -m studies.search --study lr-team --storage postgresql://me@db.lan/optuna --trials 40 --workers 4
    python -m studies.search --study lr-team --storage journal:/nfs/lr.journal --trials 10  # on each machine
    python -m studies.run pooling --preset quick --lr-from lr-quick        # a study with the best pair found
    python -m studies.run pooling --preset quick --search-lr               # search (20 trials), then the study
    python -m studies.search --smoke                                      # preflight before a long search

Each invocation adds exactly --trials trials to the study, shared out over its --workers; the same --study
name resumes it (with the same settings, or it is refused). On top of the usual order (preset, --base,
--ablation's variant, --set) the search sets each trial's train.kimg (--trial-kimg, default a quarter of the
resolved one), eval.fid_every_kimg (--evals reports per trial) and the searched optim.* keys.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.config import RunConfig, apply_overrides, to_json
from core.device import choose_preset
from core.errors import UserError
from core.tracking import Store, check_store_uri
from studies.cli import add_flags, command, data_roots, overrides_from, parse_base
from studies.search.handoff import best_choice
from studies.search.orchestrate import run_search
from studies.search.storage import Heartbeat, open_storage
from studies.search.trial import BETA1_RANGE, SearchSpec, validate_spec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="", help="Optuna study name; an existing one is resumed "
                   "(default: lr-PRESET[-ABLATION=VARIANT][@BASE=VARIANT])")
    add_flags(p, "--storage")
    p.add_argument("--trials", type=int, default=20, help="trials this invocation adds, over all workers (default: 20)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes on the study (default: 1)")
    p.add_argument("--ablation", default="", help="search on top of this ablation's --variant (default: none)")
    p.add_argument("--variant", default="baseline", help="variant of --ablation (default: baseline)")
    p.add_argument("--base", action="append", default=[], metavar="ABLATION=VARIANT",
                   help="another ablation's variant under everything (repeatable; default: none)")
    add_flags(p, "--preset", "--data", "--set")
    p.add_argument("--lr-min", type=float, default=1e-5, help="lower end of the lr_g/lr_d range (default: 1e-5)")
    p.add_argument("--lr-max", type=float, default=1e-3, help="upper end of the lr_g/lr_d range (default: 1e-3)")
    p.add_argument("--search-beta1", action="store_true",
                   help=f"also search Adam beta1 in [{BETA1_RANGE[0]}, {BETA1_RANGE[1]}] (default: off)")
    p.add_argument("--trial-kimg", type=float, default=0.0,
                   help="training length of a trial in kimg (default: 0 = a quarter of the resolved train.kimg)")
    p.add_argument("--evals", type=int, default=5, help="intermediate evaluations of the primary metric per trial, for pruning (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed (default: 0)")
    p.add_argument("--heartbeat", type=int, default=60, help="seconds between a running trial's heartbeats; "
                   "silent for 3x that, it is failed and retried once (default: 60)")
    add_flags(p, "--tracking-uri")
    p.add_argument("--workdir", type=Path, default=Path("runs"), help="trial checkpoints and samples (default: runs)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config of a trial and exit")
    p.add_argument("--smoke", action="store_true", help="preflight a trial at both ends of the LR range on this "
                   "device (a few steps, checkpoint round trip, grid, FID/KID); exit 0 only if both pass; writes no "
                   "runs or trials (default: off)")
    add_flags(p, "--no-progress")
    return p


def spec_from_args(args: argparse.Namespace) -> SearchSpec:
    preset, args.preset_reason = choose_preset(args.preset)
    args.preset = preset
    return SearchSpec(study=args.study, storage=args.storage, trials=args.trials, workers=args.workers,
                      ablation=args.ablation, variant=args.variant, base=parse_base(args.base), preset=args.preset,
                      overrides=overrides_from(args), lr_range=(args.lr_min, args.lr_max),
                      search_beta1=args.search_beta1, trial_kimg=args.trial_kimg, evals=args.evals, seed=args.seed,
                      heartbeat=Heartbeat(interval_s=args.heartbeat), workdir=args.workdir)


def search(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    if args.dry_run:
        print(f"preset {spec.preset} ({args.preset_reason})", file=sys.stderr)
        print(to_json(validate_spec(spec)))
        return 0
    if args.smoke:
        return smoke(spec, validate_spec(spec), not args.no_progress)
    validate_spec(spec)  # bad input found before the MLflow store is created
    open_storage(spec.storage, spec.heartbeat)
    check_store_uri(args.tracking_uri)  # an unreachable MLflow store fails before the ETA is measured
    notes = {"preset_reason": args.preset_reason, **print_eta(spec, validate_spec(spec), args.preset_reason)}
    parent_id = run_search(spec, Store(args.tracking_uri), progress=not args.no_progress, notes=notes)
    print(f"search {spec.name}: parent run {parent_id} in MLflow experiment {spec.experiment}")
    try:
        best = best_choice(spec.name, spec.storage)
    except UserError as exc:  # every trial pruned or failed: the search ran, there is just no winner yet
        print(exc)
        return 0
    pair = " ".join(f"{k}={v:.3g}" for k, v in best.overrides.items())
    print(f"best trial {best.trial} (final {best.metric.upper()} {best.value:.4g}): {pair}; use it with: "
          f"python -m studies.run NAME --lr-from {spec.name} --storage {spec.storage}")
    return 0


def print_eta(spec: SearchSpec, cfg: RunConfig, preset_reason: str) -> dict[str, object]:
    """Print the search's ETA, measured here: every trial run to its end (pruning can only shorten it); returns
    it as the parent run's tags."""
    from core.build import share_images
    from core.data import load_images
    from studies import eta
    images = share_images(cfg, load_images(cfg.data, cfg.model.resolution, roots=data_roots()))
    estimate = eta.estimate({"trial": cfg}, spec.trials, eta.measure({"trial": cfg}, images),
                            eta.reference_images_to_compute(cfg, images))
    per_worker = estimate.total_s / min(spec.workers, spec.trials)
    print(f"preset {spec.preset} ({preset_reason}); {estimate.line(f'search {spec.name}')}; about {eta.format_duration(per_worker)} over "
          f"{min(spec.workers, spec.trials)} worker(s) at most, less with pruning", file=sys.stderr)
    return {**estimate.tags(), "eta.per_worker_s": round(per_worker)}


def smoke(spec: SearchSpec, cfg: RunConfig, show_progress: bool) -> int:
    """--smoke: one trial's configuration at the lowest and at the highest learning rates of the range."""
    from ablations import get_ablation
    from core.data import load_images
    from studies.preflight import preflight
    images = load_images(cfg.data, cfg.model.resolution, progress=show_progress, roots=data_roots())
    ends = {f"lr={lr:g}": apply_overrides(cfg, {"optim.lr_g": lr, "optim.lr_d": lr}) for lr in spec.lr_range}
    hooks = get_ablation(spec.ablation).hooks(spec.variant) if spec.ablation else []
    print(f"preflight of search {spec.name} (preset {spec.preset})")
    return 0 if preflight(ends, images, lambda _: hooks) else 1


main = command(build_parser, search,
               interrupted="interrupted: finished trials are in the study; rerun the same command to add more")


if __name__ == "__main__":
    sys.exit(main())
