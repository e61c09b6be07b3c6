"""Run an ablation study: every variant x seed as MLflow child runs, then write reports/NAME.md.

    python -m studies.run pooling                          # preset auto: 'default' on a GPU, 'cpu' without one
    python -m studies.run pooling --preset quick --seeds 2 # tests and --smoke only: a few minutes, noise samples
    python -m studies.run pooling --preset default --yes   # the 128 px GPU preset even where its ETA is days
    python -m studies.run pooling --data ~/celeba/img_align_celeba.zip --set train.kimg=500
    python -m studies.run pooling --base ttur=ttur         # pooling variants on top of TTUR learning rates
    python -m studies.run all --preset quick               # every study in turn, each distinct run trained once
    python -m studies.run pooling,ttur,n_dis               # these three, their shared baseline trained once
    python -m studies.run pooling --no-reuse               # train even runs another study already finished
    python -m studies.run --list                           # every ablation and its variants
    python -m studies.run pooling --dry-run                # print the resolved configs and exit
    python -m studies.run pooling --smoke                  # preflight every variant on this device (minutes)
    python -m studies.run pooling --lr-from lr-default     # best lr_g/lr_d of an Optuna study (studies.search)
    python -m studies.run combine                          # the winners of reports/ stacked, against the baseline
    python -m studies.run pooling --tune 6                 # then each variant at its own best rates, 6 trials each
    python -m studies.run pooling --workers 4              # 4 local workers (one per GPU, or cores/4 threads each)
    python -m studies.run --join pooling --queue postgresql://me@db/optuna --tracking-uri http://mlflow:5000
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from pathlib import Path

from ablations import get_ablation, list_ablations
from core.build import share_images
from core.config import flatten
from core.device import choose_preset
from core.errors import UserError
from studies.cli import add_flags, command, data_roots, overrides_from, parse_base
from studies.lr_handoff import LrRequest, check_study
from studies.run.study import DEFAULT_QUEUE, StudySpec, left_out, resolve_configs, run_study, runs_to_train
from studies.run.tune import request as tune_request
from studies.run.tune import run_tuned, tunable
from studies.run.workers import check_queue, default_workers, eta_workers, run_workers


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="ablation to study (see --list), a comma-separated list of them "
                   "(pooling,ttur,n_dis), or 'all' for every study in turn; each distinct run trains once")
    p.add_argument("--list", action="store_true", help="list ablations with their variants and exit")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant, 0..N-1 (default: 3)")
    p.add_argument("--baseline-seeds", type=int, default=0, metavar="N",
                   help="the baseline's seeds, 0..N-1, N >= --seeds: its error enters every comparison, and it "
                        "trains once for every study that shares it (default: as --seeds)")
    add_flags(p, "--preset", "--data")
    p.add_argument("--base", action="append", default=[], metavar="ABLATION=VARIANT",
                   help="run the study on top of another ablation's variant (repeatable; default: none)")
    p.add_argument("--variants", default="", help="comma-separated subset of variants (default: all; baseline always runs)")
    add_flags(p, "--set", "--tracking-uri")
    p.add_argument("--workdir", type=Path, default=Path("runs"), help="checkpoints and samples (default: runs)")
    p.add_argument("--reports", type=Path, default=Path("reports"), help="report folder (default: reports)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config of each variant and exit")
    p.add_argument("--yes", action="store_true", help="run even when the measured ETA exceeds 12 hours "
                   "(default: refuse such a study with its ETA)")
    p.add_argument("--smoke", action="store_true", help="preflight: a few steps, a checkpoint round trip, a grid and "
                   "FID/KID of every variant on this device; one line each; exit 0 only if all pass; writes no "
                   "runs (default: off)")
    p.add_argument("--fresh", action="store_true",
                   help="start a new study even if the same one was interrupted or finished; with --no-reuse its runs train "
                        "again (default: resume it)")
    p.add_argument("--no-reuse", action="store_true",
                   help="train every run, even one the store already finished under the same content key (same "
                        "config, seed, data, metric protocol and core code) in another study (default: reuse it)")
    add_flags(p, "--no-progress")
    w = p.add_argument_group("workers: the runs as jobs of a queue in an Optuna storage (studies/search/queue.py)")
    w.add_argument("--workers", type=int, default=None,
                   help="local worker processes, each on its own GPU or on cores/N threads (default: one per "
                        "visible GPU with CUDA, 1 without: the runs one after another in this process)")
    w.add_argument("--join", metavar="STUDY", default=None,
                   help="join the running study STUDY as one more worker (from any machine reaching --queue and "
                        "--tracking-uri); it stops when no run is left (default: off)")
    w.add_argument("--queue", default=None, metavar="URL",
                   help="Optuna storage holding the queue: sqlite:///FILE.db, postgresql://USER@HOST/DB or "
                        "journal:PATH; giving it lets workers --join (default: sqlite:///optuna.db with --workers "
                        "> 1, no queue with 1 worker)")
    w.add_argument("--heartbeat", type=int, default=60,
                   help="seconds between a running job's heartbeats; silent for 3x that, its worker counts as dead "
                        "and the run is taken over from its last checkpoint (default: 60)")
    g = p.add_argument_group("learning rates from an Optuna search (python -m studies.search)")
    g.add_argument("--lr-from", metavar="STUDY", default=None,
                   help="use the best lr_g, lr_d (and beta1) of this Optuna study (default: the config's own)")
    g.add_argument("--search-lr", action="store_true", help="first add --search-trials trials to the study "
                   "--lr-from (default name lr-PRESET[@BASE]), then run the study with its best pair (default: off)")
    g.add_argument("--search-trials", type=int, default=20, help="trials --search-lr adds (default: 20)")
    g.add_argument("--tune", type=int, default=0, metavar="N",
                   help="after the study, give every variant (baseline included) its own search of N trials over "
                        "lr_g and lr_d, the same budget for all, and run the study again at each variant's best pair "
                        "as NAME+tuned, whose report gives both verdicts (default: 0, off)")
    g.add_argument("--tune-kimg", type=float, default=0.0,
                   help="training length of a --tune trial in kimg (default: 0 = a quarter of train.kimg)")
    add_flags(g, "--storage")
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


def specs_from_args(args: argparse.Namespace) -> list[StudySpec]:
    """One StudySpec per study to run: the named ones, or every registered study for 'all'."""
    if args.seeds < 1:
        raise UserError(f"--seeds {args.seeds} must be >= 1")
    if args.baseline_seeds and args.baseline_seeds < args.seeds:
        raise UserError(f"--baseline-seeds {args.baseline_seeds} must be >= --seeds {args.seeds} (the baseline runs "
                        "every seed the variants run)")
    base = parse_base(args.base)
    preset, why = choose_preset(args.preset)
    asked = [n for n in args.name.split(",") if n]
    if len(asked) > 1 and args.variants:
        raise UserError("--variants names variants of one study; it cannot be combined with several studies")
    if asked == ["all"]:
        if args.variants:
            raise UserError("--variants names variants of one study; it cannot be combined with 'all'")
        # the baseline-only study adds nothing that every other study does not already run
        # combine stacks what the others find: it runs after them, on its own (python -m studies.run combine)
        names = [n for n in list_ablations() if n not in ("baseline", "combine") and n not in {a for a, _ in base}]
    else:
        for name in asked:
            get_ablation(name)  # unknown names fail here, listing the known ones ('all' only alone)
        names = list(dict.fromkeys(asked))
    specs = [StudySpec(ablation=name, seeds=tuple(range(args.seeds)), baseline_seeds=args.baseline_seeds,
                       preset=preset, base=base,
                       overrides=overrides_from(args), variants=tuple(v for v in args.variants.split(",") if v),
                       workdir=args.workdir, notes={"preset_reason": why}, reuse=not args.no_reuse) for name in names]
    return [stacked(s, args.reports) if s.ablation == "combine" else s for s in specs]


def stacked(spec: StudySpec, reports: Path) -> StudySpec:
    """The combine study: its `stacked` variant made of the winners the campaign summary in `reports` shows for
    this preset (one line and exit 2 when there is none to stack)."""
    from studies.report import set_apart, winners
    found = tuple(winners(reports, spec.preset))
    for line in set_apart(reports, spec.preset):
        print(f"combine: {line}")
    if not found:
        raise UserError(f"combine: no report in {reports} of preset {spec.preset} shows a variant better than its "
                        "baseline; nothing to stack (run the studies first: python -m studies.run all)")
    return dataclasses.replace(spec, stacked=found,
                               notes={**spec.notes, STACKED_TAG: ",".join(f"{a}={v}" for a, v in found)})


STACKED_TAG = "stacked"  # the combine study's parent run: the winners it stacks, "pooling=avgpool,ttur=ttur"


def take_lr(spec: StudySpec, args: argparse.Namespace) -> StudySpec:
    """The study with the best LRs of an Optuna search (searched first with --search-lr); unchanged without
    --lr-from or --search-lr, and with --search-lr --dry-run (the search would decide them)."""
    if not (args.lr_from or args.search_lr):
        return spec
    if args.search_trials < 1:
        raise UserError(f"--search-trials {args.search_trials} must be >= 1")
    check_study(spec.ablation, get_ablation(spec.ablation).varied_keys(), spec.overrides)
    request = LrRequest(study=args.lr_from or "", storage=args.storage,
                        search_trials=args.search_trials if args.search_lr else 0, preset=spec.preset,
                        base=spec.base, overrides=spec.overrides, workdir=spec.workdir)
    import studies.search as search  # Optuna is imported only when a study asks for a search
    if args.search_lr and args.dry_run:
        search.check_lr_request(request)
        return spec
    store = None
    if args.search_lr:
        from core.tracking import Store
        store = Store(args.tracking_uri)
    return spec.with_lr(search.choose_lr(request, store, progress=not args.no_progress))


def run(args: argparse.Namespace) -> int:
    if args.list:
        print(list_text())
        return 0
    if args.join:
        from studies.run.workers import join
        if not args.queue:
            raise UserError("--join needs --queue URL: the Optuna storage the study's launcher used")
        ran = join(args.join, args.queue, args.tracking_uri, args.heartbeat, args.data, progress=not args.no_progress)
        print(f"joined study {args.join}: trained {ran} runs; no run is left to take")
        return 0
    workers = args.workers if args.workers is not None else default_workers()
    if workers < 1:
        raise UserError(f"--workers {workers} must be >= 1")
    if not args.name:
        raise UserError(f"name an ablation to study; known: {', '.join(list_ablations())} (or --list)")
    specs = specs_from_args(args)
    if args.tune:
        specs = tunable(specs, args, every=args.name == "all")
    specs = [take_lr(spec, args) for spec in specs]
    configs = {spec.experiment: resolve_configs(spec) for spec in specs}  # every error before any run
    for spec in specs:
        for variant in left_out(spec, configs[spec.experiment]):
            print(f"{spec.experiment}: {variant} left out: under preset {spec.preset} it is the baseline's own config",
                  file=sys.stderr)
    requests = {s.experiment: tune_request(s, list(configs[s.experiment]), args, workers) for s in specs} if args.tune else {}
    trial_configs = {}  # per study, per variant: a --tune trial's config (every search's bad input found here)
    if requests:
        import studies.search as search  # Optuna is imported only when a study asks for a search
        trial_configs = {name: search.check_tune(req) for name, req in requests.items()}
    if args.dry_run:
        print(f"preset {specs[0].preset} ({specs[0].notes['preset_reason']})", file=sys.stderr)
        if requests:
            print(f"--tune {args.tune}: then every variant again at its own best lr_g, lr_d (searched)", file=sys.stderr)
        print(json.dumps({name: {v: flatten(c) for v, c in cfgs.items()} for name, cfgs in configs.items()}, indent=2))
        return 0
    from core.data import load_images
    from core.tracking import Store, check_store_uri
    from studies.report import write_report

    check_store_uri(args.tracking_uri)  # an unreachable store fails in milliseconds, before the ETA's minute
    if (workers > 1 or args.queue) and not args.smoke:  # so does an unreachable queue (--smoke needs none)
        check_queue(args.queue, args.heartbeat)
    # data first: a missing or corrupt dataset must fail before the tracking store is touched
    first = next(iter(configs[specs[0].experiment].values()))
    images = load_images(first.data, first.model.resolution, progress=not args.no_progress, roots=data_roots())
    if args.smoke:
        return smoke(specs, configs, images)
    shared = share_images(first, images)  # on the device once for every study and run of this process
    store = existing_store(args.tracking_uri)  # what it already finished is reused, and not in the ETA
    plans = runs_to_train(specs, configs, images.key, store)
    tunes = [tune_work(requests[s.experiment], trial_configs[s.experiment], s) for s in specs] if requests else None
    specs, eta_line = with_eta(specs, configs, shared, args.yes, progress=not args.no_progress, plans=plans,
                               workers=workers, tunes=tunes)
    store = store or Store(args.tracking_uri)  # a store that cannot be opened fails here, before any line is printed
    print(eta_line, file=sys.stderr)

    def study(spec: StudySpec) -> str:
        train = (functools.partial(run_workers, spec, store, url=args.queue or DEFAULT_QUEUE, heartbeat_s=args.heartbeat,
                                   workers=workers, progress=not args.no_progress)
                 if workers > 1 or args.queue else None)  # train(parent_id, jobs): the runs as jobs of a queue
        parent_id = run_study(spec, store, shared, progress=not args.no_progress, fresh=args.fresh, train=train)
        report = write_report(store, spec.experiment, args.reports, parent_id)
        print(f"study {spec.experiment}: parent run {parent_id}; report {report}")
        return parent_id

    for spec in specs:
        plain = study(spec)
        if requests:  # the searches, then the tuned study, whose report sets both verdicts side by side
            study(run_tuned(spec, requests[spec.experiment], store, plain, progress=not args.no_progress))
    return 0


def tune_work(req, trial_configs: dict, spec: StudySpec) -> dict[str, dict]:
    """What --tune adds to a study's ETA: per variant, the trials its search still runs, with a trial's config,
    and the tuned study's runs (all of them: the rates they train at are not known before the searches)."""
    import studies.search as search
    return {"trials": search.trials_left(req), "trial_configs": trial_configs,
            "runs": {v: len(spec.seeds_of(v)) for v in trial_configs}}


