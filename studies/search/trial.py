"""One trial of the learning-rate search: its spec and config, the sampler and pruner, the objective.

    python -m studies.search --preset quick --trials 20 --evals 5 --trial-kimg 50   # 20 Objective calls

The objective trains one shortened run through core.runner.execute_run as an MLflow child run and returns the
final value of the metric the study's verdict will compare (`derived.primary_metric`: KID under the `cpu` and
`quick` presets, FID under `default`); a hook hands every intermediate value of that metric to Optuna so the
pruner can stop hopeless trials early.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna

from ablations import get_ablation
from core import config as config_mod
from core import records as rec
from core.config import RunConfig
from core.data import DeviceImages
from core.errors import UserError
from core.hooks import HookList, Hooks
from core.runner import execute_run
from core.tracking import RunTracker, Store
from studies.lr_handoff import BETA1_KEY, DEFAULT_STORAGE, LR_KEYS
from studies.search.storage import Heartbeat, quiet_experimental

BETA1_RANGE = (0.0, 0.9)  # --search-beta1: no momentum (WGAN-GP's choice) up to Adam's own default
MACHINE_KEYS = ("data.root", "data.cache_dir", "train.device", "eval.weights")  # may differ between workers


class TrialFailed(Exception):
    """A trial without a usable objective (non-finite losses or metric, a crash): Optuna's FAIL, never a best value."""


@dataclass(frozen=True)
class SearchSpec:
    study: str = ""  # Optuna study name; '' = lr-PRESET[-ABLATION=VARIANT][@BASE=VARIANT...]
    storage: str = DEFAULT_STORAGE  # SQLAlchemy URL, journal:PATH or PATH.journal
    trials: int = 20  # trials this invocation adds, shared out over its workers
    workers: int = 1  # local worker processes
    ablation: str = ""  # search on top of this ablation's variant; '' = the plain configuration
    variant: str = "baseline"  # variant of `ablation`
    base: tuple[tuple[str, str], ...] = ()  # (ablation, variant) pairs under everything, as in studies.run
    preset: str = "default"  # a key of core.config.PRESETS
    overrides: dict[str, object] = field(default_factory=dict)  # --set and --data
    lr_range: tuple[float, float] = (1e-5, 1e-3)  # log-uniform range of lr_g and lr_d
    search_beta1: bool = False  # also search Adam beta1, uniform over BETA1_RANGE
    trial_kimg: float = 0.0  # training length of one trial; 0 = a quarter of the resolved train.kimg
    evals: int = 5  # intermediate evaluations per trial, reported to the pruner (plus the final one)
    seed: int = 0  # TPE sampler seed
    trial_seed: int = -1  # train.seed of trial k is trial_seed + k (--tune: disjoint from the verdict's seeds);
                          # -1 = the resolved config's own seed for every trial
    heartbeat: Heartbeat = Heartbeat()  # how dead workers' trials are found (seconds) and retried
    workdir: Path = Path("runs")  # trial run directories: checkpoints, samples, curves

    @property
    def name(self) -> str:
        if self.study:
            return self.study
        variant = f"-{self.ablation}={self.variant}" if self.ablation and self.variant != "baseline" else ""
        return f"lr-{self.preset}{variant}" + "".join(f"@{a}={v}" for a, v in self.base)

    @property
    def experiment(self) -> str:
        return f"search-{self.name}"

    @property
    def searched(self) -> tuple[str, ...]:
        return LR_KEYS + ((BETA1_KEY,) if self.search_beta1 else ())


def _layers(spec: SearchSpec) -> list[dict[str, object]]:
    """The --base variants and the --ablation variant, refusing any that sets a searched key."""
    named = [(a, v, "--base") for a, v in spec.base] + ([(spec.ablation, spec.variant, "--ablation")] if spec.ablation else [])
    layers = []
    for name, variant, flag in named:
        layer = get_ablation(name).overrides(variant)
        clash = sorted(set(spec.searched) & layer.keys())
        if clash:
            raise UserError(f"{flag} {name}={variant} sets {', '.join(clash)}: LR search makes no sense on top of it")
        layers.append(layer)
    return layers


def trial_config(spec: SearchSpec, params: dict[str, float]) -> RunConfig:
    """The config of one trial: the usual layers, then the search's (length, FID schedule, searched keys)."""
    layers = _layers(spec)
    cfg = config_mod.resolve(spec.preset, *layers, spec.overrides)
    kimg = spec.trial_kimg or cfg.train.kimg / 4
    search = {"train.kimg": kimg, "eval.fid_every_kimg": kimg / (spec.evals + 1) if spec.evals else 0.0, **params}
    return config_mod.resolve(spec.preset, *layers, spec.overrides, search)


