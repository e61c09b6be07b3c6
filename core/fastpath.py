"""The fastest path this machine has for a run, chosen by measurement: precision, memory format, torch.compile.

`train.amp`, `train.channels_last` and `train.compile` set to `auto` leave their dimension open; every path
they allow (core.device.candidate_paths: {bf16, fp32} x {NHWC, NCHW} x {eager, compiled}) is built from the
run's own config and timed for a few training steps here, in alternating rounds so that load from other
processes falls on all of them alike. A path whose first losses differ from the fp32 eager NCHW step's by
more than LOSS_RTOL is rejected (so is one that fails, e.g. a compile error); of the rest, the one that
trains a run of the config's length soonest wins: img/s, plus for a compiled path the compile every run pays
(measured again with inductor's cache warm, as runs after the first find it), which a short run may not
earn back. Explicit values always win: with all three set nothing is measured.

What was measured is kept in `<data.cache_dir>/fastpath.json`, per (device name, threads, torch version, model
config, batch size): a study measures once per model, and later studies on this machine not at all. A CPU
measurement taken while other processes kept the cores busy (OtherLoad) is used by its process but not cached. The
measuring itself is `time_paths`, the choice `fastest`: separate, so the choice is tested on made-up timings.
A path already SLOW_FACTOR times slower than the fastest at its first steady step is not timed further (nor
compiled): such a gap decides the choice, and timing it in full cost minutes.
Why measure: CPUs that share a name and a flag differ. The cpu preset's model on 2 cores, fastest bf16 path
against fastest fp32 path: an AMD EPYC with AVX512_BF16, bf16 + NHWC 1.7x faster (255 against 154 img/s); an
Intel Xeon with the same flag, compiled fp32 NCHW fastest and bf16 1.3x slower; an Intel Xeon with AMX-BF16 too,
bf16 + NCHW compiled 2.1x faster (446 against 212 img/s); an AMD EPYC without AVX512_BF16, bf16 20x slower.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from core import config as config_mod
from core import records as rec
from core.config import RunConfig
from core.cpuload import BUSY_SHARE, OtherLoad
from core.device import (ExecPath, can_compile, candidate_paths, device_name, first_line, unmeasured_path,
                         use_compile_cache)

LOSS_STEPS = 3  # first training steps whose losses are compared with the fp32 eager path's
# bf16 against fp32 from the same weights and batches: tests/test_device.py's tolerance over the first steps
# (bf16 rounding, then Adam's sign-sized first updates; measured up to 1.8e-2 over 5 steps)
LOSS_RTOL = 5e-2
ROUNDS = 3  # timed rounds per path, alternating between paths; the median round counts
ROUND_S = 0.5  # a timed round lasts about this long (its step count comes from one timed step)
MAX_ROUND_STEPS = 50
# a path whose steady step takes this many times the fastest path's is out of the race: it is not timed further,
# and its compiled twin (same precision and layout) is not compiled. On a 2-core AMD EPYC without AVX512_BF16 the
# cpu preset's bf16 paths ran at 6 img/s eager and compiled alike against fp32's 125-136, and timing them in full
# took 400 of the measurement's 507 s; where bf16 is native they were within 2x of fp32, faster or slower
SLOW_FACTOR = 4.0
RECOMPILE_LIMIT = 64  # dynamo's graphs per compiled function while every path is measured at once
REFERENCE = ExecPath("fp32", False, False)  # the arithmetic every other path is checked against
SLOW = f"over {SLOW_FACTOR:g}x slower a step than the fastest path"
CACHE_FILE = "fastpath.json"
CACHE_FORMAT = 2
PATH_FILE = "path.json"  # beside a run's checkpoint: the path it was trained on, kept on resume


@dataclass(frozen=True)
class Timing:
    """One path as measured: its training img/s, or why it cannot be used."""
    path: ExecPath
    img_per_s: float | None = None  # None: rejected or failed (see error)
    first_step_s: float = 0.0  # the first step: compilation for a compiled path, allocations for an eager one
    loss_diff: float = 0.0  # largest relative difference of its first losses from the fp32 eager path's
    error: str = ""
    setup_s: float = 0.0  # what each run on this path spends before its steps run at speed: a compiled path's
                          # compile with inductor's cache warm (as every run after the first has it); 0 eager

    @property
    def usable(self) -> bool:
        return self.img_per_s is not None and not self.error

    def describe(self) -> str:
        if not self.usable:
            return f"{self.path.name} rejected: {self.error}"
        first = f", compiles {self.setup_s:.0f} s a run ({self.first_step_s:.0f} s cold)" if self.path.compile else ""
        return f"{self.path.name} {self.img_per_s:.0f} img/s{first}"

    def run_seconds(self, images: int) -> float:
        """Seconds a run of `images` training images takes on this path: its setup, then its steps."""
        return self.setup_s + images / self.img_per_s

    def to_json(self) -> dict:
        return {**asdict(self), "path": self.path.name}

    @classmethod
    def from_json(cls, d: dict) -> Timing:
        return cls(**{**d, "path": ExecPath.parse(d["path"])})


@dataclass(frozen=True)
class PathChoice:
    """The path a run takes and how it was decided."""
    path: ExecPath
    source: str  # explicit | measured | cached | resumed (a run continues on its checkpoint's path) | unmeasured
    timings: tuple[Timing, ...] = ()
    measure_s: float = 0.0  # seconds spent measuring for this choice (0 when it came from the cache)

    def params(self) -> dict[str, object]:
        return {**self.path.params(), "derived.path_source": self.source}

    def tags(self) -> dict[str, str]:
        """The candidates' img/s (or why each was rejected), fastest first, as one MLflow tag."""
        return {rec.PATH_CANDIDATES: "; ".join(t.describe() for t in ordered(self.timings))} if self.timings else {}

    def line(self) -> str:
        if not self.timings:
            return f"path {self.path.name} ({self.source})"
        spent = f" in {self.measure_s:.0f} s" if self.source == "measured" else ""
        return f"path {self.path.name} ({self.source}{spent}: " + "; ".join(t.describe() for t in ordered(self.timings)) + ")"


