"""What a run records, named once: metric keys, tag names and outcomes, for every writer and every reader.

The trainer, the runner, a study and a search write these names to MLflow; the report, its plots, the verdict
and the search read them back. The strings are exactly those of earlier stores, so old stores and reports keep
working. Pure Python: no torch, no MLflow, no pandas (the config and the report import it too).

    from core import records as rec
    rec.final_key("kid")                 # 'kid/final'
    rec.train_key("fid", 10000)          # 'fid/fid10k'
    rec.Outcome("d_saturated").failure   # True
"""

from __future__ import annotations

from enum import StrEnum

# ---- metric families: what an evaluation measures (one Inception pass measures all of them) --------------------
FID, KID = "fid", "kid"
FAMILIES = (FID, KID)  # the distances: one value per evaluation, lower is better, a verdict's primary metric
# fidelity and diversity from the same features (core/prdc.py): improved precision and recall (k = 3) in the `pr`
# group, density and coverage (k = 5) in the `dc` group; higher is better (1 = like real images)
PRECISION, RECALL, DENSITY, COVERAGE = "precision", "recall", "density", "coverage"
PR, DC = "pr", "dc"
GROUP = {PRECISION: PR, RECALL: PR, DENSITY: DC, COVERAGE: DC}
FIDELITY_DIVERSITY = tuple(GROUP)
LABEL = {FID: "FID", KID: "KID", PRECISION: "precision", RECALL: "recall", DENSITY: "density", COVERAGE: "coverage"}


def other_family(family: str) -> str:
    """The metric shown beside the primary one: KID beside FID, FID beside KID."""
    return KID if family == FID else FID


def metric_name(family: str, num_samples: int) -> str:
    """fid10k, kid50k, fid256: a value is named for what it measures and its sample count."""
    return f"{family}{num_samples // 1000}k" if num_samples % 1000 == 0 else f"{family}{num_samples}"


def counted(family: str) -> bool:
    """Whether a family's per-evaluation key names its sample count (fid/fid10k) or not (pr/recall)."""
    return family not in GROUP


def train_key(family: str, num_samples: int) -> str:
    """The key of an evaluation during training: fid/fid10k, kid/kid256; pr/recall, dc/coverage (the count in
    the protocol tags: the final evaluation, on another count, logs only the final key)."""
    return f"{family}/{metric_name(family, num_samples)}" if counted(family) else f"{GROUP[family]}/{family}"


def final_key(family: str) -> str:
    """The run's last evaluation, on eval.fid_final_samples: fid/final, kid/final, pr/final_recall."""
    return f"{family}/final" if counted(family) else f"{GROUP[family]}/final_{family}"


def final_std_key(family: str) -> str:
    """The standard error of the final value, for a metric that has one: kid/final_std."""
    return f"{family}/final_std"


def best_key(family: str) -> str:
    """The lowest value on the training sample count, selected after the fact: fid/best, kid/best."""
    return f"{family}/best"


def diagnostic_key(family: str, name: str) -> str:
    """A number an evaluation logs that is not a score: fid/feature_spread."""
    return f"{family}/{name}"


FEATURE_SPREAD = "feature_spread"  # generated over real Inception feature variance (trace ratio), a diagnostic
# diversity without fidelity: the median distance from a generated sample to its 5th nearest generated neighbour,
# over the same among as many real images (1 = as spread out as real images, 0 = one image); the `collapsed`
# outcome reads it (eval.collapse_nn_ratio)
NN_RATIO = "nn_ratio"
SPREAD_KEY, NN_RATIO_KEY = diagnostic_key(FID, FEATURE_SPREAD), diagnostic_key(DC, NN_RATIO)

# ---- metrics of the step, reduced at each log interval -----------------------------------------------------------
LOSS_D, LOSS_G, LOSS_R1 = "loss/d", "loss/g", "loss/r1"
D_REAL, D_FAKE = "d/real", "d/fake"  # D's mean sigmoid output on real and on generated images
D_SATURATED = "d/saturated"  # 1 at a log where D saturated, else 0
IMG_PER_S = "perf/img_per_s"
KIMG = "progress/kimg"
LOSS_KEYS = (LOSS_D, LOSS_G)
D_KEYS = (D_REAL, D_FAKE)

# ---- the search -----------------------------------------------------------------------------------------------------
SEARCH_OBJECTIVE = "search/objective"  # a trial's objective: the study's primary metric, final value
TRIAL_STATE = "state"  # a trial run's tag: a TrialState
SEARCH, TRIAL = "search", "trial"  # the `search` tag of a search's parent run (`parent`) and its trials (`trial`)


def search_best_key(family: str) -> str:
    """The search parent's best objective so far, against the number of trials: search/best_kid."""
    return f"search/best_{family}"


def best_tag(family: str) -> str:
    """The search parent's tag with the best trial's value: best_kid, best_fid."""
    return f"best_{family}"


