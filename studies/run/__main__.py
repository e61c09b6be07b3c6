"""Run an ablation study: every variant x seed as MLflow child runs, then write reports/NAME.md.

    python -m studies.run pooling                          # GPU preset, 3 seeds, full CelebA or the subset
    python -m studies.run pooling --preset quick --seeds 2 # minutes on a CPU
    python -m studies.run pooling --data ~/celeba/img_align_celeba.zip --set train.kimg=500
    python -m studies.run pooling --base ttur=ttur         # pooling variants on top of TTUR learning rates
    python -m studies.run all --preset quick               # every study in turn
    python -m studies.run --list                           # every ablation and its variants
    python -m studies.run pooling --dry-run                # print the resolved configs and exit
    python -m studies.run pooling --lr-from lr-default     # best lr_g/lr_d of an Optuna study (studies.search)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ablations import get_ablation, list_ablations
from core.config import PRESETS, flatten, parse_set
from core.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="ablation to study (see --list), or 'all' for every study in turn")
    p.add_argument("--list", action="store_true", help="list ablations with their variants and exit")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant, 0..N-1 (default: 3)")
    p.add_argument("--preset", default="default", choices=None,
                   help=f"config preset: {' | '.join(PRESETS)} (default: default, the GPU preset)")
    p.add_argument("--data", default=None, help="CelebA folder, img_align_celeba.zip, or 'torchvision' "
                   "(default: $CELEBA_ROOT, ./data/celeba, then ../shared/data/celeba-subset)")
    p.add_argument("--base", action="append", default=[], metavar="ABLATION=VARIANT",
                   help="run the study on top of another ablation's variant (repeatable; default: none)")
    p.add_argument("--variants", default="", help="comma-separated subset of variants (default: all; baseline always runs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set train.kimg=500 (repeatable; default: none)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--workdir", type=Path, default=Path("runs"), help="checkpoints and samples (default: runs)")
    p.add_argument("--reports", type=Path, default=Path("reports"), help="report folder (default: reports)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config of each variant and exit")
    p.add_argument("--fresh", action="store_true",
                   help="start a new study even if the same one was interrupted or finished (default: resume it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown)")
    from studies.search.orchestrate import add_lr_flags
    add_lr_flags(p)  # --lr-from, --search-lr, --search-trials, --storage
    return p


def list_text() -> str:
    lines = []
    for name in list_ablations():
        ablation = get_ablation(name)
        lines.append(f"{name:16s} {ablation.summary}")
        for variant, overrides in ablation.variants.items():
            shown = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "(plain configuration)"
            lines.append(f"    {variant:20s} {shown}")
    return "\n".join(lines)


def specs_from_args(args: argparse.Namespace) -> list:
    """One StudySpec per study to run: the named one, or every registered study for 'all'."""
    from studies.run.study import StudySpec, parse_base

    if args.seeds < 1:
        raise UserError(f"--seeds {args.seeds} must be >= 1")
    base = parse_base(args.base)
    if args.name == "all":
        if args.variants:
            raise UserError("--variants names variants of one study; it cannot be combined with 'all'")
        # the baseline-only study adds nothing that every other study does not already run
        names = [n for n in list_ablations() if n != "baseline" and n not in {a for a, _ in base}]
    else:
        get_ablation(args.name)  # unknown names fail here, listing the known ones
        names = [args.name]
    overrides: dict[str, object] = dict(parse_set(args.set))
    if args.data is not None:
        overrides["data.root"] = args.data
    return [StudySpec(ablation=name, seeds=tuple(range(args.seeds)), preset=args.preset, base=base,
                      overrides=overrides, variants=tuple(v for v in args.variants.split(",") if v),
                      workdir=args.workdir) for name in names]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.list:
            print(list_text())
            return 0
        if not args.name:
            raise UserError(f"name an ablation to study; known: {', '.join(list_ablations())} (or --list)")
        specs = specs_from_args(args)
        from studies.search.orchestrate import lr_for_study
        specs = [lr_for_study(spec, args) for spec in specs]  # unchanged unless --lr-from or --search-lr
        from studies.run.study import resolve_configs, run_study

        configs = {spec.experiment: resolve_configs(spec) for spec in specs}  # every error before any run
        if args.dry_run:
            print(json.dumps({name: {v: flatten(c) for v, c in cfgs.items()} for name, cfgs in configs.items()},
                             indent=2))
            return 0
        from core.data import load_images
        from core.tracking import Store
        from studies.report.build import write_report

        # data first: a missing or corrupt dataset must fail before the tracking store is touched
        first = next(iter(configs[specs[0].experiment].values()))
        images = load_images(first.data, first.model.resolution, progress=not args.no_progress)
        store = Store(args.tracking_uri)
        for spec in specs:
            parent_id = run_study(spec, store, images, progress=not args.no_progress, fresh=args.fresh)
            report = write_report(store, spec.experiment, args.reports, parent_id)
            print(f"study {spec.experiment}: parent run {parent_id}; report {report}")
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished runs are in MLflow; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
