"""One bench invocation, measurement by measurement, over its typed spec: the resize check, FLOPs, every batch's
trainer variants against the plain loop, and FID wall times. A report callback runs after each measurement, so a
killed bench leaves what it had measured.

    python -m studies.bench --preset quick --batches 8 --steps 3 --warmup 2 --fid-samples 32 --workers 0  # CPU
    python -m studies.bench --check-resize 500 --batches '' --fid-samples 0   # the resize check alone
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from core import config as config_mod
from core.build import build_run, pick_device, share_images
from core.config import FID_RESIZES, RunConfig, apply_overrides
from core.data import ImageSet, load_images
from core.errors import UserError
from core.inception import find_weights
from studies.bench.plain import image_files, measure_plain, plain_losses
from studies.bench.suite import describe, flops_per_image, free_memory, measure_fid, measure_suite, variants
from studies.bench.table import fid_line, resize_line
from studies.cli import data_roots

H100_BF16_TFLOPS = 989.0  # H100 SXM dense bf16 tensor-core peak
LOSS_CHECK_STEPS = 3  # first steps compared with the plain fp32 step (part of the warm-up)
DEFAULT_WORKERS = min(14, os.cpu_count() or 1)  # 14 on the 16-core H100 host
Report = Callable[[dict, str], None]  # report(result so far, one line on what was just measured)


@dataclass(frozen=True)
class BenchSpec:
    preset: str = "default"  # a key of core.config.PRESETS
    overrides: dict[str, object] = field(default_factory=dict)  # CLI --set and --data
    batches: tuple[int, ...] = (64, 128, 256)  # batch sizes to time; () = no training timings
    steps: int = 100  # timed training steps per config; >= 1
    warmup: int = 10  # untimed steps first; the first LOSS_CHECK_STEPS are compared with the plain step
    fid_samples: int = 10000  # generated images of the timed FID; 0 = skip, else >= 2
    fid_resizes: tuple[str, ...] = FID_RESIZES  # eval.fid_resize values to time FID with
    workers: int = DEFAULT_WORKERS  # DataLoader worker processes of the plain loop
    compile: bool = False  # also time torch.compile variants, NCHW and channels_last (CUDA only here)
    peak_tflops: float = H100_BF16_TFLOPS  # the device's peak for MFU, TFLOP/s
    check_resize: int = 0  # real images per side for the clean vs torch resize FID check; 0 = skip
    check_resolution: int = 128  # image side of that check, px
    command: str = ""  # the command line, recorded in the result


def validate(spec: BenchSpec) -> None:
    """Every bad value, named by its flag, before anything is measured."""
    checks = [(spec.steps >= 1, "--steps must be >= 1"), (spec.warmup >= 0, "--warmup must be >= 0"),
              (spec.fid_samples == 0 or spec.fid_samples >= 2, "--fid-samples must be 0 (skip) or >= 2"),
              (spec.workers >= 0, "--workers must be >= 0"), (spec.peak_tflops > 0, "--peak-tflops must be > 0"),
              (spec.check_resize >= 0, "--check-resize must be >= 0")]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    unknown = [r for r in spec.fid_resizes if r not in FID_RESIZES]
    if unknown:
        raise UserError(f"--fid-resize {','.join(unknown)} is not one of: {', '.join(FID_RESIZES)}")


def run_bench(spec: BenchSpec, report: Report) -> dict:
    """Every measurement of the spec, in order; returns the result that `report` has seen grow."""
    validate(spec)
    cfg = config_mod.resolve(spec.preset, spec.overrides)
    device = pick_device(cfg.train.device)
    result = header(spec, cfg, device)
    files = image_files(cfg, data_roots()) if spec.batches else []  # bad input fails here, before minutes of work
    if spec.fid_samples or spec.check_resize:
        find_weights(cfg.eval.weights)
    if spec.check_resize:
        from studies.bench.resize import check_resize
        result["resize_check"] = check_resize(cfg, spec.check_resize, spec.check_resolution, device, data_roots())
        report(result, resize_line(result["resize_check"]))
    if not spec.batches and not spec.fid_samples:
        return result
    images = load_data(cfg, result)
    result["flops_per_img"] = flops_per_image(cfg, images, device)
    report(result, f"{result['device']}: {len(images.images)} images; {result['flops_per_img'] / 1e9:.2f} GFLOP "
                   "per image of a training step")
    G = None
    for batch in spec.batches:
        G = bench_batch(spec, apply_overrides(cfg, {"train.batch_size": batch}), images, files, device, result,
                        report) or G
    if spec.fid_samples:
        bench_fid(spec, cfg, images, device, G, result, report)
    return result


def header(spec: BenchSpec, cfg: RunConfig, device: torch.device) -> dict:
    """The result before any measurement: what runs where, and the empty lists the measurements fill."""
    return {
        "command": spec.command,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device_type": device.type, "torch": torch.__version__, "peak_tflops": spec.peak_tflops,
        "conv_tf32": torch.backends.cudnn.allow_tf32,  # PyTorch's default: the plain "fp32" loop's convs use TF32
        "steps": spec.steps, "warmup": spec.warmup, "config": config_mod.flatten(cfg),
        "flops_per_img": None, "suite": [], "plain": [], "fid": [], "resize_check": None,
    }


def load_data(cfg: RunConfig, result: dict) -> ImageSet:
    """The decoded images every measurement shares, and what they are in the result."""
    images = load_images(cfg.data, cfg.model.resolution, progress=sys.stderr.isatty(), roots=data_roots())
    result["data"] = {"source": images.source, "images": len(images.images),
                      "resident_gib": images.images.nbytes / 2**30}
    return images


def bench_batch(spec: BenchSpec, cfg: RunConfig, images: ImageSet, files: list, device: torch.device,
                result: dict, report: Report) -> torch.nn.Module | None:
    """Every trainer variant, then the plain loop, at cfg's batch size; returns the last eagerly trained G."""
    config_mod.validate(cfg)
    batch, G = cfg.train.batch_size, None
    plain_ref = plain_losses(cfg, images.images, device, min(LOSS_CHECK_STEPS, spec.warmup))
    for layer in variants(spec.compile):
        cfg_v = apply_overrides(cfg, layer)
        row, trained = time_variant(spec, cfg_v, images, device, plain_ref, result["flops_per_img"])
        if trained is not None and row["compile"] == "off":
            G = trained  # FID samples with the eager module either way; keep the last trained one
        result["suite"].append(row)
        free_memory(device)
        report(result, f"batch {batch}, {row['variant']}: " + (row["error"] or f"{row['img_per_s']:.0f} img/s"))
    plain = time_plain(spec, cfg, files, device)
    result["plain"].append({"batch": batch, **plain})
    for row in result["suite"]:
        if row["batch"] == batch and not row["error"] and plain["img_per_s"]:
            row["ratio"] = row["img_per_s"] / plain["img_per_s"]
    free_memory(device)
    report(result, f"batch {batch}, plain loop: " + (plain.get("error") or f"{plain['img_per_s']:.0f} img/s"))
    return G


