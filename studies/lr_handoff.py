"""The learning rates a study takes from an Optuna search, as typed values both commands share.

    python -m studies.search --preset quick --trials 20                 # study lr-quick in ./optuna.db
    python -m studies.run pooling --preset quick --lr-from lr-quick     # its best trial, as an LrChoice
    python -m studies.run pooling --preset quick --search-lr            # search first, then the study

studies.run builds an LrRequest from its flags and its study; studies.search answers with an LrChoice (its best
trial); the study applies the choice and records where it came from as `lr_from.*` params and tags. This module
sits below both commands and needs no Optuna.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from core import records as rec
from core.errors import UserError

DEFAULT_STORAGE = "sqlite:///optuna.db"  # Optuna storage of both commands, in the working directory
LR_KEYS = ("optim.lr_g", "optim.lr_d")  # what every search varies
BETA1_KEY = "optim.beta1"  # what a search may vary as well (--search-beta1)


@dataclass(frozen=True)
class LrRequest:
    """What a study asks of a search: the best trial of `study`, after adding `search_trials` trials if > 0."""
    study: str = ""  # Optuna study name; '' = the search's own default for this preset and base
    storage: str = DEFAULT_STORAGE  # SQLAlchemy URL, journal:PATH or PATH.journal
    search_trials: int = 0  # trials to add before reading the best (--search-lr); 0 = read only (--lr-from)
    preset: str = "default"  # the study's preset, base and overrides, so that trials train what the study trains
    base: tuple[tuple[str, str], ...] = ()  # (ablation, variant) pairs
    overrides: Mapping[str, object] = field(default_factory=dict)  # --set and --data
    workdir: Path = Path("runs")  # trial run directories


@dataclass(frozen=True)
class LrChoice:
    """The best trial of an Optuna study: its parameters, and where they came from."""
    study: str  # Optuna study name
    storage: str  # its storage URL, password hidden
    trial: int  # number of the best trial
    metric: str  # fid | kid: what the search minimised, the primary metric of the studies it serves
    value: float  # the trial's final value of `metric`, the search's objective
    params: Mapping[str, float]  # lr_g, lr_d (and beta1 when searched), Optuna's parameter names
    mlflow_run_id: str  # the trial's MLflow run; '' if it predates that record
    preset: str  # the preset the search trained with; '?' if unknown
    trial_kimg: object  # training length of a trial, kimg; '?' if unknown
    searched_now: bool = False  # the search ran as part of the same command (--search-lr)

    @property
    def overrides(self) -> dict[str, float]:
        """The parameters as dotted config overrides."""
        return {f"optim.{k}": v for k, v in self.params.items()}

    @property
    def provenance(self) -> dict[str, object]:
        """`lr_from.*` params and tags of the study that uses these rates."""
        return {"lr_from.study": self.study, "lr_from.storage": self.storage, "lr_from.trial": self.trial,
                "lr_from.metric": self.metric, f"lr_from.{self.metric}": self.value,
                "lr_from.mlflow_run_id": self.mlflow_run_id,
                "lr_from.preset": self.preset, "lr_from.trial_kimg": self.trial_kimg,
                **{f"lr_from.{k}": v for k, v in self.params.items()}, "lr_from.searched_now": self.searched_now}


def check_study(ablation: str, varied: set[str], overrides: Mapping[str, object]) -> None:
    """Refuse learning rates from a search for a study that varies them itself, or sets them with --set."""
    clash = sorted(varied & {*LR_KEYS, BETA1_KEY})
    if clash:
        raise UserError(f"LR search makes no sense for study '{ablation}': its variants set {', '.join(clash)}")
    clash = sorted(set(LR_KEYS) & overrides.keys())
    if clash:
        raise UserError(f"--set {', '.join(clash)} conflicts with --lr-from/--search-lr, which set it")


# ---- equal tuning budgets (python -m studies.run NAME --tune N) -----------------------------------------------------
TUNE_TRIAL_SEED = 1000  # train.seed of a tuning trial k is 1000 + k: disjoint from a verdict's seeds 0..N-1


@dataclass(frozen=True)
class TuneRequest:
    """One learning-rate search per variant of a study, all with the same budget (Lucic et al. 2018)."""
    ablation: str  # the study's ablation
    experiment: str  # the plain study's MLflow experiment (ablation@base...): names the searches
    variants: tuple[str, ...]  # baseline first
    trials: int  # trials per variant, counted over resumes (complete, pruned or failed on their own)
    preset: str = "default"
    base: tuple[tuple[str, str], ...] = ()  # (ablation, variant) pairs under everything
    overrides: Mapping[str, object] = field(default_factory=dict)  # --set and --data
    storage: str = DEFAULT_STORAGE  # the searches' Optuna storage
    lr_range: tuple[float, float] = (1e-5, 1e-3)  # log-uniform range of lr_g and lr_d, the search's default
    trial_kimg: float = 0.0  # training length of a trial; 0 = a quarter of the resolved train.kimg
    sampler_seed: int = 0  # the same TPE seed for every variant: the same startup points
    workers: int = 1  # local search worker processes
    workdir: Path = Path("runs")

    def search_name(self, variant: str) -> str:
        """The Optuna study of one variant's search: tune-cpu-pooling=maxpool."""
        return f"tune-{self.preset}-{self.experiment}={variant}"

    def budget(self) -> dict[str, object]:
        """What every variant's search had: the tuned study's parent params and tags."""
        return {rec.TUNE_TRIALS: self.trials, f"{rec.TUNE}lr_range": f"{self.lr_range[0]:g}..{self.lr_range[1]:g}",
                f"{rec.TUNE}trial_kimg": self.trial_kimg or "quarter of train.kimg", f"{rec.TUNE}sampler_seed": self.sampler_seed,
                f"{rec.TUNE}trial_seeds": f"{TUNE_TRIAL_SEED}+trial", f"{rec.TUNE}pruning": "none: every trial runs to its end"}
