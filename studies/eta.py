"""How long a study or a search will take on this machine, measured before it starts, not guessed.

    python -m studies.run pooling                 # prints 'preset cpu (...): ETA 52 min for 9 runs ...' first
    python -m studies.run pooling --preset default --yes   # a 128 px study on a CPU: its ETA, then it runs anyway

A few timed training steps of every variant's real model (after a warm-up step, on the device and the path
the run will use: measured first where this machine does not know it yet) give its img/s, and the warm-up
step beyond a timed one what each run spends compiling; one timed Inception batch gives the FID/KID pass's img/s. The
arithmetic (`estimate`) is separate from the measuring (`measure`), so it is tested on made-up timings.

Before a study that may be refused, `probe` times one step of the first variant at batch 8 and 8 images
through Inception: seconds, where the full measurement of a 128 px model on a CPU takes minutes. A probe
whose ETA is CLEAR_FACTOR times over the limit is the answer (a study of weeks needs no third decimal).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from core import config as config_mod
from core import reference
from core.build import build_run, run_path
from core.config import RunConfig
from core.cpuload import BUSY_SHARE, OtherLoad
from core.data import DeviceImages
from core.device import release_memory, unmeasured_path
from core.fastpath import PathChoice
from core.inception import InceptionFeatures

TIMED_STEPS = 3  # training steps timed per variant, after one warm-up step
LONG_ETA_S = 12 * 3600  # beyond this, a study asks for --yes
PROBE_BATCH = 8  # images per step (and through Inception) of the probe
CLEAR_FACTOR = 10  # a probe ETA this many times over LONG_ETA_S is refused without measuring further
PROBE_ABOVE = 1e10  # pixels a study trains on (runs x images x resolution^2) above which the probe comes first:
                    # the cpu preset's pooling study is 5.5e8 (its full measurement takes seconds), the default
                    # preset's 2.9e11 (minutes on a CPU)


@dataclass(frozen=True)
class Timings:
    train_img_per_s: dict[str, float]  # variant -> training images per second
    inception_img_per_s: float  # generated or real images per second through the FID/KID feature pass
    setup_s: dict[str, float] = field(default_factory=dict)  # variant -> seconds each run spends before its steps
                                                              # run at speed (compiling, on a compiled path)
    other_load: float = math.nan  # share of the CPU other processes kept busy while this was timed (cpuload)


@dataclass(frozen=True)
class Estimate:
    total_s: float  # the whole study: every run to train plus the reference statistics
    runs: int  # runs to train
    train_s: float  # of which training
    eval_s: float  # of which FID/KID feature passes (evaluations and reference)
    reused: int = 0  # runs the store (or an earlier study of the invocation) already has: they cost nothing
    trials: int = 0  # --tune: search trials to run, each to its end (pruning can only shorten them)

    def line(self, what: str) -> str:
        runs = (f"{self.runs} runs" + (f" to train, {self.reused} reused" if self.reused else "")
                + (f", {self.trials} tuning trials" if self.trials else ""))
        return (f"ETA {format_duration(self.total_s)} for {what} ({runs}: training "
                f"{format_duration(self.train_s)}, FID/KID {format_duration(self.eval_s)}; measured on this machine)")

    def tags(self) -> dict[str, object]:
        return {"eta.total_s": round(self.total_s), "eta.train_s": round(self.train_s),
                "eta.eval_s": round(self.eval_s), "eta.runs": self.runs, "eta.reused": self.reused,
                **({"eta.trials": self.trials} if self.trials else {})}

    def plus(self, trials: Estimate, runs: Estimate) -> Estimate:
        """This study's estimate with its --tune searches (`trials`, whose runs are trials) and tuned `runs` added."""
        return Estimate(self.total_s + trials.total_s + runs.total_s, self.runs + runs.runs,
                        self.train_s + trials.train_s + runs.train_s, self.eval_s + trials.eval_s + runs.eval_s,
                        self.reused, self.trials + trials.runs)


def evaluations(cfg: RunConfig) -> int:
    """Generated images one run sends through Inception: the intermediate evaluations plus the final one."""
    e = cfg.eval
    if e.fid_final_samples == 0:
        return 0
    nimg = config_mod.derive(cfg).steps * cfg.train.batch_size
    every = round(e.fid_every_kimg * 1000)
    intermediate = (nimg - 1) // every if every > 0 else 0  # the trainer skips an evaluation on the last step
    return intermediate * e.fid_samples + e.fid_final_samples


def estimate(configs: dict[str, RunConfig], runs_per_variant: int | Mapping[str, int], timings: Timings,
             reference_images: int, reused: int = 0) -> Estimate:
    """Seconds for runs_per_variant runs of each config (one count, or one per variant) plus `reference_images`
    through Inception (0 = cached); `reused` runs cost nothing and are only counted."""
    counts = runs_per_variant if isinstance(runs_per_variant, Mapping) else dict.fromkeys(configs, runs_per_variant)
    train_s = eval_images = 0.0
    for name, cfg in configs.items():
        if not counts[name]:
            continue
        nimg = config_mod.derive(cfg).steps * cfg.train.batch_size
        train_s += counts[name] * (nimg / timings.train_img_per_s[name] + timings.setup_s.get(name, 0.0))
        eval_images += counts[name] * evaluations(cfg)
    eval_s = (eval_images + reference_images) / timings.inception_img_per_s if eval_images + reference_images else 0.0
    return Estimate(train_s + eval_s, sum(counts.values()), train_s, eval_s, reused)


