"""execute_run: one tracked training run, from config to MLflow params, metrics, artifacts and outcome."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch

from core import config as config_mod
from core.build import build_run
from core.config import RunConfig
from core.data import DeviceImages, ImageSet
from core.device import release_memory
from core.hooks import Hooks
from core.models import count_params
from core.plots import plot_run_curves
from core.tracking import dump_json
from core.trainer import RunResult

SHOWN_EPISODES = 100  # saturation episodes in the run's tag (the last ones); MLflow caps a tag's length


def run_params(cfg: RunConfig, images: ImageSet) -> dict[str, object]:
    """The whole resolved config, the derived values and the data actually used, as flat params."""
    params = dict(config_mod.flatten(cfg))
    params.update({f"derived.{k}": v for k, v in dataclasses.asdict(config_mod.derive(cfg)).items()})
    params.update({"dataset.source": images.source, "dataset.images": len(images.images),
                   "dataset.skipped": images.skipped, "dataset.key": images.key})
    return params


def execute_run(cfg: RunConfig, tracker, run_dir: Path, *, images: ImageSet | DeviceImages,
                hooks: Hooks | None = None, on_log: Callable[[int, dict[str, float]], None] | None = None,
                with_fid: bool = True, show_progress: bool = False) -> RunResult:
    """Train (or resume) one run and record everything about it through `tracker`; on_log(nimg, stats) at each log.

    Given DeviceImages (core.build.share_images), runs of one process share one device copy of the images.
    Whatever happens, the run's models, optimizers and batches are freed before this returns.
    show_progress: a bar over each FID/KID pass (and the reference statistics, if not cached yet).
    """
    trainer = build_run(cfg, hooks=hooks, tracker=tracker, run_dir=run_dir, images=images, with_fid=with_fid,
                        on_log=on_log, show_progress=show_progress)
    device = trainer.device
    try:
        return _train_and_record(trainer, cfg, tracker, run_dir,
                                 images.image_set if isinstance(images, DeviceImages) else images)
    finally:
        trainer.close()  # also when an exception's traceback still holds the trainer
        del trainer
        release_memory(device)


def _train_and_record(trainer, cfg: RunConfig, tracker, run_dir: Path, images: ImageSet) -> RunResult:
    if not trainer.try_resume():
        run_dir.mkdir(parents=True, exist_ok=True)
        params = run_params(cfg, images)
        params.update({"model.g_params": count_params(trainer.G), "model.d_params": count_params(trainer.D)})
        tracker.log_params(params)
        (run_dir / "config.json").write_text(config_mod.to_json(cfg))
        tracker.log_artifact(run_dir / "config.json")
        # The FID reference statistics (32 MB, the same for every child of a parent run) are logged by a
        # run of its own; a child run leaves them to whoever owns its parent.
        if trainer.evaluate is not None and tracker.parent_id is None:
            tracker.log_artifact(trainer.evaluate.ref.path, "fid_reference")
    tracker.set_tags({"outcome": "running", "device": str(trainer.device),
                      "device_name": torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "cpu"})
    result = trainer.run()

    checkpoint = trainer.save_checkpoint()
    tracker.log_artifact(checkpoint, "checkpoints")
    curves = plot_run_curves(trainer.history, run_dir / "curves.png", title=run_dir.name)
    tracker.log_artifact(curves, "plots")
    summary = {"status": result.status, "step": result.step, "nimg": result.nimg, "final_fid": result.final_fid,
               "best_fid": result.best_fid, "final": result.final, "best": result.best,
               "primary_metric": trainer.derived.primary_metric, "diverged_at_nimg": result.diverged_at,
               "saturation_episodes": result.saturation_episodes, "d_steps": trainer.d_steps, "g_steps": trainer.g_steps}
    tracker.log_text(dump_json(summary), "summary.json")
    tags = {"outcome": result.status, "kimg": result.nimg / 1000}
    if result.diverged_at is not None:
        tags["diverged_at_nimg"] = result.diverged_at
    if result.saturation_episodes:  # every one, recovered or not; the full list is also in summary.json
        tags["saturation_episodes"] = json.dumps(result.saturation_episodes[-SHOWN_EPISODES:], separators=(",", ":"))
    tags.update({f"{mode}_at_nimg": nimg for mode, nimg in trainer.failures.items()})
    tracker.set_tags(tags)
    if result.best:  # fid/best, kid/best: each over the evaluations on the training sample count
        tracker.log_metrics({f"{family}/best": v for family, v in result.best.items()}, step=result.nimg)
    return result
