"""CPU benchmark of the fast path: the suite's trainer against the plain PyTorch loop, Inception before and
after, peak memory. One run, on this machine, the same data for every loop.

    python -m studies.bench.cpu                     # three models, every path, Inception, memory
    python -m studies.bench.cpu --models "32px w1 b64" --no-memory --inception-images 0   # the cpu preset's paths
    python -m studies.bench.cpu --rounds 1 --steps 3 --warmup 3 --inception-images 4 --no-memory --no-compile  # smoke
    python -m studies.bench.cpu --data ~/celeba/img_align_celeba --out bench_cpu.json

Paths, per model: every path train.amp/channels_last/compile=auto may take, timed as core/fastpath.py times
them (alternating rounds, first losses against fp32 eager; nothing read from or written to its cache), with
the one auto takes; compiled paths show their first step (compilation; inductor's cache in data.cache_dir).
Trainer rows, per model: the suite's trainer on the path auto took, the suite's trainer on fp32 eager NCHW, and
the plain loop
(studies/bench/plain.py: a DataLoader decoding the same JPEG files the suite's cache was made from, fp32,
NCHW). Each is warmed up, then timed for --steps steps in each of --rounds rounds; the rounds alternate
between the loops, so load from other processes falls on all of them alike. The table shows the median
round and the best; the ratio is of medians. The suite's first losses are compared with the plain fp32 step
on the same batches and latents. Inception: img/s of the FID feature pass on the same real images, clean
resize included (as FID runs it) and the network alone, as loaded (NCHW) and on the fast path, in
alternating rounds, with the largest feature difference. Peak memory: ru_maxrss of a fresh process that
builds one loop and runs its warm-up and steps, and of a process that only imports torch and the suite, for
scale. These processes start before anything is measured: a process inherits its parent's ru_maxrss through
fork and exec, so they must come from a parent that is still small. The plain loop's DataLoader workers are
shown apart (their RSS counts the pages they share with the loop's process).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from core import config as config_mod
from core import records as rec
from core.build import build_run, path_builder, share_images
from core.config import apply_overrides
from core.data import find_source, load_images
from core.device import (ExecPath, can_compile, candidate_paths, cpu_has_native_bf16, device_name,
                         use_compile_cache)
from core.fastpath import REFERENCE, fastest, ordered, time_paths
from core.errors import UserError
from core.inception import InceptionFeatures, find_weights
from studies.bench.plain import image_files, measure_plain, plain_losses
from studies.cli import add_flags, command, data_roots, overrides_from

MODELS = {  # the quick preset's model and batch, a wider one at a larger batch, and the cpu preset's
    "32px w0.125 b32": {},
    "32px w0.25 b64": {"model.width": 0.25, "train.batch_size": 64},
    "32px w1 b64": {"model.width": 1.0, "train.batch_size": 64, "train.kimg": 60.0},  # a cpu preset run's length
}
FP32 = {"train.amp": "fp32", "train.channels_last": "off", "train.compile": "off"}
LOSS_CHECK_STEPS = 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.bench.cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, "--data")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per loop, alternating (default: 3)")
    p.add_argument("--steps", type=int, default=50, help="timed training steps per round (default: 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before the first round (default: 10)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help=f"DataLoader workers of the plain loop (default: CPU cores = {os.cpu_count()})")
    p.add_argument("--inception-images", type=int, default=128,
                   help="real images per Inception round; 0 = skip Inception (default: 128)")
    p.add_argument("--inception-batch", type=int, default=64,
                   help="images per FID chunk, eval.fid_batch (default: 64, the quick preset's)")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated models to time, of: {'; '.join(MODELS)} (default: all)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the torch.compile paths (a minute or more each to compile cold; default: --compile)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure peak memory in fresh processes (default: --memory)")
    add_flags(p, "--set")
    p.add_argument("--out", type=Path, default=Path("bench_cpu.json"), help="JSON results (default: bench_cpu.json)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for ok, msg in [(args.rounds >= 1, "--rounds must be >= 1"), (args.steps >= 1, "--steps must be >= 1"),
                    (args.warmup >= LOSS_CHECK_STEPS, f"--warmup must be >= {LOSS_CHECK_STEPS}"),
                    (args.workers >= 0, "--workers must be >= 0"), (args.inception_images >= 0,
                    "--inception-images must be >= 0"), (args.inception_batch >= 1, "--inception-batch must be >= 1")]:
        if not ok:
            raise UserError(msg)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        raise UserError(f"--models: unknown model {unknown[0]!r}; choose from: {'; '.join(MODELS)}")


def configs(args: argparse.Namespace) -> dict[str, config_mod.RunConfig]:
    base = {**overrides_from(args), "train.device": "cpu"}
    if not base.get("data.root"):  # the default places, resolved once: every loop then reads the same folder
        base["data.root"] = str(find_source(config_mod.resolve("quick", base).data, data_roots()).path)
    auto = {"train.amp": "auto", "train.channels_last": "auto", "train.compile": "auto" if args.compile else "off"}
    return {name: config_mod.resolve("quick", {**auto, **base}, MODELS[name]) for name in args.models.split(",")}


def measure_paths(cfg: config_mod.RunConfig, images, rounds: int) -> dict:
    """Every path train.amp/channels_last/compile=auto allow, timed now as core.fastpath does (nothing read from
    or written to its cache), and the one auto takes."""
    device = torch.device("cpu")
    use_compile_cache(cfg.data.cache_dir)  # compiled kernels are kept: a second bench compiles in seconds
    allowed = candidate_paths(cfg.train, can_compile(device))
    start = time.perf_counter()
    timings = time_paths(allowed, path_builder(cfg, images, device), device, rounds=rounds)
    seconds = time.perf_counter() - start
    ref = timings[REFERENCE].img_per_s
    rows = [{**t.to_json(), "vs_fp32_eager": t.img_per_s / ref if t.usable and ref else None}
            for t in ordered([timings[p] for p in allowed])]
    images = config_mod.derive(cfg).steps * cfg.train.batch_size
    return {"chosen": fastest([timings[p] for p in allowed], allowed, images).name, "measure_s": seconds,
            "run_kimg": images / 1000, "paths": rows}


def explicit(cfg: config_mod.RunConfig, path: ExecPath) -> config_mod.RunConfig:
    return apply_overrides(cfg, {"train.amp": path.amp, "train.channels_last": "on" if path.channels_last else "off",
                                 "train.compile": "on" if path.compile else "off"})


def suite_losses_and_warmup(trainer, warmup: int) -> list[tuple[float, float]]:
    """Warm-up steps; the first few report their losses (a sync each, never timed)."""
    out = []
    for i in range(warmup):
        trainer.train_step()
        if i < LOSS_CHECK_STEPS:
            stats = trainer.read_stats()
            out.append((stats[rec.LOSS_D], stats[rec.LOSS_G]))
    return out


def time_suite(trainer, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    trainer.read_stats()  # the log-time sync, paid once per round
    return steps * trainer.batch / (time.perf_counter() - start)


def max_rel_diff(ours: list, ref: list) -> float:
    return max(abs(a - b) / max(abs(b), 1e-12) for mine, theirs in zip(ours, ref) for a, b in zip(mine, theirs))


def measure_model(cfg: config_mod.RunConfig, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """Every path as auto measures it; then three loops (the path auto chose, fp32 eager NCHW, the plain loop),
    warmed up, then timed in alternating rounds."""
    device = torch.device("cpu")
    images = load_images(cfg.data, cfg.model.resolution)
    files = image_files(cfg)
    paths = measure_paths(cfg, images, args.rounds)
    cfg_auto = explicit(cfg, ExecPath.parse(paths["chosen"]))
    cfg_fp32 = apply_overrides(cfg, FP32)
    plain_ref = plain_losses(cfg_fp32, images.images, device, LOSS_CHECK_STEPS)
    suites = {"suite auto": build_run(cfg_auto, with_fid=False, images=share_images(cfg_auto, images)),
              "suite fp32": build_run(cfg_fp32, with_fid=False, images=share_images(cfg_fp32, images))}
    rows = {name: {"loop": f"suite {t.path.name}" + (" (auto)" if name == "suite auto" else ""),
                   "img_per_s_rounds": [], "loss_check_max_rel_diff": max_rel_diff(
                       suite_losses_and_warmup(suites[name], args.warmup), plain_ref)}
            for name, t in suites.items()}
    rows["plain"] = {"loop": f"plain fp32 + NCHW, DataLoader {args.workers} workers", "img_per_s_rounds": [],
                     "loss_check_max_rel_diff": None}
    for _ in range(args.rounds):
        for name, trainer in suites.items():
            rows[name]["img_per_s_rounds"].append(time_suite(trainer, args.steps))
        rows["plain"]["img_per_s_rounds"].append(measure_plain(cfg_fp32, files, device, steps=args.steps,
                                                               warmup=args.warmup, workers=args.workers)["img_per_s"])
    plain = statistics.median(rows["plain"]["img_per_s_rounds"])
    for name, row in rows.items():
        row["key"] = name
        row["img_per_s"] = statistics.median(row["img_per_s_rounds"])
        row["best_img_per_s"] = max(row["img_per_s_rounds"])
        row["ratio_vs_plain"] = row["img_per_s"] / plain
    return paths, list(rows.values())


def measure_inception(cfg: config_mod.RunConfig, args: argparse.Namespace) -> dict:
    """FID feature pass img/s, as loaded (NCHW) and on the fast path, on the same real images."""
    weights = find_weights(cfg.eval.weights)
    device = torch.device("cpu")
    images = load_images(cfg.data, cfg.model.resolution)
    n = min(args.inception_images, len(images.images))
    real = torch.from_numpy(np.array(images.images[:n]))
    nets = {"before": InceptionFeatures(weights, device, batch=args.inception_batch, fast=False),
            "after": InceptionFeatures(weights, device, batch=args.inception_batch, fast=True)}
    resized = nets["after"].resize(real[:args.inception_batch])  # float 299x299, for the network-only timing
    out: dict = {"images": n, "batch": args.inception_batch, "weights": str(weights)}
    feats, timings = {}, {(k, part): [] for k in nets for part in ("pass", "net")}
    with torch.no_grad():
        for net in nets.values():  # TorchScript's profiling runs, untimed
            net._forward(resized)
            net._forward(resized)
        for _ in range(args.rounds):
            for key, net in nets.items():
                start = time.perf_counter()
                feats[key] = net(real)
                timings[(key, "pass")].append(n / (time.perf_counter() - start))
                start = time.perf_counter()
                net._forward(resized)
                timings[(key, "net")].append(len(resized) / (time.perf_counter() - start))
    for (key, part), values in timings.items():
        out[f"{key}_{part}_img_per_s"] = statistics.median(values)
        out[f"{key}_{part}_img_per_s_rounds"] = values
    scale = np.abs(feats["before"]).max()
    out["max_feature_diff_of_scale"] = float(np.abs(feats["after"] - feats["before"]).max() / scale)
    return out


def _probe(job: dict, results) -> None:
    """In a fresh process: build one loop, run warm-up and steps, report this process's peak RSS (MiB)."""
    try:
        cfg = config_mod.from_dict(job["config"])
        device = torch.device("cpu")
        children = None
        if job["what"] == "suite":
            trainer = build_run(cfg, with_fid=False,
                                images=share_images(cfg, load_images(cfg.data, cfg.model.resolution)))
            for _ in range(job["warmup"] + job["steps"]):
                trainer.train_step()
        elif job["what"] == "plain":
            measure_plain(cfg, image_files(cfg), device, steps=job["steps"], warmup=job["warmup"],
                          workers=job["workers"])
            children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        elif job["what"] == "inception":
            images = load_images(cfg.data, cfg.model.resolution)
            net = InceptionFeatures(find_weights(cfg.eval.weights), device, batch=job["batch"], fast=job["fast"])
            net(torch.from_numpy(np.array(images.images[:job["images"]])))
        results.put({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                     "workers_peak_rss_mib": children})
    except Exception as exc:  # reported in the table, never a hung parent
        results.put({"error": f"{type(exc).__name__}: {exc}"[:300]})