def validate_spec(spec: SearchSpec) -> RunConfig:
    """Every bad input found before anything is written; returns the trial config at the ranges' middle."""
    lo, hi = spec.lr_range
    checks = [(spec.trials >= 1, f"--trials {spec.trials} must be >= 1"),
              (spec.workers >= 1, f"--workers {spec.workers} must be >= 1"),
              (0 < lo < hi and math.isfinite(hi), f"--lr-min {lo:g} and --lr-max {hi:g} need 0 < min < max"),
              (spec.evals >= 0, f"--evals {spec.evals} must be >= 0"),
              (spec.trial_kimg >= 0, f"--trial-kimg {spec.trial_kimg:g} must be >= 0 (0 = a quarter of train.kimg)"),
              (spec.heartbeat.interval_s >= 1, "--heartbeat must be >= 1 second")]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    if spec.ablation in dict(spec.base):
        raise UserError(f"--ablation {spec.ablation} is also a --base; use one of them")
    clash = sorted(set(spec.searched) & spec.overrides.keys())
    if clash:
        raise UserError(f"--set {', '.join(clash)} is what the search varies; drop it")
    middle = {k: math.sqrt(lo * hi) for k in LR_KEYS} | ({BETA1_KEY: sum(BETA1_RANGE) / 2} if spec.search_beta1 else {})
    return trial_config(spec, middle)


def objective_metric(cfg: RunConfig) -> str:
    """The metric a search minimises: the one the study's verdict compares (fid | kid)."""
    return config_mod.derive(cfg).primary_metric


def definition(spec: SearchSpec, cfg: RunConfig) -> dict[str, object]:
    """What makes two invocations the same search: stored on the study, compared on resume.

    The objective's key is part of it: trial values of FID and of KID must never meet in one study."""
    out = {k: v for k, v in config_mod.flatten(cfg).items() if k not in MACHINE_KEYS and k not in spec.searched}
    out.update({"search.objective": objective_metric(cfg),  # the family whose final value trials return
                "search.preset": spec.preset, "search.lr_range": list(spec.lr_range),
                "search.beta1_range": list(BETA1_RANGE) if spec.search_beta1 else None})
    if spec.trial_seed >= 0:  # only then: a search from before trial seeds existed still resumes
        out["search.trial_seed"] = spec.trial_seed
    return json.loads(json.dumps(out))


def trial_seed(spec: SearchSpec, number: int) -> dict[str, int]:
    """The train.seed override of trial `number` (none where the spec keeps the config's seed)."""
    return {"train.seed": spec.trial_seed + number} if spec.trial_seed >= 0 else {}


ENDED_ATTR = "ended"  # a trial's user attribute once it ended by its own doing (complete, pruned, failed), not
                      # interrupted: such trials spent the budget (studies/search/tune.py counts them)


def spent(study: optuna.Study) -> int:
    """Trials that used up budget: complete, pruned, or failed on their own (diverged, crashed); a trial whose
    worker was interrupted or killed is not counted, so a resumed search runs its slot again."""
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in done or (t.state == optuna.trial.TrialState.FAIL and ENDED_ATTR in t.user_attrs))


def make_sampler(spec: SearchSpec, n_before: int, worker: int) -> optuna.samplers.BaseSampler:
    # Multivariate TPE models lr_g and lr_d jointly: their balance (the TTUR ratio) matters as much as either.
    # constant_liar stops concurrent workers from proposing the same point. Each worker, and each resumed
    # invocation, gets its own seed derived from --seed, or they would replay the same random startup points.
    seed = int(np.random.SeedSequence([spec.seed, n_before, worker]).generate_state(1)[0])
    with quiet_experimental():
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


def make_pruner() -> optuna.pruners.BasePruner:
    # FID or KID from a few thousand samples is noisy (jitter between evaluations of the same G), and a GAN's
    # metric curve is not monotone: it spikes and recovers. A bare median rule kills a trial on one bad
    # evaluation. PatientPruner lets it act only once the trial's value has not improved on its best for
    # `patience` evaluations in a row; MedianPruner then compares the trial's best value so far (not its
    # latest) with the median of finished trials at the same images seen (steps are nimg, identical for all
    # trials of a study), and only after 5 trials have finished, so the median means something.
    with quiet_experimental():
        return optuna.pruners.PatientPruner(optuna.pruners.MedianPruner(n_startup_trials=5), patience=1)