def measure(configs: dict[str, RunConfig], images: DeviceImages, progress: bool = False) -> Timings:
    """Time TIMED_STEPS training steps of each variant on the path its runs will take (chosen by measurement
    first where this machine has not measured that model yet: core/fastpath.py) and one Inception batch, here
    and now (with a bar that names what is being timed when `progress`: a 128 px model on a CPU takes minutes).
    The first step of each variant, beyond a timed one, is what every run of it spends compiling."""
    from tqdm import tqdm
    speeds, setup = {}, {}
    with OtherLoad() as load, tqdm(total=len(configs) + 1, desc="timing this machine", unit="model", leave=False,
                                   disable=not progress, dynamic_ncols=True) as bar:
        for name, cfg in configs.items():
            bar.set_postfix_str(f"{name}: its path, then {TIMED_STEPS + 1} steps of batch {cfg.train.batch_size}")
            path = run_path(cfg, images.image_set, say=lambda line: tqdm.write(line, file=sys.stderr))
            speeds[name], setup[name] = _train_img_per_s(cfg, images, path=path)
            bar.update()
        first = next(iter(configs.values()))
        bar.set_postfix_str(f"an Inception batch of {first.eval.fid_batch}")
        inception = _inception_img_per_s(first, images)
        bar.update()
    return Timings(speeds, inception, setup, load.share)


def load_note(timings: list[Timings]) -> str:
    """'' or why the ETA errs long: other processes kept the CPU busy while it was timed (a test suite beside a
    study made a 7.5 h campaign measure 30 h)."""
    shares = [t.other_load for t in timings if math.isfinite(t.other_load)]
    if not shares or max(shares) <= BUSY_SHARE:
        return ""
    return (f"; timed while other processes kept {max(shares):.0%} of the CPU busy, so it errs long (an idle "
            "machine trains faster)")


def worth_probing(configs: dict[str, RunConfig], runs_per_variant: int) -> bool:
    """Whether a study is large enough (PROBE_ABOVE) that its full measurement may take minutes."""
    pixels = sum(runs_per_variant * config_mod.derive(cfg).steps * cfg.train.batch_size * cfg.model.resolution ** 2
                 for cfg in configs.values())
    return pixels > PROBE_ABOVE


def probe(configs: dict[str, RunConfig], images: DeviceImages) -> Timings:
    """Rough timings from one step of the first variant at PROBE_BATCH, for every variant, and PROBE_BATCH
    images through Inception. Per image, a small batch is slower than the run's, so the ETA errs long: it only
    decides refusals that are clear by far (CLEAR_FACTOR)."""
    cfg = next(iter(configs.values()))
    small = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=min(PROBE_BATCH,
                                                                                          cfg.train.batch_size)))
    path = PathChoice(unmeasured_path(small.train, images.device.type), "unmeasured")  # measuring paths takes minutes
    speed, _ = _train_img_per_s(small, images, steps=1, path=path)
    return Timings(dict.fromkeys(configs, speed), _inception_img_per_s(cfg, images, PROBE_BATCH))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_img_per_s(cfg: RunConfig, images: DeviceImages, steps: int = TIMED_STEPS,
                     path: PathChoice | None = None) -> tuple[float, float]:
    """(img/s of `steps` steps after a warm-up step, seconds the warm-up step took beyond a timed one)."""
    trainer = build_run(cfg, images=images, with_fid=False, path=path)
    device = trainer.device
    try:
        start = time.perf_counter()
        trainer.train_step()  # warm-up: allocations, cuDNN autotuning, compilation
        _sync(device)
        warmup_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        _sync(device)
        seconds = time.perf_counter() - start
        return steps * cfg.train.batch_size / seconds, max(0.0, warmup_s - seconds / steps)
    finally:
        trainer.close()
        del trainer
        release_memory(device)


def _inception_img_per_s(cfg: RunConfig, images: DeviceImages, batch: int | None = None) -> float:
    if cfg.eval.fid_final_samples == 0:
        return math.inf
    extractor = InceptionFeatures.for_eval(cfg.eval, images.device)
    n = min(batch or cfg.eval.fid_batch, len(images))
    batch = torch.from_numpy(np.array(images.image_set.images[:n]))
    extractor(batch[: min(n, 2)])  # warm-up
    start = time.perf_counter()
    extractor(batch)
    return n / (time.perf_counter() - start)


def format_duration(seconds: float) -> str:
    """'45 s', '12 min', '3.4 h', '2.1 days'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def reference_images_to_compute(cfg: RunConfig, images: DeviceImages) -> int:
    """Real images the study must still send through Inception for its reference statistics (0 when cached)."""
    if cfg.eval.fid_final_samples == 0:
        return 0
    path, _, n = reference.reference_location(cfg, images.image_set)
    return 0 if path.is_file() else n
