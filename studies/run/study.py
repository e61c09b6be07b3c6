"""A study: one ablation's variants x seeds, each a child MLflow run under one parent run.

    python -m studies.run pooling --seeds 3          # run_study: 3 variants x 3 seeds; run again, it resumes
    python -m studies.run pooling --seeds 3 --fresh  # a new study (a new parent run) instead of resuming

Configs are resolved in a fixed order: preset, then the --base variant, then the study variant, then CLI
--set flags. Every variant's config is resolved and validated before the first run starts, so a bad flag
never leaves half a study behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ablations import get_ablation
from core import config as config_mod
from core import identity
from core import records as rec
from core.config import RunConfig
from core import reference
from core.data import DeviceImages
from core.errors import UserError
from core.hooks import HookList
from core.runner import execute_run
from core.tracking import RunTracker, Store
from studies.lr_handoff import LrChoice
from studies.mlflow_view import study_view, view_key
from studies.run.provenance import provenance, study_note


@dataclass(frozen=True)
class StudySpec:
    ablation: str  # registered ablation name
    seeds: tuple[int, ...] = (0, 1, 2)  # one child run per variant and seed
    baseline_seeds: int = 0  # --baseline-seeds: the baseline's seeds, 0..N-1, where N > len(seeds); 0 = seeds
    preset: str = "default"  # a key of core.config.PRESETS
    base: tuple[tuple[str, str], ...] = ()  # (ablation, variant) pairs applied under every variant
    overrides: dict[str, object] = field(default_factory=dict)  # CLI --set and --data, applied last
    variants: tuple[str, ...] = ()  # subset of the ablation's variants; () = all (baseline always included)
    workdir: Path = Path("runs")  # run directories: checkpoints, sample grids, curves
    notes: dict[str, object] = field(default_factory=dict)  # parent-run tags only: the preset's choice, the ETA
    provenance: dict[str, object] = field(default_factory=dict)  # where overrides came from (--lr-from): params+tags
    reuse: bool = True  # a (config, seed) the store finished under the same content key is reused, not retrained
    stacked: tuple[tuple[str, str], ...] = ()  # combine: the (ablation, variant) winners its `stacked` variant stacks
    tune: int = 0  # --tune: trials of each variant's own learning-rate search; 0 = the config's rates for all
    tuned: dict[str, dict[str, float]] = field(default_factory=dict)  # --tune: variant -> its best trial's rates

    @property
    def experiment(self) -> str:
        """One MLflow experiment per study; a study over a base variant, or a tuned one, is its own experiment."""
        return self.ablation + "".join(f"@{a}={v}" for a, v in self.base) + (rec.TUNED_SUFFIX if self.tune else "")

    def seeds_of(self, variant: str) -> tuple[int, ...]:
        """The seeds a variant runs. The baseline may run more (--baseline-seeds): its error enters every
        comparison of the study (and of every study that shares it, which trains it once); its first seeds are
        the variants' own."""
        if variant != "baseline" or self.baseline_seeds <= len(self.seeds):
            return self.seeds
        extra = [s for s in range(self.baseline_seeds + len(self.seeds)) if s not in self.seeds]
        return self.seeds + tuple(extra[:self.baseline_seeds - len(self.seeds)])

    def with_lr(self, choice: LrChoice) -> StudySpec:
        """The same study on the learning rates of a search's best trial, recording where they came from."""
        return dataclasses.replace(self, overrides={**self.overrides, **choice.overrides},
                                   provenance={**self.provenance, **choice.provenance})


def resolve_configs(spec: StudySpec) -> dict[str, RunConfig]:
    """variant -> resolved config (seed set per run later); refuses overlapping settings."""
    ablation = get_ablation(spec.ablation)
    variants = {v: ablation.overrides(v) for v in ablation.variants}
    if spec.stacked:
        variants[STACKED] = stack(spec.stacked)
    varied = {k for overrides in variants.values() for k in overrides}
    base_layer: dict[str, object] = {}
    for name, variant in spec.base:
        if name == spec.ablation:
            raise UserError(f"--base {name}={variant} is the ablation under study; pick another ablation")
        layer = get_ablation(name).overrides(variant)
        clash = sorted(varied & layer.keys())
        if clash:
            raise UserError(f"--base {name}={variant} sets {', '.join(clash)}, which '{spec.ablation}' varies")
        overlap = sorted(base_layer.keys() & layer.keys())
        if overlap:
            raise UserError(f"--base {name}={variant} sets {', '.join(overlap)}, which another --base already sets")
        base_layer.update(layer)
    clash = sorted(varied & spec.overrides.keys())
    if clash:
        raise UserError(f"--set {', '.join(clash)} is varied by '{spec.ablation}'; drop it or pick another study")
    if "train.seed" in spec.overrides:
        raise UserError("set seeds with --seeds, not --set train.seed")
    names = list(spec.variants) or list(variants)
    if "baseline" not in names:
        names.insert(0, "baseline")
    for name in names:
        if name not in variants:
            ablation.overrides(name)  # the registry's one-line refusal, listing the known variants
    configs = {v: config_mod.resolve(spec.preset, base_layer, variants[v], {**spec.overrides, **spec.tuned.get(v, {})})
               for v in names}
    same = set(same_as_baseline(configs))
    return {v: c for v, c in configs.items() if v not in same}


