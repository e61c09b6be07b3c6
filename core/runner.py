"""execute_run: one tracked training run, from config to MLflow params, metrics, artifacts and outcome."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path


from core import config as config_mod
from core import records as rec
from core.build import build_run
from core.config import Derived, RunConfig
from core.data import DeviceImages, ImageSet
from core.device import device_name, release_memory
from core.fastpath import PathChoice
from core.hooks import Hooks
from core.models import count_params
from core.plots import plot_run_curves
from core.tracking import dump_json
from core.trainer import RunResult, Trainer

SHOWN_EPISODES = 100  # saturation episodes in the run's tag (the last ones); MLflow caps a tag's length


def run_params(cfg: RunConfig, images: ImageSet, path: PathChoice, *,
               derived: Derived | None = None) -> dict[str, object]:
    """The whole resolved config, the derived values, the path the run computes on and the data actually used,
    as flat params. derived defaults to what cfg gives; execute_run passes the trainer's own."""
    derived = derived or config_mod.derive(cfg)
    params = dict(config_mod.flatten(cfg))
    params.update({f"derived.{k}": v for k, v in dataclasses.asdict(derived).items()})
    params.update(path.params())
    params.update({"dataset.source": images.source, "dataset.images": len(images.images),
                   "dataset.skipped": images.skipped, "dataset.key": images.key})
    return params


def execute_run(cfg: RunConfig, tracker, run_dir: Path, *, images: DeviceImages, hooks: Hooks | None = None,
                on_log: Callable[[int, dict[str, float]], None] | None = None, with_fid: bool = True,
                show_progress: bool = False) -> RunResult:
    """Train (or resume) one run and record everything about it through `tracker`; on_log(nimg, stats) at each log.

    The DeviceImages (core.build.share_images) are shared: runs of one process use one device copy of the images.
    Whatever happens, the run's models, optimizers and batches are freed before this returns.
    show_progress: a bar over each FID/KID pass (and the reference statistics, if not cached yet).
    """
    trainer = build_run(cfg, hooks=hooks, tracker=tracker, run_dir=run_dir, images=images, with_fid=with_fid,
                        on_log=on_log, show_progress=show_progress)
    device = trainer.device
    try:
        with tracker.watching_system():
            return _train_and_record(trainer, cfg, tracker, run_dir, images.image_set)
    finally:
        trainer.close()  # also when an exception's traceback still holds the trainer
        del trainer
        release_memory(device)


def _train_and_record(trainer: Trainer, cfg: RunConfig, tracker, run_dir: Path, images: ImageSet) -> RunResult:
    if not trainer.try_resume():
        run_dir.mkdir(parents=True, exist_ok=True)
        params = run_params(cfg, images, trainer.path_choice, derived=trainer.derived)
        params.update({"model.g_params": count_params(trainer.G), "model.d_params": count_params(trainer.D)})
        tracker.log_params(params)
        (run_dir / "config.json").write_text(config_mod.to_json(cfg))
        tracker.log_artifact(run_dir / "config.json")
        tracker.set_tags(trainer.path_choice.tags())  # every candidate path's img/s, when they were measured
    device = trainer.device
    tracker.set_tags({rec.OUTCOME: rec.Outcome.RUNNING, rec.DEVICE: str(device), rec.DEVICE_NAME: device_name(device)})
    result = trainer.run()

    checkpoint = trainer.save_checkpoint()
    tracker.log_artifact(checkpoint, "checkpoints")
    e = cfg.eval
    curves = plot_run_curves(trainer.metric_log, run_dir / "curves.png", (e.fid_samples, e.fid_final_samples),
                             title=run_dir.name)
    tracker.log_artifact(curves, "plots")
    summary = {"status": result.status, "step": result.step, "nimg": result.nimg, "final": result.final,
               "best": result.best, "primary_metric": trainer.derived.primary_metric,
               rec.DIVERGED_AT: result.diverged_at, rec.SATURATION_EPISODES: result.saturation_episodes,
               "d_steps": trainer.d_steps, "g_steps": trainer.g_steps}
    tracker.log_text(dump_json(summary), "summary.json")
    tags = {rec.OUTCOME: result.status, rec.KIMG_TAG: result.nimg / 1000}
    if result.diverged_at is not None:
        tags[rec.DIVERGED_AT] = result.diverged_at
    if result.saturation_episodes:  # every one, recovered or not; the full list is also in summary.json
        tags[rec.SATURATION_EPISODES] = json.dumps(result.saturation_episodes[-SHOWN_EPISODES:], separators=(",", ":"))
    tags.update({rec.failure_at(mode): nimg for mode, nimg in trainer.failures.items()})
    tracker.set_tags(tags)
    if result.best:  # fid/best, kid/best: each over the evaluations on the training sample count
        tracker.log_metrics({rec.best_key(family): v for family, v in result.best.items()}, step=result.nimg)
    return result
