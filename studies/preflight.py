"""Preflight (`--smoke`): every variant for a few steps on the device the real run would use, before a long study.

    python -m studies.run pooling --smoke                  # default preset on the GPU: minutes, not hours, to find out
    python -m studies.run pooling --smoke --preset quick   # the same check on a CPU (under 3 minutes here)
    python -m studies.search --smoke                       # the search's configuration

Each variant is built exactly as its run would be (preset, --base, variant, --set, and the path it will take,
measured first where this machine has not yet: core/fastpath.py), then: a few training steps
through the real loop (logging, a sample grid, a checkpoint half-way, the final FID/KID on a few samples),
and a second trainer resumed from that checkpoint that must finish the same way (bit-identical on a CPU). One
line per variant: `ok` with its training img/s, or the error. Everything is written to a temporary folder;
the tracking store, the run folders and the FID reference cache of the real study are never touched.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from core import config as config_mod
from core import records as rec
from core.build import build_run, run_path, share_images
from core.config import RunConfig
from core.data import DeviceImages, ImageSet
from core.device import release_memory
from core.fastpath import PathChoice
from core.hooks import Hooks, HookList

SMOKE_STEPS = 4  # training steps per variant: a checkpoint after the 2nd, a timed log interval over the last 2
SMOKE_SAMPLES = 8  # generated images for the final FID/KID (protocol check, not a measurement)
SMOKE_REF_IMAGES = 16  # real images for the throw-away reference statistics


@dataclass(frozen=True)
class SmokeResult:
    variant: str
    ok: bool
    img_per_s: float | None = None
    error: str = ""
    path: str = ""  # the path it trained on (core/fastpath.py)

    def line(self) -> str:
        if self.ok:
            return f"ok    {self.variant:24s} {self.img_per_s:8.1f} img/s  on {self.path}"
        return f"FAIL  {self.variant:24s} {self.error}"


def smoke_config(cfg: RunConfig, cache_dir: Path) -> RunConfig:
    """cfg cut to SMOKE_STEPS steps, logging every 2, checkpoint after 2, a tiny FID; device and precision kept."""
    step_kimg = cfg.train.batch_size / 1000
    return config_mod.apply_overrides(cfg, {
        "train.kimg": SMOKE_STEPS * step_kimg, "train.log_every_kimg": 2 * step_kimg,
        "train.sample_every_kimg": SMOKE_STEPS * step_kimg, "train.checkpoint_every_kimg": 2 * step_kimg,
        "eval.fid_every_kimg": 0.0, "eval.fid_final_samples": SMOKE_SAMPLES, "eval.fid_ref_images": SMOKE_REF_IMAGES,
        "data.cache_dir": str(cache_dir),
    })


def check_variant(name: str, cfg: RunConfig, images: DeviceImages, workdir: Path, hooks: Hooks | None,
                  path: PathChoice | None = None) -> SmokeResult:
    """Train, checkpoint, resume and evaluate one variant (on `path`, else its own choice); any exception becomes
    a FAIL line, never a traceback wall."""
    run_dir = workdir / name
    try:
        first = build_run(cfg, hooks=hooks, run_dir=run_dir, images=images, path=path)
        path_name = first.path.name
        result = first.run()
        if result.status not in (rec.Outcome.FINISHED, rec.Outcome.COLLAPSED):  # collapse is a finding, not a broken setup
            raise RuntimeError(f"run ended '{result.status}' after {result.nimg} images")
        if not (run_dir / "samples").is_dir():
            raise RuntimeError("no sample grid was written")
        finished = {k: v.detach().clone() for k, v in first.G.state_dict().items()}
        device, exact = first.device, first.device.type == "cpu"
        first.close()
        second = build_run(cfg, hooks=hooks, run_dir=run_dir, images=images)
        if not second.try_resume() or second.step != SMOKE_STEPS // 2:
            raise RuntimeError("the half-way checkpoint did not resume")
        again = second.run()
        if again.step != result.step:
            raise RuntimeError(f"resumed run ended at step {again.step}, not {result.step}")
        if exact and any(not torch.equal(finished[k], v) for k, v in second.G.state_dict().items()):
            raise RuntimeError("the resumed run did not end bit-identical to the uninterrupted one")
        second.close()
        return SmokeResult(name, True, img_per_s=result.img_per_s, path=path_name)
    except Exception as exc:  # a broken variant is a finding of the preflight: report it and check the rest
        detail = traceback.extract_tb(exc.__traceback__)[-1]
        where = f" ({Path(detail.filename).name}:{detail.lineno})" if detail else ""
        return SmokeResult(name, False, error=f"{type(exc).__name__}: {exc}"[:300] + where)
    finally:
        release_memory(cfg.train.device if cfg.train.device != "auto" else None)


def preflight(configs: dict[str, RunConfig], images: ImageSet, hooks_for: Callable[[str], list[Hooks]],
              report: Callable[[str], None] = print) -> bool:
    """Smoke-test every (name -> config); reports one line each; True only if all pass."""
    results = []
    with tempfile.TemporaryDirectory(prefix="gan-smoke-") as tmp:
        workdir = Path(tmp)
        smoke = {name: smoke_config(cfg, workdir / "cache") for name, cfg in configs.items()}
        shared = share_images(next(iter(smoke.values())), images)
        for name, cfg in smoke.items():
            hooks = hooks_for(name)
            start = time.perf_counter()
            try:  # the path the real runs will take: measured (or read) in the real cache folder, not the smoke's
                path = run_path(configs[name], images, say=report)
            except Exception as exc:  # noqa: BLE001 (reported as the variant's failure below)
                results.append(SmokeResult(name, False, error=f"choosing its path: {type(exc).__name__}: {exc}"[:300]))
                report(results[-1].line())
                continue
            result = check_variant(name, cfg, shared, workdir / "runs", HookList(hooks) if hooks else None, path)
            results.append(result)
            report(f"{result.line()}   ({time.perf_counter() - start:.0f} s)")
        del shared
    passed = sum(r.ok for r in results)
    report(f"preflight: {passed} of {len(results)} variants passed")
    return passed == len(results)