def peak_memory(job: dict) -> dict:
    ctx = mp.get_context("spawn")  # a fresh interpreter: its peak is this loop's alone
    results = ctx.Queue()
    proc = ctx.Process(target=_probe, args=(job, results))
    proc.start()
    try:
        out = results.get(timeout=900)
    except Exception:  # queue.Empty: the process died without a word (killed for memory, a crash)
        out = {"error": f"no result (exit code {proc.exitcode})"}
    proc.join()
    return out


def memory_jobs(cfgs: dict[str, config_mod.RunConfig], args: argparse.Namespace) -> list[tuple[str, dict]]:
    base = {"steps": args.steps, "warmup": args.warmup, "workers": args.workers}
    quick = next(iter(cfgs.values()))
    jobs = [("import only", {**base, "what": "none", "config": _asdict(quick)})]
    for name, cfg in cfgs.items():
        fp32 = apply_overrides(cfg, FP32)
        jobs += [(f"{name} / suite fp32", {**base, "what": "suite", "config": _asdict(fp32)}),
                 (f"{name} / plain", {**base, "what": "plain", "config": _asdict(fp32)})]
    if args.inception_images:
        for label, fast in (("before", False), ("after", True)):
            jobs.append((f"inception {label}", {**base, "what": "inception", "config": _asdict(quick), "fast": fast,
                                                "batch": args.inception_batch, "images": args.inception_images}))
    return jobs