def same_as_baseline(configs: dict[str, RunConfig]) -> list[str]:
    """The variants whose resolved config is the baseline's own (batch_64 under a preset that trains at batch
    64): a study leaves them out, since they would only compare the baseline with itself."""
    plain = config_mod.flatten(configs["baseline"])
    return [v for v, c in configs.items() if v != "baseline" and config_mod.flatten(c) == plain]


def left_out(spec: StudySpec, configs: dict[str, RunConfig]) -> list[str]:
    """What resolve_configs left out of the study (`configs`, its result): the asked-for variants that are the
    baseline's own config."""
    names = spec.variants or tuple(get_ablation(spec.ablation).variants)
    return [v for v in names if v != "baseline" and v not in configs]


STACKED = "stacked"  # ablations.combine's variant: every winner's overrides at once


def stack(winners: tuple[tuple[str, str], ...]) -> dict[str, object]:
    """The overrides of every (ablation, variant) winner as one layer; two that set the same key are refused."""
    layer: dict[str, object] = {}
    owner: dict[str, str] = {}
    for name, variant in winners:
        for key, value in get_ablation(name).overrides(variant).items():
            if key in layer:
                raise UserError(f"combine: {owner[key]} and {name}={variant} both set {key}; they cannot be "
                                "stacked (run the study over one with --base instead)")
            layer[key], owner[key] = value, f"{name}={variant}"
    return layer


def varied_keys(spec: StudySpec) -> set[str]:
    """The config keys the study's variants set (its ablation's, and combine's stacked winners')."""
    return get_ablation(spec.ablation).varied_keys() | (stack(spec.stacked).keys() if spec.stacked else set())