def ordered(timings: Sequence[Timing]) -> list[Timing]:
    """Usable paths fastest first, then the rejected ones."""
    return sorted(timings, key=lambda t: (not t.usable, -(t.img_per_s or 0.0)))


def fastest(timings: Sequence[Timing], allowed: Sequence[ExecPath], images: int = 0) -> ExecPath:
    """The usable path among `allowed` that trains a run of `images` images soonest, its compile included (0:
    the highest img/s); when none is usable (every one failed), the first allowed eager one, so that the run
    reports its own error instead of this choice hiding it."""
    usable = [t for t in timings if t.path in allowed and t.usable]
    if usable:
        if images:
            return min(usable, key=lambda t: t.run_seconds(images)).path
        return max(usable, key=lambda t: t.img_per_s).path
    return next((p for p in allowed if not p.compile), allowed[0])


def cache_description(cfg: RunConfig, device: torch.device) -> dict[str, object]:
    """What a measurement depends on: the machine, the threads it may use, torch, the model and the batch."""
    return {"device": device_name(device), "threads": torch.get_num_threads() if device.type == "cpu" else 0,
            "torch": torch.__version__, "model": asdict(cfg.model), "batch": cfg.train.batch_size}


def cache_key(description: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


class PathCache:
    """Measured timings per cache key in one JSON file, written whole and atomically (parallel processes may
    race: each writes a complete file, the last one stays)."""

    def __init__(self, cache_dir: str):
        self.path = Path(cache_dir).expanduser() / CACHE_FILE

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data.get("entries", {}) if data.get("format") == CACHE_FORMAT else {}

    def get(self, key: str) -> dict[ExecPath, Timing]:
        entry = self._read().get(key, {})
        try:
            return {t.path: t for t in map(Timing.from_json, entry.get("timings", []))}
        except (TypeError, ValueError, KeyError):
            return {}  # a file from another version: measure again

    def put(self, key: str, description: dict, timings: dict[ExecPath, Timing]) -> None:
        entries = self._read()
        entries[key] = {"description": description, "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "timings": [t.to_json() for t in timings.values()]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": CACHE_FORMAT, "entries": entries}, indent=1))
        os.replace(tmp, self.path)


