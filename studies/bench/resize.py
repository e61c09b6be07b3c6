"""Does the device resize give clean-fid's FID? FID of real images A vs B under each resize, pixels compared too.

Run through the bench (a few minutes of CPU Inception for 500 vs 500 images):

    python -m studies.bench --check-resize 500 --check-resolution 128 --batches '' --fid-samples 0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from core.config import RunConfig
from core.data import load_images
from core.errors import UserError
from core.inception import InceptionFeatures, find_weights
from core.metrics import frechet_distance
from core.reference import statistics


def check_resize(cfg: RunConfig, n: int, resolution: int, device: torch.device, roots: Sequence[Path] = (),
                 chunk: int = 100) -> dict:
    """FID of the first n vs the next n images at `resolution`, with eval.fid_resize=clean and =torch."""
    images = load_images(dataclasses.replace(cfg.data, max_images=2 * n), resolution, roots=roots).images
    if len(images) < 2 * n:
        raise UserError(f"--check-resize {n} needs {2 * n} images; the data has {len(images)}")
    halves = [torch.from_numpy(np.array(images[:n])), torch.from_numpy(np.array(images[n:2 * n]))]
    weights = find_weights(cfg.eval.weights)
    out: dict[str, object] = {"images_per_side": n, "resolution": resolution, "device": str(device)}
    feats, extractors = {}, {}
    for mode in ("clean", "torch"):
        extractors[mode] = InceptionFeatures(weights, device, batch=chunk, resize=mode)
        feats[mode] = [extractors[mode].stream(half.split(chunk)) for half in halves]
        a, b = feats[mode]
        out[f"fid_{mode}"] = frechet_distance(*statistics(a), *statistics(b), feats1=a)
    # The network's inputs, compared directly on the first chunk
    sample = halves[0][:chunk]
    resized = {mode: extractors[mode].resize(sample).cpu() for mode in extractors}
    out["pixel_max_abs_diff"] = float((resized["clean"] - resized["torch"]).abs().max())
    out["feature_max_abs_diff"] = float(np.abs(feats["clean"][0] - feats["torch"][0]).max())
    out["fid_rel_diff"] = abs(out["fid_torch"] - out["fid_clean"]) / out["fid_clean"]
    return out