def study_key(spec: StudySpec, configs: dict[str, RunConfig]) -> str:
    """Identity of a study: same experiment, seeds and resolved configs = the same study, to be resumed."""
    more = {"baseline_seeds": list(spec.seeds_of("baseline"))} if spec.seeds_of("baseline") != spec.seeds else {}
    blob = json.dumps({"experiment": spec.experiment, "seeds": list(spec.seeds), **more,  # keys before it unchanged
                       "configs": {v: config_mod.flatten(c) for v, c in configs.items()}}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def run_study(spec: StudySpec, store: Store, images: DeviceImages, progress: bool = True, fresh: bool = False,
              train: Callable[[str, list[tuple[str, int]]], None] | None = None) -> str:
    """Run every variant x seed; returns the parent run id. `train(parent_id, jobs)`, where given, trains the
    (variant, seed) jobs still to run (studies/run/workers.py: as jobs of a queue, by worker processes and any
    that join from other machines); else they run one after another in this process.

    Re-running the same study resumes it: its unfinished parent run is reopened, finished child runs are
    skipped, and an interrupted child continues from its last checkpoint in the same MLflow run. A crashing
    run is recorded as failed and the study goes on; a diverged one is tagged and the study goes on. A run the
    store already finished under the same content key (core/identity.py), in any study, is reused (spec.reuse),
    and so is one that finished elsewhere while this study's copy was interrupted: the stale copy is discarded.
    """
    configs = resolve_configs(spec)
    key = study_key(spec, configs)
    previous = [] if fresh else store.find_runs(spec.experiment, f"tags.{rec.STUDY_KEY} = '{key}'")
    previous = sorted((r for r in previous if r.data.tags.get(rec.STUDY) == rec.PARENT), key=lambda r: -r.info.start_time)
    if previous and previous[0].info.status == "FINISHED":
        return previous[0].info.run_id  # already complete: nothing to train (--fresh --no-reuse repeats it)
    if previous:
        parent = store.resume_run(previous[0].info.run_id)
        done = {(r.data.tags[rec.VARIANT], int(r.data.tags[rec.SEED])): r
                for r in store.find_runs(spec.experiment, f"tags.{rec.PARENT_RUN} = '{parent.run_id}'")}
    else:
        parent = store.start_run(spec.experiment, f"{spec.experiment} {time.strftime('%Y-%m-%d %H:%M')}", {
            rec.STUDY: rec.PARENT, rec.STUDY_KEY: key, rec.ABLATION: spec.ablation, rec.PRESET: spec.preset,
            rec.BASE: ",".join(f"{a}={v}" for a, v in spec.base) or "none", rec.SEEDS: ",".join(map(str, spec.seeds)),
            rec.VARIANTS: ",".join(configs), **spec.provenance})
        describe_study(store, parent, spec, list(configs), config_mod.derive(next(iter(configs.values()))).primary_metric)
        parent.log_params({"study.preset": spec.preset, "study.seeds": list(spec.seeds),
                           "study.variants": list(configs), "study.base": dict(spec.base),
                           "study.overrides": spec.overrides, **spec.provenance})
        done = {}
    if spec.notes:  # this invocation's preset choice and ETA (a resumed study records its new estimate)
        parent.set_tags(spec.notes)
    logged_refs: set[str] = set()
    with parent.finishing():
        reference.ensure_reference(next(iter(configs.values())), images.image_set, progress)
        todo = [(v, s) for v in configs for s in spec.seeds_of(v)
                if done.get((v, s)) is None or not rec.Outcome.read(done[(v, s)].data.tags.get(rec.OUTCOME)).terminal]
        if train is not None:
            if todo:  # no worker to start for a study that only needs its report
                train(parent.run_id, todo)
        else:
            for variant, seed in todo:
                _run_one(spec, store, parent, variant, seed, seeded(configs[variant], seed), images, progress,
                         done.get((variant, seed)))
        for variant, seed in todo:
            _log_reference_once(parent, seeded(configs[variant], seed), images, logged_refs)
    return parent.run_id


DEFAULT_QUEUE = "sqlite:///optuna.db"  # the queue of local workers: the search's default storage, no server


def child_runs(store: Store, experiment: str, parent_id: str) -> dict[tuple[str, int], object]:
    """(variant, seed) -> the child run of parent `parent_id` (the newest where there are several)."""
    found = store.find_runs(experiment, f"tags.{rec.PARENT_RUN} = '{parent_id}'")
    return {(r.data.tags[rec.VARIANT], int(r.data.tags[rec.SEED])): r
            for r in sorted(found, key=lambda r: r.info.start_time)}


def run_one_job(spec: StudySpec, store: Store, parent: RunTracker, variant: str, seed: int, cfg: RunConfig,
                images: DeviceImages, progress: bool) -> str:
    """A queue's job: the run of (variant, seed), continued from its checkpoint in its own MLflow run where a
    worker that died left it unfinished, skipped where it has a result already; returns its MLflow run id."""
    earlier = child_runs(store, spec.experiment, parent.run_id).get((variant, seed))
    if earlier is not None and rec.Outcome.read(earlier.data.tags.get(rec.OUTCOME)).terminal:
        return earlier.info.run_id
    return _run_one(spec, store, parent, variant, seed, cfg, images, progress, earlier)


def describe_study(store: Store, parent: RunTracker, spec: StudySpec, variants: list[str], primary: str) -> None:
    """Provenance tags and the MLflow description on the parent run, and the study's saved view for the UI
    (led by the `primary` metric's final value)."""
    note = study_note(spec.experiment, variants, spec.seeds, spec.seeds_of("baseline"))
    parent.set_tags({**provenance(), "mlflow.note.content": note})
    varied = sorted(varied_keys(spec))
    refused = store.save_view(spec.experiment, view_key(parent.run_id), study_view(parent.run_id, varied, primary))
    if refused:  # the study still runs; its report links a URL filter instead of the view
        print(f"note: the MLflow store did not save the study's UI view ({refused})", file=sys.stderr)


def _run_one(spec: StudySpec, store: Store, parent: RunTracker, variant: str, seed: int, cfg: RunConfig,
             images: DeviceImages, progress: bool, earlier=None) -> str:
    """Train (or reuse, or continue) one run; returns its MLflow run id."""
    name = f"{variant}-s{seed}"
    hooks = get_ablation(spec.ablation).hooks(variant)
    key = identity.run_key(cfg, images.image_set.key, hooks)
    tags = {rec.ABLATION: spec.ablation, rec.VARIANT: variant, rec.SEED: seed, rec.PRESET: spec.preset,
            rec.BASE: ",".join(f"{a}={v}" for a, v in spec.base) or "none", rec.STUDY: rec.CHILD,
            rec.RUN_KEY: key, **spec.provenance}
    original = reusable(store, key) if spec.reuse else None
    if original is not None:
        if earlier is not None:  # interrupted here, finished elsewhere since (a copy killed halfway, another worker)
            store.discard_run(earlier.info.run_id)
        return reuse_run(store, spec.experiment, name, tags, parent, original)
    if earlier is not None:  # interrupted: same MLflow run and run directory, continued from its checkpoint
        child = store.resume_run(earlier.info.run_id)
    else:
        child = store.start_run(spec.experiment, name, tags, parent=parent)
    run_dir = spec.workdir / spec.experiment / child.run_id
    bar = _progress_bar(name, cfg) if progress else None
    try:
        execute_run(cfg, child, run_dir, images=images, hooks=HookList(hooks) if hooks else None,
                    on_log=bar and (lambda nimg, stats: _advance(bar, nimg, stats)), show_progress=progress)
        child.finish("FINISHED")
    except UserError:
        child.finish("FAILED")
        raise
    except KeyboardInterrupt:
        child.finish("KILLED")
        raise
    except Exception as exc:  # one broken run must not sink the study: record it and go on
        child.record_crash(exc, **{rec.OUTCOME: rec.Outcome.FAILED})
        child.finish("FAILED")
    finally:
        if bar is not None:
            bar.close()
    return child.run_id


def seeded(cfg: RunConfig, seed: int) -> RunConfig:
    """A variant's config for one of the study's seeds."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))


def runs_to_train(specs: list[StudySpec], configs: dict[str, dict[str, RunConfig]], data_key: str,
                  store: Store | None) -> list[dict[str, int]]:
    """Per study, per variant: how many of its seeds will train, the others being reused from the store (`None`:
    no store yet) or from an earlier study of the same invocation, which trains each distinct run once."""
    planned: set[str] = set()
    out = []
    for spec in specs:
        counts = {}
        for variant, cfg in configs[spec.experiment].items():
            hooks = get_ablation(spec.ablation).hooks(variant)
            counts[variant] = 0
            for seed in spec.seeds_of(variant):
                key = identity.run_key(seeded(cfg, seed), data_key, hooks)
                if spec.reuse and (key in planned or (store is not None and reusable(store, key) is not None)):
                    continue
                planned.add(key)
                counts[variant] += 1
        out.append(counts)
    return out


def reusable(store: Store, key: str):
    """The earliest run the store finished under content key `key` with a result (finished, diverged, collapsed,
    saturated D), not itself a reuse; None when there is none. A crashed or killed run is never reused."""
    for run in store.find_tagged(rec.RUN_KEY, key):
        tags = run.data.tags
        if (run.info.status == "FINISHED" and rec.REUSED_FROM not in tags
                and rec.Outcome.read(tags.get(rec.OUTCOME)).terminal):
            return run
    return None


def reuse_run(store: Store, experiment: str, name: str, tags: dict[str, object], parent: RunTracker,
              original) -> str:
    """Record `original` in this study as a child run tagged with where it came from: its params, its metrics'
    last values and its outcome tags are copied; its training history and artifacts stay with the original,
    which the report follows for curves and grids."""
    source = {rec.REUSED_FROM: original.info.run_id, rec.REUSED_STUDY: store.experiment_name(original.info.experiment_id)}
    kept = {k: v for k, v in original.data.tags.items() if not k.startswith("mlflow.") and k not in tags}
    child = store.start_run(experiment, name, tags, parent=parent)
    child.log_params(original.data.params)
    step = round(float(original.data.tags.get(rec.KIMG_TAG, 0)) * 1000)
    child.log_metrics(dict(original.data.metrics), step=step)
    child.set_tags({**kept, **source})  # the outcome last: a copy killed halfway is not a result, and is redone
    child.finish("FINISHED")
    return child.run_id


def _log_reference_once(parent: RunTracker, cfg: RunConfig, images: DeviceImages, logged: set[str]) -> None:
    """The FID reference statistics every child run was scored against, as an artifact of the parent."""
    key = reference.log_reference(parent, cfg, images.image_set, logged)
    if key is not None:
        logged.add(key)


def _progress_bar(name: str, cfg: RunConfig):
    from tqdm import tqdm
    total = config_mod.derive(cfg).steps * cfg.train.batch_size / 1000
    return tqdm(total=round(total, 2), desc=name, unit="kimg", dynamic_ncols=True, leave=True)


def _advance(bar, nimg: int, stats: dict) -> None:
    bar.n = round(nimg / 1000, 2)
    bar.set_postfix({k.split("/")[-1]: f"{stats[k]:.3g}" for k in (*rec.LOSS_KEYS, rec.IMG_PER_S) if k in stats},
                    refresh=True)