def existing_store(uri: str | None):
    """The tracking store, where one exists already (a server, or a SQLite file on disk), to look up runs to reuse;
    None for a SQLite file not created yet: nothing to reuse, and a refused study must not create it."""
    from core.tracking import Store, store_uri
    resolved = store_uri(uri)
    if resolved.startswith("sqlite:///") and not Path(resolved[len("sqlite:///"):]).is_file():
        return None
    return Store(resolved)


def with_eta(specs: list[StudySpec], configs: dict[str, dict], images, yes: bool, progress: bool = False,
             plans: list[dict[str, int]] | None = None, workers: int = 1,
             tunes: list[dict[str, dict]] | None = None) -> tuple[list[StudySpec], str]:
    """Measure the ETA of the whole invocation (specs carry it for the parent run, and its line to print);
    refuse one over 12 hours without --yes. plans: per study, per variant, the runs that will train (the
    others are reused: not timed, not counted); None = every run trains. tunes: per study, what --tune adds
    (tune_work)."""
    from studies import eta
    estimates, probed, measured = [], False, []
    for i, spec in enumerate(specs):
        cfgs = configs[spec.experiment]
        plan = plans[i] if plans is not None else {v: len(spec.seeds_of(v)) for v in cfgs}
        work = tunes[i] if tunes else None
        reused = sum(len(spec.seeds_of(v)) for v in cfgs) - sum(plan.values())
        # only what will train is timed; a trial or a tuned run trains the variant's model
        training = {v: c for v, c in cfgs.items() if plan[v] or (work and (work["trials"][v] or work["runs"][v]))}
        reference_images = eta.reference_images_to_compute(next(iter(cfgs.values())), images)

        def estimate(timings: eta.Timings, refs: int = reference_images) -> eta.Estimate:
            e = eta.estimate(cfgs, plan, timings, refs, reused)
            return e if work is None else e.plus(eta.estimate(work["trial_configs"], work["trials"], timings, 0),
                                                 eta.estimate(cfgs, work["runs"], timings, 0))
        if not training:
            estimates.append(estimate(eta.Timings({}, math.inf), 0))
            continue
        if not yes and eta.worth_probing(training, len(spec.seeds)):  # refused from seconds, not minutes, of timing
            rough = estimate(eta.probe(training, images))
            if rough.total_s > eta.CLEAR_FACTOR * eta.LONG_ETA_S:
                estimates.append(rough)
                probed = True
                break
        measured.append(eta.measure(training, images, progress))
        estimates.append(estimate(measured[-1]))
    cuda = images.device.type == "cuda"
    estimates = [dataclasses.replace(e, total_s=eta_workers(e.total_s, e.runs + e.trials, workers, cuda))
                 for e in estimates]
    total = sum(e.total_s for e in estimates)
    what = f"{len(specs)} studies" if len(specs) > 1 else f"study {specs[0].experiment}"
    reused, trials = sum(e.reused for e in estimates), sum(e.trials for e in estimates)
    line = (estimates[0].line(what) if len(specs) == 1
            else f"ETA {eta.format_duration(total)} for {what} ({sum(e.runs for e in estimates)} runs to train"
                 + (f", {reused} reused" if reused else "") + (f", {trials} tuning trials" if trials else "") + ")")
    if probed:
        line = (f"ETA roughly {eta.format_duration(total)} for {what} (from one step at batch {eta.PROBE_BATCH} and "
                f"{eta.PROBE_BATCH} images through Inception: far over 12 hours, so not measured further)")
    if workers > 1:
        line += (f"; over {workers} workers, one GPU each" if cuda else
                 f"; {workers} workers share this CPU's cores, so the total is as measured with all of them")
    line = f"preset {specs[0].preset} ({specs[0].notes['preset_reason']}); {line}{eta.load_note(measured)}"
    if total > eta.LONG_ETA_S and not yes:
        raise UserError(f"{line}: over 12 hours on this machine; pass --yes to run it anyway, "
                        "or --preset auto for the preset that fits this hardware")
    return [dataclasses.replace(s, notes={**s.notes, **e.tags()}) for s, e in zip(specs, estimates)], line


def smoke(specs: list[StudySpec], configs: dict[str, dict], images) -> int:
    """--smoke: the preflight of every variant of every study; exit 1 when any fails."""
    from studies.preflight import preflight
    ok = True
    for spec in specs:
        ablation = get_ablation(spec.ablation)
        print(f"preflight of {spec.experiment} ({len(configs[spec.experiment])} variants, preset {spec.preset})")
        ok &= preflight(configs[spec.experiment], images, ablation.hooks)
    return 0 if ok else 1


main = command(build_parser, run,
               interrupted="interrupted: finished runs are in MLflow; rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
