"""Reference statistics, managed in one place: the real images' Inception features, mean and covariance, cached.

A run's metrics compare generated features with these. They are computed once per content key, a hash of
everything that produced them (the images' data key, how many, the protocol version, the resize and the
Inception weights' digest; stylegan's `metric_utils` hashes its dataset arguments the same way), and cached as
fid-ref-KEY.npz (mean, covariance, count) beside fid-ref-KEY.feats.npy (the float32 features, which KID and any
other metric of the features read). A study calls `ensure_reference` before its first run, so no run pays for them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core import records as rec
from core.config import RunConfig
from core.data import ImageSet
from core.device import pick_device
from core.inception import PROTOCOL_VERSION, RESIZES, InceptionFeatures, find_weights, weights_digest, with_bar


@dataclass(frozen=True)
class ReferenceStats:
    """The real images' side of every metric: Gaussian statistics and the features themselves."""
    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    key: str  # hash of everything that produced them
    path: Path  # cached .npz, logged as an artifact
    feats: np.ndarray  # (num_images, 2048) float32 features for KID, memory-mapped from path's .feats.npy


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance as clean-fid computes them (np.cov, rows are samples)."""
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def reference_path(cache_dir: Path, data_key: str, num_images: int, available: int, *,
                   resize: str, weights: str = "") -> tuple[Path, str, int]:
    """Where the reference statistics of these images live, their key, and how many images they cover.

    `weights` is the Inception file's digest (weights_digest): statistics of other weights are never reused.
    """
    n = min(num_images or available, available)
    parts = f"{data_key}|{n}|{PROTOCOL_VERSION}|{RESIZES[resize]}" + (f"|{weights}" if weights else "")
    key = hashlib.sha1(parts.encode()).hexdigest()[:16]
    return cache_dir / f"fid-ref-{key}.npz", key, n


def reference_stats(images: np.ndarray, data_key: str, num_images: int, extractor: InceptionFeatures,
                    cache_dir: Path, progress: bool = False) -> ReferenceStats:
    """Statistics and features of the first `num_images` training images, computed once, cached by content key.

    The features (float32, for KID) sit beside the statistics as fid-ref-KEY.feats.npy; a cache from before
    they were kept, or with either file unreadable, is recomputed.
    """
    path, key, n = reference_path(cache_dir, data_key, num_images, len(images), resize=extractor.resize_mode,
                                  weights=extractor.weights_hash)
    feats_path = path.with_suffix(".feats.npy")
    if path.is_file() and feats_path.is_file():
        try:
            with np.load(path) as z:
                ref = ReferenceStats(z["mu"], z["sigma"], int(z["n"]), key, path, np.load(feats_path, mmap_mode="r"))
            if ref.feats.shape == (ref.num_images, len(ref.mu)):
                return ref
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: recompute below
    chunks = (torch.from_numpy(np.array(images[i:min(i + 1000, n)])) for i in range(0, n, 1000))
    feats = extractor.stream(with_bar(chunks, n, "FID reference statistics", progress))
    mu, sigma = statistics(feats)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".partial-{os.getpid()}.npy")
    np.save(tmp, feats.astype(np.float32))  # features first: the statistics file marks a complete cache
    os.replace(tmp, feats_path)
    tmp = path.with_suffix(f".partial-{os.getpid()}.npz")
    np.savez(tmp, mu=mu, sigma=sigma, n=n)
    os.replace(tmp, path)
    return ReferenceStats(mu, sigma, n, key, path, np.load(feats_path, mmap_mode="r"))


def reference_location(cfg: RunConfig, images: ImageSet) -> tuple[Path, str, int]:
    """Where cfg's reference statistics of these images are cached, their key, and how many images they cover."""
    e = cfg.eval
    return reference_path(Path(cfg.data.cache_dir).expanduser(), images.key, e.fid_ref_images, len(images.images),
                          resize=e.fid_resize, weights=weights_digest(find_weights(e.weights)))


def load_reference(cfg: RunConfig, images: ImageSet, extractor: InceptionFeatures,
                   progress: bool = False) -> ReferenceStats:
    """cfg's reference statistics of these images (eval.fid_ref_images of them), from the cache or computed now."""
    return reference_stats(images.images, images.key, cfg.eval.fid_ref_images, extractor,
                           Path(cfg.data.cache_dir).expanduser(), progress=progress)


def ensure_reference(cfg: RunConfig, images: ImageSet, progress: bool = False) -> None:
    """Compute and cache the reference statistics now, with their own bar, when they are not cached yet.

    A study or search calls this before its first run, so no run's time (or parallel worker) pays for them.
    """
    if cfg.eval.fid_final_samples > 0 and not reference_location(cfg, images)[0].is_file():
        load_reference(cfg, images, InceptionFeatures.for_eval(cfg.eval, pick_device(cfg.train.device)), progress)


def log_reference(tracker, cfg: RunConfig, images: ImageSet, logged: Container[str] = ()) -> str | None:
    """Log cfg's cached reference statistics on `tracker`'s run (a study's or a search's parent, which every run
    was scored against), unless their key is in `logged`; the key logged, or None when nothing was."""
    if cfg.eval.fid_final_samples == 0:
        return None
    path, key, _ = reference_location(cfg, images)
    if key in logged or not path.is_file():
        return None
    tracker.log_artifact(path, rec.REFERENCE_ARTIFACT)
    return key
