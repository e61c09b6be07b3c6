"""KID against kimg for one run of a preset, with the two anchors that give it meaning: an untrained G and
held-out real images, all under the preset's own final protocol (same reference, same sample count). Each
point also has FID and the four fidelity/diversity numbers (precision, recall, density, coverage), so the
anchors show what 0 and "real" look like for them too.

This is how the `cpu` preset's length was chosen: where the curve flattens, more training buys little.

    python -m studies.bench.kid_curve                                  # the cpu preset's baseline
    python -m studies.bench.kid_curve --at 0,50,100,200,300 --modes eval,train,standing
    python -m studies.bench.kid_curve --set train.kimg=400 --set model.width=0.5 --out curve.json

Each point trains on from the last (one run, no restarts) and scores G with eval.fid_final_samples samples
against the first eval.fid_ref_images images; `--modes` scores the last point again under other G sampling
modes (eval.g_mode). Held-out real images are the last eval.fid_final_samples images of the set, outside the
reference. Writes JSON (points, anchors, seconds spent training and evaluating) and the last sample grid.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image

from core import config as config_mod
from core import records as rec
from core.build import build_run, share_images
from core.data import load_images
from core.errors import UserError
from core.metrics import measure as measure_features
from core.sampling import evaluated_g
from studies.cli import add_flags, command, data_roots, overrides_from


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.bench.kid_curve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(config_mod.PRESETS), help="preset (default: cpu)")
    add_flags(p, "--data", "--set", "--no-progress")
    p.add_argument("--at", default="0,25,50,100,150,200,300",
                   help="kimg at which to score G, comma-separated, ascending (default: 0,25,50,100,150,200,300)")
    p.add_argument("--modes", default="", help="G sampling modes to score the last point under too (eval,train,standing)")
    p.add_argument("--held-out", action=argparse.BooleanOptionalAction, default=True,
                   help="score held-out real images too (default: --held-out)")
    p.add_argument("--out", type=Path, default=Path("kid_curve.json"), help="JSON results (default: kid_curve.json)")
    return p


def parse_points(text: str) -> list[float]:
    try:
        points = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--at expects comma-separated kimg values, got '{text}'") from None
    if not points or points != sorted(points) or points[0] < 0:
        raise UserError(f"--at must be ascending kimg values >= 0, got '{text}'")
    return points


def score(evaluator, G, n: int) -> dict[str, float]:
    return _row(evaluator(G, n))


def _row(result) -> dict[str, float]:
    kid = result.score(rec.KID)
    return {"kid": kid.value, "kid_se": kid.std_error, "fid": result.score(rec.FID).value,
            **{m: result.score(m).value for m in rec.FIDELITY_DIVERSITY},
            "spread": result.diagnostics[rec.SPREAD_KEY], "nn_ratio": result.diagnostics[rec.NN_RATIO_KEY]}


def held_out_real(evaluator, images: np.ndarray, n: int) -> dict[str, float]:
    """Real images outside the reference, through the same Inception pass and every metric."""
    feats = evaluator.extractor.stream([torch.from_numpy(np.array(images[-n:]))])
    return _row(measure_features(feats, evaluator.ref))


def measure(args: argparse.Namespace) -> dict:
    points = parse_points(args.at)
    cfg = config_mod.resolve(args.preset, {"train.kimg": max(points[-1], 0.001)}, overrides_from(args))
    e = cfg.eval
    images = load_images(cfg.data, cfg.model.resolution, progress=not args.no_progress, roots=data_roots())
    if len(images.images) < e.fid_ref_images + e.fid_final_samples:
        raise UserError(f"need {e.fid_ref_images + e.fid_final_samples} images for a reference and held-out "
                        f"real images; {len(images.images)} loaded")
    trainer = build_run(cfg, images=share_images(cfg, images), show_progress=not args.no_progress)
    n = e.fid_final_samples
    out = {"preset": args.preset, "overrides": overrides_from(args), "samples": n, "ref_images": e.fid_ref_images,
           "g_mode": e.g_mode, "points": [], "train_s": 0.0, "eval_s": 0.0}
    if args.held_out:
        start = time.perf_counter()
        out["held_out_real"] = held_out_real(trainer.evaluate, images.images, n)
        print("held-out real", json.dumps(out["held_out_real"]), flush=True)
        out["eval_s"] += time.perf_counter() - start
    for kimg in points:
        start = time.perf_counter()
        while trainer.nimg < kimg * 1000:
            trainer.train_step()
        losses = trainer.read_stats() if trainer.nimg else {}
        out["train_s"] += time.perf_counter() - start
        start = time.perf_counter()
        row = {"kimg": trainer.nimg / 1000, **score(trainer.evaluate, evaluated_g(cfg, trainer.G, trainer.G_ema), n),
               "loss_d": losses.get(rec.LOSS_D), "loss_g": losses.get(rec.LOSS_G), "train_s": out["train_s"]}
        out["eval_s"] += time.perf_counter() - start
        out["points"].append(row)
        print(json.dumps(row), flush=True)
    out["last_by_mode"] = {}
    for mode in [m for m in args.modes.split(",") if m]:
        other = dataclasses.replace(cfg, eval=dataclasses.replace(e, g_mode=mode))
        trainer.evaluate.cfg = other  # standing batches follow the mode
        out["last_by_mode"][mode] = score(trainer.evaluate, evaluated_g(other, trainer.G, trainer.G_ema), n)
        print(mode, json.dumps(out["last_by_mode"][mode]), flush=True)
    trainer.evaluate.cfg = cfg
    grid = args.out.with_suffix(".png")
    save_image(trainer.sample_grid(), grid, nrow=int(e.grid_size ** 0.5), padding=1)
    out["grid"] = grid.name
    first = out["points"][0]
    if first["kimg"] == 0:
        out["untrained_over_last_kid"] = first["kid"] / max(out["points"][-1]["kid"], 1e-12)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out} and {grid}")
    return out


main = command(build_parser, lambda args: measure(args) and None)


if __name__ == "__main__":
    raise SystemExit(main())
