"""The one GAN training loop every study uses: a loss picked by name (core/losses.py), Adam, phases with intervals.

A step is one G update; before it, D is updated `n_dis` times on fresh real batches, but only every
`d_interval`-th step, and with R1 on, a lazy `Dreg` phase follows every `r1_interval`-th D update. After the G
update, G_ema (when on) takes its moving-average step. Images seen (nimg) count G's batches, so kimg = step *
batch / 1000. Scalars stay on the device inside the step and are reduced only at log intervals (the one sync point).
The trainer owns its state through small parts (core/bookkeeping.py) and composes their state dicts into a
checkpoint's; core/checkpoint.py only writes and reads the file.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from core import augment, checkpoint, losses, regularizers
from core import config as config_mod
from core import records as rec
from core.bookkeeping import MetricLog, SaturationWatch, StepStats
from core.config import RunConfig
from core.data import BatchSource
from core.device import quiet_compile_fallback, unmeasured_path, use_compile_cache
from core.ema import ema_beta, make_ema, update_ema
from core.errors import UserError
from core.fastpath import PathChoice, record_path
from core.hooks import Hooks
from core.losses import min_d_loss
from core.metrics import MetricResult
from core.sampling import evaluated_g

GRID_SEED = 2024  # every run's sample grids use the same z, so variants compare image by image (FID: core.metrics)
CHECKPOINT_FORMAT = 3  # the layout of Trainer.state_dict; raised when it changes, so an older file is refused


@dataclass(frozen=True)
class Phase:
    """One optimisation phase: what it trains (D | Dreg | G), how often (every `interval` steps), how many times.

    With `per` set, `interval` counts that phase's updates instead of steps: Dreg runs once per `interval` D updates
    (stylegan's lazy regularisation), whatever n_dis and d_interval are. Plain data: the trainer dispatches on
    `name`. (A bound method here would make trainer -> phases -> method -> trainer a reference cycle, which keeps
    a finished run's device memory until a full GC.)
    """
    name: str
    interval: int = 1
    repeats: int = 1
    per: str = ""  # '' = trainer steps; a phase name = counted in that phase's updates


@dataclass
class RunResult:
    status: rec.Outcome  # finished | diverged | stopped | collapsed | d_saturated (the seeds' failure modes)
    step: int
    nimg: int
    final: dict[str, float] = field(default_factory=dict)  # family (fid, kid) -> final value
    best: dict[str, float] = field(default_factory=dict)  # family -> lowest value at the training sample count
    saturation_episodes: list[list[int]] = field(default_factory=list)  # [from_nimg, to_nimg] of each episode
    diverged_at: int | None = None  # nimg at which a non-finite loss was seen
    img_per_s: float | None = None


def crossed(nimg: int, batch: int, every_kimg: float) -> bool:
    """True when this step's images carried nimg over a multiple of every_kimg."""
    every = max(1, round(every_kimg * 1000))
    return nimg // every != (nimg - batch) // every


class Trainer:
    """Receives built objects (see core.build.build_run) so tests can hand it tiny ones."""

    def __init__(self, cfg: RunConfig, G: nn.Module, D: nn.Module, opt_g: torch.optim.Optimizer,
                 opt_d: torch.optim.Optimizer, batches: BatchSource, device: torch.device, *,
                 hooks: Hooks | None = None, tracker=None, evaluate: Callable[[nn.Module, int], MetricResult] | None = None,
                 run_dir: Path | None = None, progress: Callable[[int, dict], None] | None = None,
                 path: PathChoice | None = None):
        from core.tracking import NullTracker

        self.cfg, self.G, self.D, self.opt_g, self.opt_d = cfg, G, D, opt_g, opt_d
        self.batches, self.device = batches, device
        self.hooks = hooks or Hooks()
        self.tracker = tracker or NullTracker()
        self.evaluate = evaluate
        self.run_dir = run_dir
        self.progress = progress or (lambda nimg, stats: None)
        self.derived = config_mod.derive(cfg)  # steps, LRs, primary metric: one rule, logged beside the config
        # the path (precision, memory format, compiled?) decided for this device by core.build.run_path; a Trainer
        # built by hand takes the explicit settings, eager, fp32 NCHW on a CPU
        self.path_choice = path or PathChoice(unmeasured_path(cfg.train, device.type), "unmeasured")
        self.path = self.path_choice.path
        self.batch = cfg.train.batch_size
        self.step = 0
        self.nimg = 0
        self.zgen = torch.Generator(device=device).manual_seed(cfg.train.seed + 1)
        self.augment_gen = torch.Generator(device=device).manual_seed(cfg.train.seed + 3)  # x-flip, DiffAugment
        self.G_ema = make_ema(G) if cfg.train.ema_kimg > 0 else None
        # bf16 autocast runs on CPUs too
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.path.amp == "bf16")
        self.G_train, self.D_train = G, D
        if self.path.compile:  # compiled lazily at the first step; G and D keep the eager modules' parameters
            use_compile_cache(cfg.data.cache_dir)
            torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly, never fails the run
            quiet_compile_fallback()  # ... and says so in one line
            self.G_train, self.D_train = torch.compile(G), torch.compile(D)
        self.failures: dict[rec.Outcome, int] = {}  # failure mode -> nimg where first seen
        self.stats = StepStats(device)  # the step's scalars since the last log point
        # D's loss can fall no lower than the entropy of its targets (0.325 nats for real 0.9): saturation is
        # measured from there, or smoothed variants could never saturate
        self.saturation = SaturationWatch(min_d_loss(cfg.train.loss, cfg.train.real_label, cfg.train.fake_label),
                                          cfg.eval)
        self.metric_log = MetricLog()  # every logged metric against nimg: the run's curves and its best values
        t = cfg.train
        self.phases = [Phase("D", interval=t.d_interval, repeats=t.n_dis), Phase("G")]
        if t.r1_gamma > 0:
            self.phases.insert(1, Phase("Dreg", interval=t.r1_interval, per="D"))
        self.phase_steps = {"D": 0, "Dreg": 0, "G": 0}  # optimizer steps taken, recorded in the run's summary

    @property
    def d_steps(self) -> int:
        return self.phase_steps["D"]

    @property
    def g_steps(self) -> int:
        return self.phase_steps["G"]

    # ---- the step --------------------------------------------------------------------------------
    def _z(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.cfg.model.z_dim, device=self.device, generator=self.zgen)

    def _real(self) -> torch.Tensor:
        """A fresh real batch, each image flipped left-right with p=0.5 under train.augment=xflip."""
        real = self.batches.next(self.batch)
        return augment.xflip(real, self.augment_gen) if self.cfg.train.augment == "xflip" else real

    def _d_view(self, x: torch.Tensor) -> torch.Tensor:
        """What D sees: DiffAugment under train.augment=diffaug, differentiable, so G's gradient passes through."""
        return augment.diff_augment(x, self.augment_gen) if self.cfg.train.augment == "diffaug" else x

    def _d_step(self, step: int) -> None:
        real = self._real()
        with torch.no_grad(), self.autocast:
            fake = self.G_train(self._z(self.batch))
        with self.autocast:
            logits_real = self.D_train(self._d_view(real)).float()
            logits_fake = self.D_train(self._d_view(fake)).float()
        t_real, t_fake = self.hooks.d_targets(step, torch.full_like(logits_real, self.cfg.train.real_label),
                                              torch.full_like(logits_fake, self.cfg.train.fake_label))
        loss = losses.d_loss(self.cfg.train.loss, logits_real, logits_fake, t_real, t_fake)
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()
        self.stats.add("D", {rec.LOSS_D: loss.detach(), rec.D_REAL: torch.sigmoid(logits_real.detach()).mean(),
                             rec.D_FAKE: torch.sigmoid(logits_fake.detach()).mean()})

    def _dreg_step(self, step: int) -> None:
        """Lazy R1 on a fresh real batch: gamma/2 * r1_interval * E||grad_x D(x)||^2, one step of D's optimizer.

        Eager D (compiled graphs have no double backward). D's BatchNorm stays in train mode, as in every D step,
        so the penalty is on the function D is trained as; its running statistics see one more batch, and nothing
        reads them (D never runs in eval mode). Under diffaug the gradient is taken through the augmentation.
        """
        t = self.cfg.train
        penalty = regularizers.r1_penalty(lambda x: self.D(self._d_view(x)), self._real(), self.autocast)
        self.opt_d.zero_grad(set_to_none=True)
        (penalty * regularizers.lazy_reg_scale(t.r1_gamma, t.r1_interval)).backward()
        self.opt_d.step()
        self.stats.add("Dreg", {rec.LOSS_R1: penalty.detach()})  # the raw E||grad||^2, before gamma and the interval

    def _g_step(self, step: int) -> None:
        # D's parameters get no gradients here: backward still flows through D to G, but skips D's weight
        # gradients, which the G step would only throw away (stylegan2-ada toggles requires_grad per phase)
        self.D.requires_grad_(False)
        with self.autocast:
            logits = self.D_train(self._d_view(self.G_train(self._z(self.batch)))).float()
        loss = losses.g_loss(self.cfg.train.loss, logits)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.D.requires_grad_(True)
        self.opt_g.step()
        self.stats.add("G", {rec.LOSS_G: loss.detach()})

    def train_step(self) -> None:
        # D phase(s), lazy R1, G phase: each as often as its interval says
        for phase in self.phases:
            for _ in range(self._due(phase)):
                PHASE_STEPS[phase.name](self, self.step)
                self.phase_steps[phase.name] += 1
        # EMA: G_ema follows the updated G; beta from the images seen before this step, a float (no host sync)
        if self.G_ema is not None:
            t = self.cfg.train
            update_ema(self.G_ema, self.G, ema_beta(self.batch, self.nimg, t.ema_kimg, t.ema_rampup))
        # bookkeeping
        self.step += 1
        self.nimg += self.batch

    def _due(self, phase: Phase) -> int:
        """How many times `phase` runs this step."""
        if phase.per:  # once for every `interval` updates of that phase so far
            return self.phase_steps[phase.per] // phase.interval - self.phase_steps[phase.name]
        return phase.repeats if self.step % phase.interval == 0 else 0

    # ---- the loop --------------------------------------------------------------------------------
    def run(self) -> RunResult:
        t, e = self.cfg.train, self.cfg.eval
        result = RunResult(rec.Outcome.FINISHED, self.step, self.nimg)
        tick_time, tick_nimg = time.perf_counter(), self.nimg
        while self.step < self.derived.steps:
            self.train_step()
            nimg, last = self.nimg, self.step == self.derived.steps
            if crossed(nimg, self.batch, t.log_every_kimg) or last:
                stats = self.stats.reduce()  # sync point
                now = time.perf_counter()
                stats[rec.IMG_PER_S] = (nimg - tick_nimg) / max(now - tick_time, 1e-9)
                stats[rec.KIMG] = nimg / 1000
                tick_time, tick_nimg = now, nimg
                self.saturation.observe(stats, nimg)
                self._record(stats)
                self.progress(nimg, stats)
                result.img_per_s = stats[rec.IMG_PER_S]
                if not all(math.isfinite(v) for v in stats.values()):
                    result.status, result.diverged_at = rec.Outcome.DIVERGED, nimg
                    break
            if crossed(nimg, self.batch, t.sample_every_kimg) or last:
                self.save_grid()
            if e.fid_every_kimg > 0 and crossed(nimg, self.batch, e.fid_every_kimg) and not last:
                _, stop = self._eval_fid(e.fid_samples)
                if stop:
                    result.status = rec.Outcome.STOPPED
                    break
            if crossed(nimg, self.batch, t.checkpoint_every_kimg) and not last:
                self.save_checkpoint()
        if result.status == rec.Outcome.FINISHED:  # a stopped (pruned) or diverged run needs no final evaluation
            metric, _ = self._eval_fid(e.fid_final_samples, final=True)
            result.final = {s.family: s.value for s in metric.scores} if metric is not None else {}
            if metric is not None and metric.diagnostics[rec.NN_RATIO_KEY] < e.collapse_nn_ratio:  # NaN: not judged
                self.failures.setdefault(rec.Outcome.COLLAPSED, self.nimg)
            since = self.saturation.saturated_to(self.nimg)  # saturated to the end: recovered episodes are history
            if since is not None:
                self.failures.setdefault(rec.Outcome.D_SATURATED, since)
            if self.failures:
                result.status = min(self.failures, key=self.failures.get)  # the first failure seen names the run
        result.step, result.nimg = self.step, self.nimg
        result.best = self.best_values()
        result.saturation_episodes = [list(ep) for ep in self.saturation.episodes]
        return result

    def best_values(self) -> dict[str, float]:
        """Per family, the lowest value among evaluations on the training sample count (selected after the fact).

        Values on other sample counts are biased differently (FID), so the final 50k FID never competes with
        the 10k ones; without a training evaluation the final one's count is used.
        """
        e, best = self.cfg.eval, {}
        for family in rec.FAMILIES:
            for samples in (e.fid_samples, e.fid_final_samples):
                value = self.metric_log.lowest(rec.train_key(family, samples))
                if value is not None:
                    best[family] = value
                    break
        return best

    def _eval_fid(self, num_samples: int, final: bool = False) -> tuple[MetricResult | None, bool]:
        """Log FID and KID; returns the metric's result (None without an evaluator) and whether a hook asks to stop."""
        if self.evaluate is None:
            return None, False
        result = self.evaluate(evaluated_g(self.cfg, self.G, self.G_ema), num_samples)
        metrics = {}
        for s in result.scores:  # fid/fid10k, kid/kid10k, pr/recall; at the end fid/final, kid/final_std, ...
            if not final or rec.counted(s.family):  # pr/recall's series stays on the training sample count
                metrics[rec.train_key(s.family, result.num_samples)] = s.value
            if final:
                metrics[rec.final_key(s.family)] = s.value
                if math.isfinite(s.std_error):
                    metrics[rec.final_std_key(s.family)] = s.std_error
        metrics.update(result.diagnostics)  # fid/feature_spread, dc/nn_ratio
        self._record(metrics)
        self.tracker.set_tags({f"{rec.PROTOCOL}{k}": v for k, v in result.protocol.items()})
        return result, self.hooks.on_eval(self.nimg / 1000, metrics)

    def _record(self, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(metrics, step=self.nimg)
        self.metric_log.add(self.nimg, metrics)

    def read_stats(self) -> dict[str, float]:
        """Mean of each step statistic (loss/d, loss/g, d/real, d/fake, loss/r1) since the last read; a host sync."""
        return self.stats.reduce()

    # ---- artifacts -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self) -> torch.Tensor:
        """Images from the fixed grid z, of the evaluated G (G_ema when on) in eval.g_mode, in [0, 1]."""
        n = self.cfg.eval.grid_size
        z = torch.randn(n, self.cfg.model.z_dim, generator=torch.Generator().manual_seed(GRID_SEED)).to(self.device)
        G = evaluated_g(self.cfg, self.G, self.G_ema)
        was = G.training
        G.train(self.cfg.eval.g_mode == "train")
        x = G(z).float()
        G.train(was)
        return ((x + 1) / 2).clamp(0, 1).cpu()

    def save_grid(self) -> None:
        if self.run_dir is None:
            return
        from torchvision.utils import save_image
        path = self.run_dir / "samples" / f"fakes{self.nimg / 1000:010.3f}kimg.png"  # sortable; grids < 1 kimg apart stay distinct
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(self.sample_grid(), path, nrow=math.isqrt(self.cfg.eval.grid_size), padding=1)
        self.tracker.log_artifact(path, "samples")

    # ---- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly, as plain tensors, numbers and dicts."""
        return {
            "format": CHECKPOINT_FORMAT, "config": config_mod.flatten(self.cfg), "step": self.step, "nimg": self.nimg,
            "G": self.G.state_dict(), "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict() if self.G_ema is not None else {},
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "batches": self.batches.state_dict(), "zgen": self.zgen.get_state(),
            "augment_gen": self.augment_gen.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "hooks": self.hooks.state_dict(), "phase_steps": dict(self.phase_steps),
            "failures": {mode.value: nimg for mode, nimg in self.failures.items()},  # plain str: weights_only loads it
            "run_id": self.tracker.run_id or "",
            "stats": self.stats.state_dict(), "saturation": self.saturation.state_dict(),
            "metrics": self.metric_log.state_dict(), "path": self.path.name,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore state_dict's output; an older layout, or one made with another config, is a UserError."""
        where = self.checkpoint_path() or "the checkpoint"
        if state.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{where} was written by an older version of the trainer; delete it to start over")
        ours, theirs = config_mod.flatten(self.cfg), state["config"]
        differ = sorted(k for k in ours if ours[k] != theirs.get(k))
        if differ:
            shown = ", ".join(f"{k}={theirs.get(k)!r} (now {ours[k]!r})" for k in differ[:4])
            raise UserError(f"checkpoint was made with a different config: {shown}; "
                            "delete the run directory or rerun with the same settings")
        if state["path"] != self.path.name:  # core.build.run_path builds a resumed run on its checkpoint's path
            raise UserError(f"{where} was trained on path {state['path']}, this run is built on {self.path.name}; "
                            "rerun with train.amp/channels_last/compile set to that path, or delete the run directory")
        self.step, self.nimg = state["step"], state["nimg"]
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        if self.G_ema is not None:
            self.G_ema.load_state_dict(state["G_ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        # RNG states stay CPU ByteTensors (set_state refuses anything else, also for CUDA generators)
        self.batches.load_state_dict(state["batches"])
        self.zgen.set_state(state["zgen"])
        self.augment_gen.set_state(state["augment_gen"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.hooks.load_state_dict(state["hooks"])
        self.phase_steps = {k: int(v) for k, v in state["phase_steps"].items()}
        self.failures = {rec.Outcome(mode): int(nimg) for mode, nimg in state["failures"].items()}
        self.stats.load_state_dict(state["stats"])
        self.saturation.load_state_dict(state["saturation"])
        self.metric_log.load_state_dict(state["metrics"])

    def checkpoint_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "checkpoint.pt"

    def save_checkpoint(self) -> Path | None:
        """The checkpoint, and beside it the path it was trained on (read before the resumed run is built)."""
        path = self.checkpoint_path()
        if path is None:
            return None
        written = checkpoint.write(self.state_dict(), path)
        record_path(path.parent, self.path)
        return written

    def try_resume(self) -> bool:
        """Continue from run_dir/checkpoint.pt if there is one; False when starting fresh."""
        path = self.checkpoint_path()
        if path is None or not path.is_file():
            return False
        self.load_state_dict(checkpoint.read(path))
        return True

    def close(self) -> None:
        """Let go of G, D, optimizers, batches and evaluator now, even while a traceback still holds the trainer."""
        self.G = self.D = self.G_ema = self.G_train = self.D_train = self.opt_g = self.opt_d = None
        self.batches = self.evaluate = None
        if self.path.compile:
            # compiled graphs hold the models; and every distinct model compiled in one process counts towards
            # dynamo's recompile limit, past which it silently runs eagerly (a study builds many models)
            torch._dynamo.reset()


PHASE_STEPS: dict[str, Callable[[Trainer, int], None]] = {"D": Trainer._d_step, "Dreg": Trainer._dreg_step,
                                                          "G": Trainer._g_step}
