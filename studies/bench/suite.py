"""Trainer speed against a plain PyTorch loop, FID wall time and peak memory: one run, the same data.

    python -m studies.bench                        # GPU: batch 64,128,256, FID-10k; table + bench.json
    python -m studies.bench --data /tmp/celeba/img_align_celeba --workers 14 --check-resize 500 \\
        --set eval.weights=/tmp/fid/fid_inception_tf.pt --out $OUT/bench.json        # the H100 session
    python -m studies.bench --compile --batches 256 --fid-samples 0   # + torch.compile, NCHW and channels_last
    python -m studies.bench --preset quick --batches 8 --steps 3 --warmup 2 --fid-samples 32 --workers 0  # CPU
    python -m studies.bench --check-resize 500 --batches '' --fid-samples 0   # FID: clean-fid resize vs torch

For each batch size the suite's trainer is built by core.build.build_run (FID off; bf16 autocast and
channels_last on CUDA), its first losses are checked against the plain fp32 step from the same seed and
batches, and after warm-up its steps are timed between CUDA synchronisations. Then the plain loop
(studies/bench_plain.py: DataLoader, PIL transforms, fp32, NCHW) is timed on the same images. --compile
adds torch.compile variants (NCHW and channels_last); a variant that fails is recorded with its error
instead of ending the bench. MFU = img/s x FLOPs per image of one real training step (counted with
FlopCounterMode) / --peak-tflops. FID is timed on the last trained G for each resize in --fid-resize,
sampling included; reference statistics are computed once (and cached) outside the timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from core import config as config_mod
from core.build import FidEvaluator, build_run, pick_device
from core.config import FID_RESIZES, PRESETS, RunConfig, apply_overrides, parse_set
from core.data import ImageSet, load_images
from core.errors import UserError
from core.metrics import MetricOptions, fid_name, find_weights, generate_uint8
from studies.bench.plain import image_files, measure_plain, plain_losses

H100_BF16_TFLOPS = 989.0  # H100 SXM dense bf16 tensor-core peak
LOSS_CHECK_STEPS = 3  # first steps compared with the plain fp32 step (part of the warm-up)
DEFAULT_WORKERS = min(14, os.cpu_count() or 1)  # 14 on the 16-core H100 host


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="CelebA folder of JPEGs (default: $CELEBA_ROOT, ./data/celeba, "
                   "then ../shared/data/celeba-subset)")
    p.add_argument("--preset", default="default", help=f"config preset: {' | '.join(PRESETS)} (default: default)")
    p.add_argument("--batches", default="64,128,256",
                   help="comma-separated batch sizes; '' = none (default: 64,128,256)")
    p.add_argument("--steps", type=int, default=100, help="timed training steps per config (default: 100)")
    p.add_argument("--warmup", type=int, default=10,
                   help=f"untimed steps first; the first {LOSS_CHECK_STEPS} are checked against the plain step "
                   "(default: 10)")
    p.add_argument("--fid-samples", type=int, default=10000, help="generated images for the timed FID; 0 = skip "
                   "(default: 10000)")
    p.add_argument("--fid-resize", default=",".join(FID_RESIZES),
                   help=f"resizes to time FID with, comma-separated (default: {','.join(FID_RESIZES)})")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help=f"DataLoader workers of the plain loop (default: min(14, CPU cores) = {DEFAULT_WORKERS})")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="also time torch.compile variants, NCHW and channels_last; CUDA only (default: --no-compile)")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS,
                   help=f"the device's peak for MFU, in TFLOP/s (default: {H100_BF16_TFLOPS:g}, H100 SXM dense bf16)")
    p.add_argument("--check-resize", type=int, default=0, metavar="N",
                   help="also compare FID of N vs N real images under both resizes; 0 = skip (default: 0)")
    p.add_argument("--check-resolution", type=int, default=128, help="image side for --check-resize (default: 128)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set eval.weights=PATH (repeatable; default: none)")
    p.add_argument("--out", type=Path, default=Path("bench.json"), help="JSON results (default: bench.json)")
    return p


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} expects comma-separated integers, got '{text}'") from None
    if any(v < 1 for v in values):
        raise UserError(f"{flag} values must be >= 1, got '{text}'")
    return values


def _check_args(args: argparse.Namespace) -> None:
    checks = [(args.steps >= 1, "--steps must be >= 1"), (args.warmup >= 0, "--warmup must be >= 0"),
              (args.fid_samples == 0 or args.fid_samples >= 2, "--fid-samples must be 0 (skip) or >= 2"),
              (args.workers >= 0, "--workers must be >= 0"), (args.peak_tflops > 0, "--peak-tflops must be > 0"),
              (args.check_resize >= 0, "--check-resize must be >= 0")]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    unknown = [r for r in args.fid_resize.split(",") if r and r not in FID_RESIZES]
    if unknown:
        raise UserError(f"--fid-resize {','.join(unknown)} is not one of: {', '.join(FID_RESIZES)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    """Drop the last config's tensors so that the next one's peak memory is its own."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def variants(with_compile: bool) -> list[dict[str, object]]:
    """Overrides of each trainer variant to time: as configured but eager, then the compiled ones."""
    eager = [{"train.compile": False}]
    if not with_compile:
        return eager
    return eager + [{"train.compile": True, "train.channels_last": False},
                    {"train.compile": True, "train.channels_last": True}]


