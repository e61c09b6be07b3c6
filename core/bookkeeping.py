"""The trainer's bookkeeping, in three parts that each own their state: step statistics, the saturation watch, and
the log of every metric the run recorded.

Each part has state_dict/load_state_dict, and Trainer.state_dict composes them, so a checkpoint holds exactly what
a resumed run needs and nothing outside a part touches its attributes. The states are plain numbers, lists, dicts
and tensors, which torch.load(weights_only=True) reads.
"""

from __future__ import annotations

import math

import torch

from core import records as rec
from core.config import EvalConfig

STAT_PHASE = {rec.LOSS_D: "D", rec.D_REAL: "D", rec.D_FAKE: "D", rec.LOSS_R1: "Dreg", rec.LOSS_G: "G"}  # -> phase


class StepStats:
    """Running sums of the step's scalars on the device, counted per phase; reduced (a host sync) at log time."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Start new sums, as at a log point."""
        zero = torch.zeros((), device=self.device)
        self._sum = {k: zero.clone() for k in STAT_PHASE}
        self._count = {phase: 0 for phase in dict.fromkeys(STAT_PHASE.values())}

    def add(self, phase: str, values: dict[str, torch.Tensor]) -> None:
        """One update of `phase`: its detached scalars join the sums on the device (no sync)."""
        for k, v in values.items():
            self._sum[k] += v
        self._count[phase] += 1

    def reduce(self) -> dict[str, float]:
        """Mean of each statistic over its phase's updates since the last reduce, then reset; the one host sync."""
        keys = [k for k in self._sum if self._count[STAT_PHASE[k]] > 0]
        values = torch.stack([self._sum[k] for k in keys]).tolist() if keys else []
        out = {k: v / self._count[STAT_PHASE[k]] for k, v in zip(keys, values)}
        self.reset()
        return out

    # the sums since the last log: a run resumed between two log points logs the same means
    def state_dict(self) -> dict:
        return {"sum": {k: v.clone() for k, v in self._sum.items()}, "count": dict(self._count)}

    def load_state_dict(self, state: dict) -> None:
        self._sum = {k: v.to(self.device) for k, v in state["sum"].items()}
        self._count = {k: int(v) for k, v in state["count"].items()}


class SaturationWatch:
    """D wins outright (its loss within eval.saturation_loss_d of its floor) while G's loss explodes.

    eval.saturation_logs such logs in a row open an episode [from_nimg, to_nimg], extended while they last. The
    floor is the lowest loss D's targets allow (core.losses.min_d_loss), or smoothed labels could never saturate.
    """

    def __init__(self, d_loss_floor: float, e: EvalConfig):
        self.d_loss_floor = d_loss_floor
        self.loss_d, self.loss_g, self.logs = e.saturation_loss_d, e.saturation_loss_g, e.saturation_logs
        self.episodes: list[list[int]] = []  # [from_nimg, to_nimg] of each episode, recovered or not
        self._streak = 0  # logs in a row with D saturated
        self._since: int | None = None  # nimg of the streak's first log

    def observe(self, stats: dict[str, float], nimg: int) -> None:
        """Judge one log's statistics; stats gains d/saturated (1 where this log meets the condition, else 0)."""
        stuck = (stats.get(rec.LOSS_D, math.inf) - self.d_loss_floor < self.loss_d
                 and stats.get(rec.LOSS_G, 0.0) > self.loss_g)
        stats[rec.D_SATURATED] = float(stuck)
        if not stuck:
            self._streak, self._since = 0, None
            return
        if self._streak == 0:
            self._since = nimg
        self._streak += 1
        if self._streak == self.logs:
            self.episodes.append([self._since, nimg])
        elif self._streak > self.logs:
            self.episodes[-1][1] = nimg

    def saturated_to(self, nimg: int) -> int | None:
        """Where the last episode began if it lasts to `nimg` (saturated to the end); None if it recovered."""
        last = self.episodes[-1] if self.episodes else None
        return last[0] if last is not None and last[1] == nimg else None

    def state_dict(self) -> dict:
        return {"episodes": [list(ep) for ep in self.episodes], "streak": self._streak, "since": self._since}

    def load_state_dict(self, state: dict) -> None:
        self.episodes = [[int(a), int(b)] for a, b in state["episodes"]]
        self._streak, self._since = int(state["streak"]), state["since"]


class MetricLog:
    """Every metric the run logged, against images seen: the run's curves and where its best values come from."""

    def __init__(self):
        self._series: dict[str, list[tuple[int, float]]] = {}

    def add(self, nimg: int, metrics: dict[str, float]) -> None:
        """Record one log point's values at `nimg`."""
        for k, v in metrics.items():
            self._series.setdefault(k, []).append((nimg, float(v)))

    def __contains__(self, key: str) -> bool:
        return key in self._series

    def keys(self) -> list[str]:
        """Every key logged so far, in the order first logged."""
        return list(self._series)

    def series(self, key: str) -> list[tuple[int, float]]:
        """(nimg, value) of every point of `key`; a KeyError naming the logged keys when it was never logged."""
        if key not in self._series:
            raise KeyError(f"'{key}' was never logged; logged: {', '.join(self._series) or 'nothing'}")
        return list(self._series[key])

    def lowest(self, key: str) -> float | None:
        """The lowest finite value of `key`; None when it has none (never logged, or only NaN and inf)."""
        values = [v for _, v in self._series.get(key, ()) if math.isfinite(v)]
        return min(values) if values else None

    def state_dict(self) -> dict:
        return {k: [[n, v] for n, v in pts] for k, pts in self._series.items()}

    def load_state_dict(self, state: dict) -> None:
        self._series = {k: [(int(n), float(v)) for n, v in pts] for k, pts in state.items()}