@dataclass
class _Trial:
    path: ExecPath
    trainer: object = None
    losses: list[tuple[float, float]] = field(default_factory=list)
    first_step_s: float = 0.0
    rounds: list[float] = field(default_factory=list)
    error: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel_diff(ours: list[tuple[float, float]], ref: list[tuple[float, float]]) -> float:
    diffs = [abs(a - b) / max(abs(b), 1e-12) for mine, theirs in zip(ours, ref) for a, b in zip(mine, theirs)]
    return max(diffs) if all(map(math.isfinite, diffs)) else math.inf


def time_paths(paths: Sequence[ExecPath], build: Callable[[ExecPath], object], device: torch.device,
               rounds: int | None = None, round_s: float | None = None) -> dict[ExecPath, Timing]:
    """Build a trainer per path (and the fp32 eager reference), run LOSS_STEPS steps reading their losses, then
    time `rounds` (ROUNDS) alternating rounds of about round_s (ROUND_S) each. A path whose steady step takes
    over SLOW_FACTOR times the fastest one's so far is rejected at once, and its compiled twin not built (eager
    paths go first). Every trainer is closed before this returns."""
    rounds, round_s = rounds or ROUNDS, round_s or ROUND_S
    todo = list(dict.fromkeys([REFERENCE, *sorted(paths, key=lambda p: p.compile)]))  # eager twins first
    trials = [_Trial(p) for p in todo]
    try:
        # a compile error rejects its path here; and the paths' graphs of one forward (dtype, layout, grad modes)
        # are live together, more than dynamo's default recompile limit of 8, past which it would run eagerly
        with torch._dynamo.config.patch(suppress_errors=False, recompile_limit=RECOMPILE_LIMIT):
            best = math.inf  # the fastest steady step (any but a path's first) of the paths so far
            for trial in trials:
                twin = next((t for t in trials if trial.path.compile and t.path == replace(trial.path, compile=False)
                             and t.error.startswith(SLOW)), None)
                if twin:  # compiling has not made up such a gap on a CPU (module docstring): not paid for
                    trial.error = f"not compiled: {twin.path.name} was {twin.error}"
                    continue
                try:
                    trial.trainer = build(trial.path)
                    for i in range(LOSS_STEPS):
                        start = time.perf_counter()
                        trial.trainer.train_step()
                        stats = trial.trainer.read_stats()
                        seconds = time.perf_counter() - start
                        trial.losses.append((stats[rec.LOSS_D], stats[rec.LOSS_G]))
                        if i == 0:
                            trial.first_step_s = seconds
                            continue
                        if trial.path.compile and i < LOSS_STEPS - 1:
                            continue  # a compiled path's second step may still be compiling: judged on its last
                        if seconds > SLOW_FACTOR * best:
                            trial.error = f"{SLOW} ({seconds / best:.0f}x), not timed further"
                            break
                        best = min(best, seconds)
                except Exception as exc:  # noqa: BLE001 (any failure of a path only rejects it)
                    trial.error = first_line(exc)
                if trial.error:
                    _close(trial)
            live = [t for t in trials if not t.error]
            steps = {}
            for trial in live:  # one timed step sizes the rounds
                start = time.perf_counter()
                trial.trainer.train_step()
                _sync(device)
                steps[trial.path] = max(1, min(MAX_ROUND_STEPS, math.ceil(round_s / max(time.perf_counter() - start,
                                                                                         1e-6))))
            for _ in range(rounds):
                for trial in live:
                    n = steps[trial.path]
                    start = time.perf_counter()
                    for _ in range(n):
                        trial.trainer.train_step()
                    trial.trainer.read_stats()  # the log-time sync, as in a run
                    trial.rounds.append(n * trial.trainer.batch / (time.perf_counter() - start))
    finally:
        for trial in trials:
            _close(trial)
    ref = trials[0].losses
    out = {}
    for trial in trials:
        if trial.error:
            out[trial.path] = Timing(trial.path, first_step_s=trial.first_step_s, error=trial.error)
            continue
        diff = _rel_diff(trial.losses, ref) if ref else math.inf
        error = "" if diff <= LOSS_RTOL else (f"first losses differ from fp32 eager by {diff:.1e} (> {LOSS_RTOL:g})"
                                               if ref else "the fp32 eager reference failed")
        out[trial.path] = Timing(trial.path, statistics.median(trial.rounds), trial.first_step_s, diff, error,
                                 setup_s=trial.first_step_s if trial.path.compile else 0.0)
    return _warm_setup(out, build, device)