def describe(cfg: RunConfig, device: torch.device) -> str:
    """What the trainer really does with these settings on this device (it ignores CUDA-only ones on CPU)."""
    t, cuda = cfg.train, device.type == "cuda"
    return " ".join(["compiled" if t.compile and cuda else "eager",
                     "channels_last" if t.channels_last and cuda else "NCHW",
                     t.amp if cuda else "fp32"])


def flops_per_image(cfg: RunConfig, images: ImageSet, device: torch.device) -> float:
    """FLOPs of one real training step (D on real and fake, one G step), per generated image."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = 8  # FLOPs per image do not depend on the batch size; keep the count cheap
    cfg = apply_overrides(cfg, {"train.batch_size": batch, "train.compile": False})
    trainer = build_run(cfg, with_fid=False, images=dataclasses.replace(images, images=images.images[:64]))
    with FlopCounterMode(display=False) as counter:
        trainer.train_step()
    return counter.get_total_flops() / batch


def measure_suite(cfg: RunConfig, images: ImageSet, device: torch.device, *, steps: int, warmup: int,
                  plain_ref: list[tuple[float, float]]) -> tuple[dict, torch.nn.Module]:
    """Time the suite's trainer after warm-up; its first losses next to the plain step's. Returns (row, G)."""
    _free(device)
    trainer = build_run(cfg, with_fid=False, images=images)
    ours = []
    for _ in range(len(plain_ref)):
        trainer.train_step()
        stats = trainer.read_stats()  # a sync each step; these steps are warm-up, never timed
        ours.append((stats["loss/d"], stats["loss/g"]))
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
    row = {"img_per_s": steps * cfg.train.batch_size / seconds, "seconds": seconds, "peak_mem_gib": _peak_gib(device),
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
            "value": out[fid_name(samples)], "protocol": out["protocol"]}


def _fmt(value: float | None, spec: str) -> str:
    return format("-", ">" + spec.split(".")[0]) if value is None else format(value, spec)


def table(result: dict) -> str:
    """The printed summary: one line per batch and trainer variant, then FID."""
    gflop = None if result["flops_per_img"] is None else result["flops_per_img"] / 1e9
    lines = [f"device: {result['device']}, torch {result['torch']}; one training step = {_fmt(gflop, '.2f')} GFLOP "
             f"per image; MFU against {result['peak_tflops']:g} TFLOP/s",
             f"{'batch':>5}  {'trainer':<28} {'img/s':>9} {'plain':>8} {'ratio':>6} {'MFU':>6} {'mem GiB':>8} "
             f"{'plain GiB':>9} {'loss diff':>9}"]
    if not result["suite"]:
        lines = lines[:1] if result["flops_per_img"] else []
    plain = {row["batch"]: row for row in result["plain"]}
    for row in result["suite"]:
        p = plain.get(row["batch"], {})
        if row.get("error"):
            lines.append(f"{row['batch']:>5}  {row['variant']:<28} failed: {row['error'][:80]}")
            continue
        mfu = None if row.get("mfu") is None else 100 * row["mfu"]
        lines.append(f"{row['batch']:>5}  {row['variant']:<28} {row['img_per_s']:>9.0f} "
                     f"{_fmt(p.get('img_per_s'), '8.0f')} {_fmt(row.get('ratio'), '5.2f')}x {_fmt(mfu, '5.1f')}% "
                     f"{_fmt(row['peak_mem_gib'], '8.2f')} {_fmt(p.get('peak_mem_gib'), '9.2f')} "
                     f"{_fmt(row['loss_check']['max_rel_diff'], '9.1e')}")
    lines += [fid_line(f) for f in result["fid"]]
    if result.get("resize_check"):
        lines.append(resize_line(result["resize_check"]))
    return "\n".join(lines)


def fid_line(f: dict) -> str:
    return (f"FID with {f['samples']} samples, resize {f['resize']}: {f['seconds']:.2f} s "
            f"(setup {f['setup_seconds']:.1f} s), FID {f['value']:.3f}")


def resize_line(c: dict) -> str:
    return (f"resize check, {c['images_per_side']} vs {c['images_per_side']} real images at {c['resolution']}px: "
            f"FID clean {c['fid_clean']:.4f}, torch {c['fid_torch']:.4f}, relative difference "
            f"{100 * c['fid_rel_diff']:.3f}%, max pixel difference {c['pixel_max_abs_diff']:.1e}")


def run_bench(args: argparse.Namespace, command: str, report: Callable[[dict, str], None]) -> dict:
    """Every measurement; `report(result, line)` runs after each one, so a killed run leaves what it had."""
    _check_args(args)
    batches = _ints(args.batches, "--batches")
    overrides: dict[str, object] = dict(parse_set(args.set))
    if args.data is not None:
        overrides["data.root"] = args.data
    cfg = config_mod.resolve(args.preset, overrides)
    device = pick_device(cfg.train.device)
    result: dict = {
        "command": command,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device_type": device.type, "torch": torch.__version__, "peak_tflops": args.peak_tflops,
        "conv_tf32": torch.backends.cudnn.allow_tf32,  # PyTorch's default: the plain "fp32" loop's convs use TF32
        "steps": args.steps, "warmup": args.warmup, "config": config_mod.flatten(cfg),
        "flops_per_img": None, "suite": [], "plain": [], "fid": [], "resize_check": None,
    }
    files = image_files(cfg) if batches else []  # bad input fails here, before minutes of measuring
    if args.fid_samples or args.check_resize:
        find_weights(cfg.eval.weights)
    if args.check_resize:
        from studies.bench.resize import check_resize
        result["resize_check"] = check_resize(cfg, args.check_resize, args.check_resolution, device)
        report(result, resize_line(result["resize_check"]))
    if not batches and not args.fid_samples:
        return result
    images = load_images(cfg.data, cfg.model.resolution, progress=sys.stderr.isatty())
    result["data"] = {"source": images.source, "images": len(images.images),
                      "resident_gib": images.images.nbytes / 2**30}
    result["flops_per_img"] = flops_per_image(cfg, images, device)
    report(result, f"{result['device']}: {len(images.images)} images; {result['flops_per_img'] / 1e9:.2f} GFLOP "
                   "per image of a training step")
    G = None
    for batch in batches:
        cfg_b = apply_overrides(cfg, {"train.batch_size": batch})
        config_mod.validate(cfg_b)
        plain_ref = plain_losses(cfg_b, images.images, device, min(LOSS_CHECK_STEPS, args.warmup))
        for layer in variants(args.compile):
            cfg_v = apply_overrides(cfg_b, layer)
            row = {"batch": batch, "variant": describe(cfg_v, device), "compile": cfg_v.train.compile,
                   "channels_last": cfg_v.train.channels_last, "amp": cfg_v.train.amp, "error": None}
            if cfg_v.train.compile and device.type != "cuda":
                row["error"] = "skipped: the trainer compiles only on CUDA"
            else:
                try:
                    if cfg_v.train.compile:
                        torch._dynamo.reset()  # fresh caches: no recompile limit carried over from another config
                    measured, G_v = measure_suite(cfg_v, images, device, steps=args.steps, warmup=args.warmup,
                                                  plain_ref=plain_ref)
                    row.update(measured)
                    row["mfu"] = row["img_per_s"] * result["flops_per_img"] / (args.peak_tflops * 1e12)
                    if not cfg_v.train.compile:
                        G = G_v  # FID samples with the eager module either way; keep the last trained one
                except Exception as exc:  # a failing variant (e.g. compile + channels_last) is a result, not a crash
                    row["error"] = f"{type(exc).__name__}: {exc}"[:1000]
            result["suite"].append(row)
            _free(device)
            report(result, f"batch {batch}, {row['variant']}: " + (row["error"] or f"{row['img_per_s']:.0f} img/s"))
        try:
            measured = measure_plain(cfg_b, files, device, steps=args.steps, warmup=args.warmup, workers=args.workers)
        except Exception as exc:  # e.g. a DataLoader worker killed for memory: keep the suite's numbers
            measured = {"img_per_s": None, "error": f"{type(exc).__name__}: {exc}"[:1000]}
        result["plain"].append({"batch": batch, **measured})
        for row in result["suite"]:
            if row["batch"] == batch and not row["error"] and measured["img_per_s"]:
                row["ratio"] = row["img_per_s"] / measured["img_per_s"]
        _free(device)
        report(result, f"batch {batch}, plain loop: " + (measured.get("error") or f"{measured['img_per_s']:.0f} img/s"))
    if args.fid_samples:
        if G is None:  # no batch timed: an untrained G times the same
            G = build_run(cfg, with_fid=False, images=dataclasses.replace(images, images=images.images[:64])).G
        for resize in (r for r in args.fid_resize.split(",") if r):
            result["fid"].append(measure_fid(cfg, images, device, G, args.fid_samples, resize))
            report(result, fid_line(result["fid"][-1]))
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "python -m studies.bench " + shlex.join(sys.argv[1:] if argv is None else argv)

    def report(result: dict, line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    try:
        result = run_bench(args, command, report)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