def time_variant(spec: BenchSpec, cfg: RunConfig, images: ImageSet, device: torch.device,
                 plain_ref: list[tuple[float, float]], flops_per_img: float) -> tuple[dict, torch.nn.Module | None]:
    """One trainer variant's row (its error instead, if it fails: a result, not a crash) and its trained G."""
    t = cfg.train
    row = {"batch": t.batch_size, "variant": describe(cfg), "compile": t.compile,
           "channels_last": t.channels_last, "amp": t.amp, "error": None}
    if t.compile == "on" and device.type != "cuda":
        row["error"] = "skipped: this bench compiles on CUDA only (python -m studies.bench.cpu times the CPU's)"
        return row, None
    try:
        if t.compile == "on":
            torch._dynamo.reset()  # fresh caches: no recompile limit carried over from another config
        measured, G = measure_suite(cfg, images, device, steps=spec.steps, warmup=spec.warmup, plain_ref=plain_ref)
    except Exception as exc:  # e.g. compile + channels_last failing inside Inductor
        row["error"] = f"{type(exc).__name__}: {exc}"[:1000]
        return row, None
    row.update(measured)
    row["mfu"] = row["img_per_s"] * flops_per_img / (spec.peak_tflops * 1e12)
    return row, G


def time_plain(spec: BenchSpec, cfg: RunConfig, files: list, device: torch.device) -> dict:
    """The plain loop's row at cfg's batch size; its error instead if it fails."""
    try:
        return measure_plain(cfg, files, device, steps=spec.steps, warmup=spec.warmup, workers=spec.workers)
    except Exception as exc:  # e.g. a DataLoader worker killed for memory: keep the suite's numbers
        return {"img_per_s": None, "error": f"{type(exc).__name__}: {exc}"[:1000]}


def bench_fid(spec: BenchSpec, cfg: RunConfig, images: ImageSet, device: torch.device, G: torch.nn.Module | None,
              result: dict, report: Report) -> None:
    """FID wall time for each resize, on the last trained G (an untrained one if no batch was timed)."""
    if G is None:  # an untrained G times the same
        G = build_run(cfg, with_fid=False,
                      images=share_images(cfg, dataclasses.replace(images, images=images.images[:64]))).G
    for resize in spec.fid_resizes:
        result["fid"].append(measure_fid(cfg, images, device, G, spec.fid_samples, resize))
        report(result, fid_line(result["fid"][-1]))
