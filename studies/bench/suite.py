"""The suite's side of the bench: its trainer timed after warm-up, FLOPs of a training step, and FID wall time.

    python -m studies.bench --batches 128 --fid-samples 10000   # measure_suite per variant, measure_fid per resize

Each trainer is built by core.build.build_run (FID off; on the path train.amp/channels_last/compile give), its first
losses are kept for the comparison with the plain fp32 step, and its steps are timed between CUDA syncs.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time

import torch

from core import records as rec
from core.build import build_run, share_images
from core.config import RunConfig, apply_overrides
from core.data import ImageSet
from core.metrics import FidEvaluator, MetricOptions, generate_uint8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Drop the last config's tensors so that the next one's peak memory is its own."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def variants(with_compile: bool) -> list[dict[str, object]]:
    """Overrides of each trainer variant to time: as configured but eager, then the compiled ones."""
    eager = [{"train.compile": "off"}]
    if not with_compile:
        return eager
    return eager + [{"train.compile": "on", "train.channels_last": "off"},
                    {"train.compile": "on", "train.channels_last": "on"}]


def describe(cfg: RunConfig) -> str:
    """The settings a variant asks for (the measured row names the path its trainer really took)."""
    t = cfg.train
    return f"amp={t.amp} channels_last={t.channels_last} compile={t.compile}"


def flops_per_image(cfg: RunConfig, images: ImageSet, device: torch.device) -> float:
    """FLOPs of one real training step (D on real and fake, one G step), per generated image."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = 8  # FLOPs per image do not depend on the batch size; keep the count cheap
    cfg = apply_overrides(cfg, {"train.batch_size": batch, "train.compile": "off"})
    trainer = build_run(cfg, with_fid=False, images=share_images(cfg, dataclasses.replace(images, images=images.images[:64])))
    with FlopCounterMode(display=False) as counter:
        trainer.train_step()
    return counter.get_total_flops() / batch


def measure_suite(cfg: RunConfig, images: ImageSet, device: torch.device, *, steps: int, warmup: int,
                  plain_ref: list[tuple[float, float]]) -> tuple[dict, torch.nn.Module]:
    """Time the suite's trainer after warm-up; its first losses next to the plain step's. Returns (row, G)."""
    free_memory(device)
    trainer = build_run(cfg, with_fid=False, images=share_images(cfg, images))
    ours = []
    for _ in range(len(plain_ref)):
        trainer.train_step()
        stats = trainer.read_stats()  # a sync each step; these steps are warm-up, never timed
        ours.append((stats[rec.LOSS_D], stats[rec.LOSS_G]))
    for _ in range(warmup - len(plain_ref)):
        trainer.train_step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    _sync(device)
    seconds = time.perf_counter() - start
    finite = all(math.isfinite(v) for v in trainer.read_stats().values())
    diffs = [abs(a - b) / max(abs(b), 1e-12) for mine, ref in zip(ours, plain_ref) for a, b in zip(mine, ref)]
    row = {"variant": trainer.path.name, "img_per_s": steps * cfg.train.batch_size / seconds, "seconds": seconds, "peak_mem_gib": _peak_gib(device),
           "finite": finite,
           "loss_check": {"suite": ours, "plain": plain_ref, "max_rel_diff": max(diffs, default=None)}}
    return row, trainer.G


def measure_fid(cfg: RunConfig, images: ImageSet, device: torch.device, G: torch.nn.Module, samples: int,
                resize: str) -> dict:
    """Wall time of one FID of `samples` generated images (sampling included), after a warm-up evaluation."""
    cfg = apply_overrides(cfg, {"eval.fid_resize": resize})
    start = time.perf_counter()
    evaluator = FidEvaluator(cfg, images, device)  # weights and reference statistics (cached by key)
    setup = time.perf_counter() - start
    # The pipeline without the statistics, untimed: TorchScript's profiling runs and cuDNN autotuning
    e = cfg.eval
    warm = MetricOptions(G=G, z_dim=cfg.model.z_dim, num_samples=min(samples, 2 * e.fid_batch), ref=evaluator.ref,
                         extractor=evaluator.extractor, device=device, g_mode=e.g_mode, batch=e.fid_batch)
    evaluator.extractor.stream(generate_uint8(warm))
    _sync(device)
    start = time.perf_counter()
    out = evaluator(G, samples)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"resize": resize, "samples": samples, "seconds": seconds, "setup_seconds": setup,
            "value": out.value, "protocol": out.protocol}