class TrialState(StrEnum):
    """A search trial's state, as its MLflow run's `state` tag says (Optuna's states, in lower case)."""
    RUNNING = "running"
    WAITING = "waiting"
    COMPLETE = "complete"
    PRUNED = "pruned"
    FAILED = "failed"

# ---- run tags -------------------------------------------------------------------------------------------------------
OUTCOME = "outcome"
DIVERGED_AT = "diverged_at_nimg"
SATURATION_EPISODES = "saturation_episodes"
KIMG_TAG = "kimg"
DEVICE, DEVICE_NAME = "device", "device_name"
SYSTEM_NODE, SYSTEM_GPU = "system.node", "system.gpu"  # the machine a run's system metrics came from, and its GPU
SYSTEM_PREFIX = "system/"  # MLflow's system metrics: system/NODE/cpu_utilization_percentage, .../gpu_0_...
PATH_CANDIDATES = "path.candidates"  # every candidate path's img/s (or why it was rejected): core/fastpath.py
ERROR = "error"
PROTOCOL = "fid_protocol."  # prefix of the evaluation protocol's tags
ENV = "env."  # prefix of a study parent's provenance tags
# a study: its parent run and one child per variant x seed
STUDY, STUDY_KEY, ABLATION, PRESET, BASE = "study", "study_key", "ablation", "preset", "base"
VARIANT, SEED, SEEDS, VARIANTS = "variant", "seed", "seeds", "variants"
PARENT, CHILD = "parent", "child"  # values of the `study` tag
RUN_NAME, PARENT_RUN = "mlflow.runName", "mlflow.parentRunId"  # MLflow's own
PRIMARY_METRIC_PARAM = "derived.primary_metric"
RUN_KEY = "run_key"  # a child run's content key (core/identity.py): equal keys, the same run
REUSED_FROM, REUSED_STUDY = "reused_from", "reused_from_study"  # a reused run: the original's run id and experiment
REFERENCE_ARTIFACT = "fid_reference"  # the folder of a study's or search's parent run holding its reference statistics
# a tuned study (studies.run NAME --tune N): every variant at its own best learning rates, its own experiment
TUNED_SUFFIX = "+tuned"  # the tuned study's MLflow experiment: pooling+tuned (pooling@ttur=ttur+tuned over a base)
TUNE = "tune."  # prefix of its budget (parent and child params and tags) and of its per-variant choices
TUNE_TRIALS, TUNE_PLAIN = "tune.trials", "tune.plain_parent"  # trials per variant; the plain study's parent run


def tune_tag(what: str, variant: str) -> str:
    """A per-variant tag of the tuned study's parent: tune.search.maxpool (its Optuna study), tune.lr_g.maxpool,
    tune.best_trial.*, tune.fallback.* (no trial completed: the variant keeps the config's rates)."""
    return f"{TUNE}{what}.{variant}"



def failure_at(outcome: str) -> str:
    """The tag holding the images seen when a failure mode first showed: collapsed_at_nimg, d_saturated_at_nimg."""
    return f"{outcome}_at_nimg"


# ---- outcomes ---------------------------------------------------------------------------------------------------------
class Outcome(StrEnum):
    """How a run ended, as its `outcome` tag says; `unfinished` is the reader's name for a run that never said."""
    RUNNING = "running"
    FINISHED = "finished"
    STOPPED = "stopped"  # a hook stopped it early (a pruned trial): its last value is a result, its final is not
    DIVERGED = "diverged"
    COLLAPSED = "collapsed"
    D_SATURATED = "d_saturated"
    FAILED = "failed"  # crashed
    UNFINISHED = "unfinished"

    @property
    def completed(self) -> bool:
        """Its final metric is a result (finished, or stopped early by a hook)."""
        return self in (Outcome.FINISHED, Outcome.STOPPED)

    @property
    def failure(self) -> bool:
        """A failed seed: counted in its variant's n and failure rate, its metric kept out of the test."""
        return self in FAILURES

    @property
    def terminal(self) -> bool:
        """Nothing more will happen to the run: a resumed study skips it (a crashed run is retried)."""
        return self.completed or self in (Outcome.DIVERGED, Outcome.COLLAPSED, Outcome.D_SATURATED)

    @property
    def verb(self) -> str:
        """How a sentence says it: 'saturated D', 'crashed'."""
        return {Outcome.D_SATURATED: "saturated D", Outcome.FAILED: "crashed"}.get(self, self.value)

    @classmethod
    def read(cls, value: object) -> Outcome:
        """The outcome a tag holds; anything else (no tag, an unknown word) is unfinished."""
        try:
            return cls(str(value))
        except ValueError:
            return cls.UNFINISHED


COMPLETED = (Outcome.FINISHED, Outcome.STOPPED)
FAILURES = (Outcome.DIVERGED, Outcome.COLLAPSED, Outcome.D_SATURATED, Outcome.FAILED)  # in the report's column order
TERMINAL = tuple(o for o in Outcome if o.terminal)