def _asdict(cfg: config_mod.RunConfig) -> dict:
    return json.loads(config_mod.to_json(cfg))


def cpu_name() -> str:
    return device_name(torch.device("cpu"))


def table(result: dict) -> str:
    lines = [f"{result['cpu']}, {result['cores']} cores, torch {result['torch']}, native bf16: "
             f"{'yes' if result['native_bf16'] else 'no'}; {result['rounds']} rounds x {result['steps']} steps "
             f"after {result['warmup']} warm-up; load average {result['load_start']:.2f} -> {result['load_end']:.2f}",
             f"{'model':<17} {'loop':<44} {'img/s':>7} {'best':>7} {'vs plain':>8} {'loss diff':>9}  peak RSS MiB"]
    for model, rows in result["trainer"].items():
        for row in rows:
            mem = result["memory"].get(f"{model} / {row['key']}", {})
            peak = mem.get("peak_rss_mib")
            peak_text = mem.get("error", "-") if peak is None else f"{peak:.0f}"
            if mem.get("workers_peak_rss_mib"):
                peak_text += f" (workers {mem['workers_peak_rss_mib']:.0f} each, shared pages included)"
            diff = row["loss_check_max_rel_diff"]
            lines.append(f"{model:<17} {row['loop']:<44} {row['img_per_s']:>7.0f} {row['best_img_per_s']:>7.0f} "
                         f"{row['ratio_vs_plain']:>7.2f}x {'-' if diff is None else format(diff, '.1e'):>9} "
                         f" {peak_text}")
    for model, measured in result["paths"].items():
        lines.append(f"{model}: every path as train.*=auto times it ({measured['measure_s']:.0f} s); for a run of "
                     f"{measured['run_kimg']:g} kimg, compile included, auto takes {measured['chosen']}")
        for row in measured["paths"]:
            if row["error"]:
                lines.append(f"    {row['path']:<22} rejected: {row['error']}")
                continue
            lines.append(f"    {row['path']:<22} {row['img_per_s']:>7.0f} img/s  {row['vs_fp32_eager']:.2f}x fp32 eager"
                         f"  first step {row['first_step_s']:5.1f} s  compile/run {row['setup_s']:5.1f} s"
                         f"  loss diff {row['loss_diff']:.1e}"
                         + ("  <- auto" if row["path"] == measured["chosen"] else ""))
    inc = result.get("inception")
    if inc:
        mem = result["memory"]
        for key, label in (("before", "as loaded, NCHW"), ("after", "fast path, NHWC")):
            peak = mem.get(f"inception {key}", {}).get("peak_rss_mib")
            lines.append(f"Inception {key:<6} ({label}): FID pass {inc[f'{key}_pass_img_per_s']:.2f} img/s "
                         f"(clean resize included), network alone {inc[f'{key}_net_img_per_s']:.2f} img/s; "
                         f"batch {inc['batch']}; peak {'-' if peak is None else f'{peak:.0f}'} MiB")
        speedup = {part: inc[f"after_{part}_img_per_s"] / inc[f"before_{part}_img_per_s"] for part in ("pass", "net")}
        lines.append(f"Inception after/before: FID pass {speedup['pass']:.2f}x, network {speedup['net']:.2f}x; "
                     f"max feature difference {inc['max_feature_diff_of_scale']:.1e} of the feature scale")
    if "import only" in result["memory"]:
        base = result["memory"]["import only"].get("peak_rss_mib", 0)
        lines.append(f"peak RSS of a process that only imports torch and the suite: {base:.0f} MiB; "
                     f"of this whole benchmark: {result['bench_peak_rss_mib']:.0f} MiB")
    return "\n".join(lines)