def _warm_setup(timings: dict[ExecPath, Timing], build: Callable[[ExecPath], object],
                device: torch.device) -> dict[ExecPath, Timing]:
    """For each compiled path faster than every eager one, what a later run pays to compile it: a fresh trainer's
    first step, inductor's cache now warm, beyond its second step. (A slower compiled path keeps its cold first
    step as an upper bound: it loses either way.)"""
    eager = max((t.img_per_s for t in timings.values() if t.usable and not t.path.compile), default=0.0)
    for path, timing in timings.items():
        if not (path.compile and timing.usable and timing.img_per_s > eager):
            continue
        torch._dynamo.reset()  # as between two runs (Trainer.close)
        trainer = build(path)
        try:
            seconds = []
            for _ in range(2):
                start = time.perf_counter()
                trainer.train_step()
                trainer.read_stats()
                seconds.append(time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 (a path that compiled once and not twice is not one to trust)
            timings[path] = replace(timing, img_per_s=None, error=first_line(exc))
            continue
        finally:
            trainer.close()
        timings[path] = replace(timing, setup_s=max(0.0, seconds[0] - seconds[1]))
    return timings


def _close(trial: _Trial) -> None:
    if trial.trainer is not None:
        trial.trainer.close()
        trial.trainer = None


_UNTRUSTED: dict[tuple[str, str], dict[ExecPath, Timing]] = {}  # (cache file, key) -> timings measured under
                                                                   # load, for this process only


def choose_path(cfg: RunConfig, device: torch.device, build: Callable[[ExecPath], object] | None,
                progress: Callable[[str], None] | None = None) -> PathChoice:
    """The path a run of cfg takes on device: explicit settings, else the fastest measured path (from the cache
    in cfg.data.cache_dir, measuring now what it lacks). `build(path)` makes a trainer of cfg on that path;
    without it nothing is measured, and a path the cache does not know yet is core.device.unmeasured_path."""
    allowed = candidate_paths(cfg.train, can_compile(device))
    if len(allowed) == 1:
        return PathChoice(allowed[0], "explicit")
    if any(p.compile for p in allowed):
        use_compile_cache(cfg.data.cache_dir)
    cache = PathCache(cfg.data.cache_dir)
    description = cache_description(cfg, device)
    key = cache_key(description)
    known = {**cache.get(key), **_UNTRUSTED.get((str(cache.path), key), {})}
    missing = [p for p in dict.fromkeys([REFERENCE, *allowed]) if p not in known]
    spent = 0.0
    if missing and build is None:
        return PathChoice(unmeasured_path(cfg.train, device.type), "unmeasured")
    if missing:
        if progress:
            progress(f"measuring {len(missing)} paths ({', '.join(p.name for p in missing)}) for "
                     f"{cfg.model.resolution} px width {cfg.model.width:g} batch {cfg.train.batch_size}")
        start = time.perf_counter()
        with OtherLoad() as load:
            known = {**known, **time_paths(missing, build, device)}
        spent = time.perf_counter() - start
        if device.type == "cpu" and load.share > BUSY_SHARE:
            _UNTRUSTED[(str(cache.path), key)] = known  # used by this process, measured again by the next one
            if progress:
                progress(f"note: other processes kept {load.share:.0%} of the CPU busy while the paths were timed; "
                         "this choice is not cached, the next study measures again")
        else:
            cache.put(key, description, known)
    timings = tuple(known[p] for p in allowed)
    images = config_mod.derive(cfg).steps * cfg.train.batch_size  # the run's length decides whether compiling pays
    return PathChoice(fastest(timings, allowed, images), "measured" if missing else "cached", timings, spent)


def recorded_path(run_dir: Path | None) -> ExecPath | None:
    """The path a run's checkpoint was written on (run_dir/path.json beside checkpoint.pt), for its resume."""
    if run_dir is None or not (run_dir / "checkpoint.pt").is_file():
        return None
    try:
        return ExecPath.parse(json.loads((run_dir / PATH_FILE).read_text())["path"])
    except (OSError, ValueError, KeyError):
        return None



def record_path(run_dir: Path, path: ExecPath) -> None:
    (run_dir / PATH_FILE).write_text(json.dumps({"path": path.name}))