class ReportMetric(Hooks):
    """Hands each training-time value of the objective's metric to the trial; stops training when Optuna prunes
    or the value is not finite."""

    def __init__(self, trial: optuna.Trial, cfg: RunConfig):
        self.trial = trial
        family = objective_metric(cfg)
        self.key = rec.train_key(family, cfg.eval.fid_samples)  # kid/kid128: the metric on the training count
        self.final = rec.final_key(family)
        self.pruned_at: int | None = None  # nimg
        self.nonfinite_at: int | None = None

    def on_eval(self, kimg: float, metrics: dict[str, float]) -> bool:
        if self.final in metrics:  # the final value (more samples) is the objective value, not a report
            return False
        nimg = round(kimg * 1000)
        value = metrics[self.key]
        if not math.isfinite(value):
            self.nonfinite_at = nimg
            return True
        self.trial.report(value, step=nimg)
        if self.trial.should_prune():
            self.pruned_at = nimg
            return True
        return False


class Objective:
    """One trial: suggest, resolve the config, train as an MLflow child run, return its final primary metric."""

    def __init__(self, spec: SearchSpec, store: Store, parent: RunTracker, images: DeviceImages, worker: int):
        self.spec, self.store, self.parent, self.images, self.worker = spec, store, parent, images, worker

    def suggest(self, trial: optuna.Trial) -> dict[str, float]:
        lo, hi = self.spec.lr_range
        params = {"lr_g": trial.suggest_float("lr_g", lo, hi, log=True),
                  "lr_d": trial.suggest_float("lr_d", lo, hi, log=True)}
        if self.spec.search_beta1:
            params["beta1"] = trial.suggest_float("beta1", *BETA1_RANGE)
        return params

    def __call__(self, trial: optuna.Trial) -> float:
        params = self.suggest(trial)
        cfg = trial_config(self.spec, {f"optim.{k}": v for k, v in params.items()} | trial_seed(self.spec, trial.number))
        tags = {rec.SEARCH: rec.TRIAL, rec.STUDY: self.spec.name, rec.TRIAL: trial.number, "worker": self.worker,
                rec.TRIAL_STATE: rec.TrialState.RUNNING}
        if "trial_number" in trial.user_attrs:  # re-queued after its worker's heartbeat stopped: attrs are copied
            tags.update({"retry_of": trial.user_attrs["trial_number"], "retry_of_run": trial.user_attrs["mlflow_run_id"]})
        child = self.store.start_run(self.spec.experiment, f"trial-{trial.number:03d}", tags, parent=self.parent)
        for key, value in (("trial_number", trial.number), ("mlflow_run_id", child.run_id),
                           ("search_parent", self.parent.run_id)):
            trial.set_user_attr(key, value)
        child.log_params({"trial.number": trial.number, **{f"trial.{k}": v for k, v in params.items()}})
        extra = get_ablation(self.spec.ablation).hooks(self.spec.variant) if self.spec.ablation else []
        report = ReportMetric(trial, cfg)
        family = objective_metric(cfg)
        state, status = rec.TrialState.FAILED, "FAILED"
        try:
            result = execute_run(cfg, child, self.spec.workdir / self.spec.experiment / child.run_id,
                                 images=self.images, hooks=HookList([report, *extra]))
            if result.status == rec.Outcome.DIVERGED:
                raise TrialFailed(f"non-finite losses at {result.diverged_at} images")
            label = rec.LABEL[family]
            if report.nonfinite_at is not None:
                raise TrialFailed(f"non-finite {label} at {report.nonfinite_at} images")
            if report.pruned_at is not None:
                state, status = rec.TrialState.PRUNED, "FINISHED"
                raise optuna.TrialPruned(f"{label} no better than the median at {report.pruned_at} images")
            value = result.final.get(family)
            if value is None or not math.isfinite(value):
                raise TrialFailed(f"final {label} is {value}")
            state, status = rec.TrialState.COMPLETE, "FINISHED"
            child.log_metrics({rec.SEARCH_OBJECTIVE: value}, step=result.nimg)
            return value
        except (optuna.TrialPruned, TrialFailed, UserError) as exc:
            if state == rec.TrialState.FAILED:
                child.set_tags({rec.ERROR: str(exc)[:500]})
            raise
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except Exception as exc:  # one broken trial must not sink the search: FAIL it, keep the traceback
            child.record_crash(exc)
            raise TrialFailed(f"{type(exc).__name__}: {exc}") from exc
        finally:
            child.set_tags({rec.TRIAL_STATE: state})
            if status != "KILLED":
                trial.set_user_attr(ENDED_ATTR, state)
            child.finish(status)