def run_bench(args: argparse.Namespace, command: str) -> dict:
    _check_args(args)
    cfgs = configs(args)
    for cfg in cfgs.values():
        image_files(cfg)  # bad --data fails here, before minutes of measuring
    if args.inception_images:
        find_weights(next(iter(cfgs.values())).eval.weights)
    result: dict = {"command": command, "cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "native_bf16": cpu_has_native_bf16(),
                    "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                    "load_start": os.getloadavg()[0], "paths": {}, "trainer": {}, "inception": None, "memory": {}}
    if args.memory:  # first: children inherit the parent's peak RSS (see the module docstring)
        for label, job in memory_jobs(cfgs, args):
            result["memory"][label] = peak_memory(job)
            print(f"peak memory, {label}: {result['memory'][label]}", file=sys.stderr, flush=True)
    for name, cfg in cfgs.items():
        result["paths"][name], result["trainer"][name] = measure_model(cfg, args)
        print(f"{name}: " + ", ".join(f"{r['key']} {r['img_per_s']:.0f} img/s" for r in result["trainer"][name]),
              file=sys.stderr, flush=True)
    if args.inception_images:
        result["inception"] = measure_inception(next(iter(cfgs.values())), args)
    result["load_end"] = os.getloadavg()[0]
    result["bench_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def bench(args: argparse.Namespace) -> int:
    result = run_bench(args, "python -m studies.bench.cpu " + shlex.join(args.argv))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"wrote {args.out}")
    return 0


main = command(build_parser, bench)


if __name__ == "__main__":
    sys.exit(main())
