"""The one GAN training loop every study uses: non-saturating BCE loss, Adam, phases with intervals.

A step is one G update; before it, D is updated `n_dis` times on fresh real batches, but only every
`d_interval`-th step. Images seen (nimg) count G's batches, so kimg = step * batch / 1000. Scalars stay on
the device inside the step and are reduced only at log intervals (the one sync point).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core import config as config_mod
from core.config import RunConfig
from core.data import BatchSource
from core.errors import UserError
from core.hooks import Hooks
from core.losses import min_d_loss
from core.metrics import MetricResult

GRID_SEED = 2024  # every run's sample grids use the same z, so variants compare image by image
FID_SEED = 123  # and every FID evaluation the same latents


@dataclass(frozen=True)
class Phase:
    """One optimisation phase: which network it trains (D | G), how often (every `interval` steps), how many times.

    Plain data: the trainer dispatches on `name`. (A bound method here would make trainer -> phases -> method
    -> trainer a reference cycle, which keeps a finished run's device memory until a full GC.)
    """
    name: str
    interval: int = 1
    repeats: int = 1


@dataclass
class RunResult:
    status: str  # finished | diverged | stopped | collapsed | d_saturated (the seeds' failure modes)
    step: int
    nimg: int
    fid: dict[int, float] = field(default_factory=dict)  # nimg -> FID (training and final)
    final_fid: float | None = None
    best_fid: float | None = None
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
                 run_dir: Path | None = None, progress: Callable[[int, dict], None] | None = None):
        from core.tracking import NullTracker

        self.cfg, self.G, self.D, self.opt_g, self.opt_d = cfg, G, D, opt_g, opt_d
        self.batches, self.device = batches, device
        self.hooks = hooks or Hooks()
        self.tracker = tracker or NullTracker()
        self.evaluate = evaluate
        self.run_dir = run_dir
        self.progress = progress or (lambda nimg, stats: None)
        self.derived = config_mod.derive(cfg)
        self.batch = cfg.train.batch_size
        self.step = 0
        self.nimg = 0
        self.fid_history: dict[int, float] = {}
        self.history: dict[str, list[tuple[int, float]]] = {}  # every logged metric, for the run's plot
        self.zgen = torch.Generator(device=device).manual_seed(cfg.train.seed + 1)
        cuda = device.type == "cuda"
        # train.amp=auto resolved for this device (core.device); bf16 autocast runs on CPUs too
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.derived.amp == "bf16")
        self.G_train = torch.compile(G) if cuda and cfg.train.compile else G
        self.D_train = torch.compile(D) if cuda and cfg.train.compile else D
        self.d_steps = 0  # optimizer steps taken, recorded in the run's summary
        self.g_steps = 0
        self.failures: dict[str, int] = {}  # failure mode -> nimg where first seen
        self.evals: list[tuple[str, int, int, float]] = []  # (family, nimg, samples, value) of every evaluation
        # D's loss can fall no lower than the entropy of its targets (0.325 nats for real 0.9): saturation is
        # measured from there, or smoothed variants could never saturate
        self.d_loss_floor = min_d_loss(getattr(cfg.train, "loss", "bce"), cfg.train.real_label, cfg.train.fake_label)
        self.saturation_episodes: list[list[int]] = []  # [from_nimg, to_nimg]: logs in a row with D saturated
        self._saturated_logs = 0
        self._stuck_since: int | None = None  # nimg of the first log of the current saturated streak
        self._reset_stats()
        t = cfg.train
        self.phases = [Phase("D", interval=t.d_interval, repeats=t.n_dis), Phase("G")]

    # ---- the step --------------------------------------------------------------------------------
    def _z(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.cfg.model.z_dim, device=self.device, generator=self.zgen)

    def _d_step(self, step: int) -> None:
        real = self.batches.next(self.batch)
        with torch.no_grad(), self.autocast:
            fake = self.G_train(self._z(self.batch))
        with self.autocast:
            logits_real = self.D_train(real).float()
            logits_fake = self.D_train(fake).float()
        t_real, t_fake = self.hooks.d_targets(step, torch.full_like(logits_real, self.cfg.train.real_label),
                                              torch.full_like(logits_fake, self.cfg.train.fake_label))
        loss = (F.binary_cross_entropy_with_logits(logits_real, t_real)
                + F.binary_cross_entropy_with_logits(logits_fake, t_fake))
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()
        self.d_steps += 1
        self._acc["loss/d"] += loss.detach()
        self._acc["d/real"] += torch.sigmoid(logits_real.detach()).mean()
        self._acc["d/fake"] += torch.sigmoid(logits_fake.detach()).mean()
        self._count["d"] += 1

    def _g_step(self, step: int) -> None:
        # D's parameters get no gradients here: backward still flows through D to G, but skips D's weight
        # gradients, which the G step would only throw away (stylegan2-ada toggles requires_grad per phase)
        self.D.requires_grad_(False)
        with self.autocast:
            logits = self.D_train(self.G_train(self._z(self.batch))).float()
        loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))  # non-saturating
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.D.requires_grad_(True)
        self.opt_g.step()
        self.g_steps += 1
        self._acc["loss/g"] += loss.detach()
        self._count["g"] += 1

    def train_step(self) -> None:
        for phase in self.phases:
            if self.step % phase.interval == 0:
                for _ in range(phase.repeats):
                    PHASE_STEPS[phase.name](self, self.step)
        self.step += 1
        self.nimg += self.batch

    # ---- the loop --------------------------------------------------------------------------------
    def run(self) -> RunResult:
        t, e = self.cfg.train, self.cfg.eval
        result = RunResult("finished", self.step, self.nimg, self.fid_history)
        tick_time, tick_nimg = time.perf_counter(), self.nimg
        while self.step < self.derived.steps:
            self.train_step()
            nimg, last = self.nimg, self.step == self.derived.steps
            if crossed(nimg, self.batch, t.log_every_kimg) or last:
                stats = self._reduce_stats()  # sync point
                now = time.perf_counter()
                stats["perf/img_per_s"] = (nimg - tick_nimg) / max(now - tick_time, 1e-9)
                stats["progress/kimg"] = nimg / 1000
                tick_time, tick_nimg = now, nimg
                self._watch_saturation(stats)
                self._record(stats)
                self.progress(nimg, stats)
                result.img_per_s = stats["perf/img_per_s"]
                if not all(math.isfinite(v) for v in stats.values()):
                    result.status, result.diverged_at = "diverged", nimg
                    break
            if crossed(nimg, self.batch, t.sample_every_kimg) or last:
                self.save_grid()
            if e.fid_every_kimg > 0 and crossed(nimg, self.batch, e.fid_every_kimg) and not last:
                _, stop = self._eval_fid(e.fid_samples)
                if stop:
                    result.status = "stopped"
                    break
            if crossed(nimg, self.batch, t.checkpoint_every_kimg) and not last:
                self.save_checkpoint()
        if result.status not in ("diverged", "stopped"):  # a stopped (pruned) run needs no final FID
            fid, _ = self._eval_fid(e.fid_final_samples, final=True)
            result.final = {s.family: s.value for s in fid.scores} if fid is not None else {}
            result.final_fid = result.final.get("fid")
            if fid is not None and fid.diagnostics["feature_spread"] < e.collapse_spread:
                self.failures.setdefault("collapsed", self.nimg)
            last = self.saturation_episodes[-1] if self.saturation_episodes else None
            if last is not None and last[1] == self.nimg:  # saturated to the end: recovered episodes are history
                self.failures.setdefault("d_saturated", last[0])
        if result.status == "finished" and self.failures:
            result.status = min(self.failures, key=self.failures.get)  # the first failure seen names the run
        result.step, result.nimg = self.step, self.nimg
        result.best = self.best_values()
        result.best_fid = result.best.get("fid")
        result.saturation_episodes = [list(ep) for ep in self.saturation_episodes]
        return result

    def best_values(self) -> dict[str, float]:
        """Per family, the lowest value among evaluations on the training sample count (selected after the fact).

        Values on other sample counts are biased differently (FID), so the final 50k FID never competes with
        the 10k ones; without a training evaluation the final one's count is used.
        """
        e, best = self.cfg.eval, {}
        for family in dict.fromkeys(f for f, *_ in self.evals):
            for samples in (e.fid_samples, e.fid_final_samples):
                values = [v for f, _, n, v in self.evals if f == family and n == samples and math.isfinite(v)]
                if values:
                    best[family] = min(values)
                    break
        return best

    def _watch_saturation(self, stats: dict[str, float]) -> None:
        """D wins outright (its loss within eval.saturation_loss_d of its floor) while G's loss explodes.

        eval.saturation_logs such logs in a row open an episode [from_nimg, to_nimg], extended while they last;
        stats gains d/saturated (1 where this log meets the condition, else 0).
        """
        e = self.cfg.eval
        stuck = (stats.get("loss/d", math.inf) - self.d_loss_floor < e.saturation_loss_d
                 and stats.get("loss/g", 0.0) > e.saturation_loss_g)
        stats["d/saturated"] = float(stuck)
        if not stuck:
            self._saturated_logs, self._stuck_since = 0, None
            return
        if self._saturated_logs == 0:
            self._stuck_since = self.nimg
        self._saturated_logs += 1
        if self._saturated_logs == e.saturation_logs:
            self.saturation_episodes.append([self._stuck_since, self.nimg])
        elif self._saturated_logs > e.saturation_logs:
            self.saturation_episodes[-1][1] = self.nimg

    def _eval_fid(self, num_samples: int, final: bool = False) -> tuple[MetricResult | None, bool]:
        """Log FID and KID; returns the metric's result (None without an evaluator) and whether a hook asks to stop."""
        if self.evaluate is None:
            return None, False
        result = self.evaluate(self.G, num_samples)
        self.fid_history[self.nimg] = result.value
        metrics = {}
        for s in result.scores:  # fid/fid10k, kid/kid10k; at the end also fid/final, kid/final, kid/final_std
            metrics[f"{s.family}/{s.name}"] = s.value
            if final:
                metrics[f"{s.family}/final"] = s.value
                if math.isfinite(s.std_error):
                    metrics[f"{s.family}/final_std"] = s.std_error
            self.evals.append((s.family, self.nimg, result.num_samples, s.value))
        metrics.update({f"{result.scores[0].family}/{k}": v for k, v in result.diagnostics.items()})
        self._record(metrics)
        self.tracker.set_tags({f"fid_protocol.{k}": v for k, v in result.protocol.items()})
        return result, self.hooks.on_eval(self.nimg / 1000, metrics)

    def _record(self, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(metrics, step=self.nimg)
        for k, v in metrics.items():
            self.history.setdefault(k, []).append((self.nimg, float(v)))

    def read_stats(self) -> dict[str, float]:
        """Mean of each step statistic (loss/d, loss/g, d/real, d/fake) since the last read; a host sync."""
        return self._reduce_stats()

    def _reset_stats(self) -> None:
        zero = torch.zeros((), device=self.device)
        self._acc = {k: zero.clone() for k in ("loss/d", "loss/g", "d/real", "d/fake")}
        self._count = {"d": 0, "g": 0}

    def _reduce_stats(self) -> dict[str, float]:
        keys = [k for k in self._acc if self._count["g" if k == "loss/g" else "d"] > 0]
        values = torch.stack([self._acc[k] for k in keys]).tolist() if keys else []
        out = {k: v / self._count["g" if k == "loss/g" else "d"] for k, v in zip(keys, values)}
        self._reset_stats()
        return out

    # ---- artifacts -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self) -> torch.Tensor:
        """Images from the fixed grid z, in eval.g_mode, in [0, 1]."""
        n = self.cfg.eval.grid_size
        z = torch.randn(n, self.cfg.model.z_dim, generator=torch.Generator().manual_seed(GRID_SEED)).to(self.device)
        was = self.G.training
        self.G.train(self.cfg.eval.g_mode == "train")
        x = self.G(z).float()
        self.G.train(was)
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
        return {
            "config": config_mod.flatten(self.cfg), "step": self.step, "nimg": self.nimg,
            "G": self.G.state_dict(), "D": self.D.state_dict(),
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "batches": self.batches.state_dict(), "zgen": self.zgen.get_state(),
            "torch_rng": torch.get_rng_state(), "hooks": self.hooks.state_dict(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "fid_history": [[k, v] for k, v in self.fid_history.items()],
            "history": {k: [[n, v] for n, v in pts] for k, pts in self.history.items()},
            "steps_taken": [self.d_steps, self.g_steps], "run_id": self.tracker.run_id or "",
            "failures": dict(self.failures), "saturated_logs": self._saturated_logs,
            "saturation": {"episodes": [list(ep) for ep in self.saturation_episodes], "since": self._stuck_since},
            "evals": [list(ev) for ev in self.evals],
            # the running sums since the last log: a resume between two log points logs the same means
            "stats": {"acc": dict(self._acc), "count": dict(self._count)},
        }

    def load_state_dict(self, state: dict) -> None:
        ours = config_mod.flatten(self.cfg)
        theirs = state["config"]
        differ = sorted(k for k in ours if ours[k] != theirs.get(k))
        if differ:
            shown = ", ".join(f"{k}={theirs.get(k)!r} (now {ours[k]!r})" for k in differ[:4])
            raise UserError(f"checkpoint was made with a different config: {shown}; "
                            "delete the run directory or rerun with the same settings")
        self.step, self.nimg = state["step"], state["nimg"]
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        # RNG states stay CPU ByteTensors (set_state refuses anything else, also for CUDA generators)
        self.batches.load_state_dict(state["batches"])
        self.zgen.set_state(state["zgen"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.hooks.load_state_dict(state["hooks"])
        self.fid_history = {int(k): float(v) for k, v in state["fid_history"]}
        self.history = {k: [(int(n), float(v)) for n, v in pts] for k, pts in state["history"].items()}
        self.d_steps, self.g_steps = state["steps_taken"]
        self.failures, self._saturated_logs = dict(state["failures"]), state["saturated_logs"]
        saturation = state.get("saturation", {"episodes": [], "since": None})  # older checkpoints have neither
        self.saturation_episodes, self._stuck_since = [list(ep) for ep in saturation["episodes"]], saturation["since"]
        self.evals = [(str(f), int(n), int(k), float(v)) for f, n, k, v in state.get("evals", [])]
        if "stats" in state:  # checkpoints from before it was saved restart the sums
            self._acc = {k: v.to(self.device) for k, v in state["stats"]["acc"].items()}
            self._count = dict(state["stats"]["count"])

    def close(self) -> None:
        """Let go of G, D, optimizers, batches and evaluator now, even while a traceback still holds the trainer."""
        self.G = self.D = self.G_train = self.D_train = self.opt_g = self.opt_d = None
        self.batches = self.evaluate = None

    def checkpoint_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "checkpoint.pt"

    def save_checkpoint(self) -> Path | None:
        """Write atomically (temporary file, then rename): a kill never leaves a half checkpoint."""
        path = self.checkpoint_path()
        if path is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".partial-{os.getpid()}")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    def try_resume(self) -> bool:
        """Continue from run_dir/checkpoint.pt if there is one; False when starting fresh.

        Loaded onto the CPU: load_state_dict moves weights and optimizer state to where the models are,
        and RNG states must stay CPU ByteTensors (map_location=cuda would break resume on a GPU).
        """
        path = self.checkpoint_path()
        if path is None or not path.is_file():
            return False
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"checkpoint {path} cannot be read ({type(exc).__name__}); delete it to start over") from None
        self.load_state_dict(state)
        return True


PHASE_STEPS: dict[str, Callable[[Trainer, int], None]] = {"D": Trainer._d_step, "G": Trainer._g_step}
