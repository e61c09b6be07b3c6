"""CelebA, decoded once into a uint8 cache and served as batches drawn on the training device.

JPEG decoding is the bottleneck of a plain DataLoader loop (~1,650 img/s on an H100 host), so images are
centre-cropped, resized and stored once as an (N, 3, R, R) uint8 array keyed by source and resolution. At
training time the whole array sits in device memory (full CelebA at 128x128 is ~10 GB) and a batch is one
random gather there: no DataLoader, no host round trip in the hot loop. DeviceImages is that device copy,
made once per process and shared read-only by its runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.config import DataConfig
from core.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PREPROCESS = "centercrop-square+pil-bicubic-v1"  # part of the cache key: change it when preprocessing changes
GET_CELEBA = ("get CelebA from Kaggle (img_align_celeba.zip) or torchvision, "
              "then pass --data PATH or set CELEBA_ROOT")


@dataclass(frozen=True)
class Source:
    """Where the images come from: a folder of JPEGs or a zip read in place."""
    kind: str  # folder | zip
    path: Path
    names: tuple[str, ...]  # sorted image names (relative to path, or members of the zip)

    def describe(self) -> str:
        return f"{self.kind}:{self.path} ({len(self.names)} files)"


def _source_at(path: Path) -> Source | None:
    if path.is_file() and path.suffix == ".zip":
        try:
            with zipfile.ZipFile(path) as zf:
                names = sorted(n for n in zf.namelist() if n.lower().endswith(IMAGE_SUFFIXES))
        except zipfile.BadZipFile:
            raise UserError(f"{path} is not a readable zip file; download it again") from None
        return Source("zip", path, tuple(names)) if names else None
    if path.is_dir():
        for candidate in (path / "img_align_celeba", path / "celeba/img_align_celeba", path):
            if candidate.is_dir():
                names = sorted(p.name for p in candidate.iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES))
                if names:
                    return Source("folder", candidate, tuple(names))
        for zip_path in (path / "img_align_celeba.zip", path / "celeba/img_align_celeba.zip"):
            if zip_path.is_file():
                return _source_at(zip_path)
    return None


def _download_torchvision(cache_dir: Path) -> Path:
    """torchvision's CelebA downloader (needs internet and gdown); returns the folder it filled."""
    import torchvision

    root = cache_dir / "torchvision"
    try:
        torchvision.datasets.CelebA(str(root), split="all", target_type=[], download=True)
    except Exception as exc:  # network, quota or missing gdown: all end the same way for the user
        raise UserError(f"torchvision could not download CelebA ({type(exc).__name__}: {exc}); {GET_CELEBA}") from None
    return root / "celeba"


def find_source(cfg: DataConfig, roots: Sequence[Path] = ()) -> Source:
    """Resolve data.root to a Source; with no root, the first of the caller's `roots` that holds images.

    Where to look by default is the caller's to say (the command line's defaults), never this library's.
    """
    if cfg.root == "torchvision":
        looked = [_download_torchvision(Path(cfg.cache_dir).expanduser())]
    elif cfg.root:
        looked = [Path(cfg.root).expanduser()]
    else:
        looked = list(roots)
    for path in looked:
        source = _source_at(path)
        if source is not None:
            return source
    where = ", ".join(str(p) for p in looked) or "nowhere: data.root is empty and no default places were given"
    raise UserError(f"no CelebA images found (looked in {where}); {GET_CELEBA}")


def preprocess(img: Image.Image, resolution: int) -> np.ndarray:
    """Centre square crop (178x178 on aligned CelebA), bicubic resize, as a (3, R, R) uint8 array."""
    img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


_worker_zip: zipfile.ZipFile | None = None


def _decode(job: tuple[Source, str, int]) -> np.ndarray | None:
    """Decode one image; None for anything unreadable (counted, never fatal)."""
    global _worker_zip
    source, name, resolution = job
    try:
        if source.kind == "zip":
            if _worker_zip is None or _worker_zip.filename != str(source.path):
                _worker_zip = zipfile.ZipFile(source.path)
            with Image.open(io.BytesIO(_worker_zip.read(name))) as img:
                return preprocess(img, resolution)
        with Image.open(source.path / name) as img:
            return preprocess(img, resolution)
    except Exception:  # PIL raises many types for truncated/corrupt files
        return None


@dataclass
class ImageSet:
    """Decoded images and where they came from."""
    images: np.ndarray  # (N, 3, R, R) uint8, possibly a read-only memmap
    skipped: int  # source files that could not be decoded
    source: str  # Source.describe()
    key: str  # cache key: hashes source, selection, resolution and preprocessing


def cache_key(source: Source, max_images: int, resolution: int) -> str:
    names = source.names[:max_images] if max_images else source.names
    h = hashlib.sha1()
    for part in (source.kind, str(source.path.resolve()), str(resolution), PREPROCESS, str(len(names))):
        h.update(part.encode() + b"\0")
    h.update("\n".join(names).encode())
    return h.hexdigest()[:16]


def _read_cache(npy: Path, meta_path: Path, resolution: int) -> ImageSet | None:
    """A cache is trusted only if its metadata exists and the array's shape matches it; else rebuilt."""
    try:
        meta = json.loads(meta_path.read_text())
        arr = np.load(npy, mmap_mode="r")
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    if arr.ndim != 4 or arr.shape[1:] != (3, resolution, resolution) or arr.shape[0] < meta.get("count", -1):
        return None
    return ImageSet(arr[: meta["count"]], meta["skipped"], meta["source"], meta["key"])


def load_images(cfg: DataConfig, resolution: int, progress: bool = False, roots: Sequence[Path] = ()) -> ImageSet:
    """Decode (once) and return the training images at `resolution` (found as find_source finds them)."""
    source = find_source(cfg, roots)
    names = source.names[: cfg.max_images] if cfg.max_images else source.names
    key = cache_key(source, cfg.max_images, resolution)
    cache_dir = Path(cfg.cache_dir).expanduser()
    npy, meta_path = cache_dir / f"celeba-{resolution}px-{key}.npy", cache_dir / f"celeba-{resolution}px-{key}.json"
    cached = _read_cache(npy, meta_path, resolution)
    if cached is not None:
        return cached

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = npy.with_suffix(f".partial-{os.getpid()}.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(names), 3, resolution, resolution))
    count = 0
    ctx = mp.get_context("spawn" if torch.cuda.is_initialized() else "fork")
    jobs = ((source, name, resolution) for name in names)
    try:
        with ctx.Pool(max(1, os.cpu_count() or 1)) as pool:
            results = pool.imap(_decode, jobs, chunksize=64)
            if progress:
                from tqdm import tqdm
                results = tqdm(results, total=len(names), desc=f"decoding CelebA at {resolution}px", unit="img")
            for arr in results:
                if arr is not None:
                    out[count] = arr
                    count += 1
        out.flush()
        del out
        if count == 0:
            raise UserError(f"none of the {len(names)} images in {source.path} could be decoded; {GET_CELEBA}")
        os.replace(tmp, npy)  # atomic: a killed build never leaves a cache that looks complete
    finally:
        tmp.unlink(missing_ok=True)
    meta = {"count": count, "skipped": len(names) - count, "source": source.describe(), "key": key}
    meta_tmp = meta_path.with_suffix(f".partial-{os.getpid()}")
    meta_tmp.write_text(json.dumps(meta))
    os.replace(meta_tmp, meta_path)
    return _read_cache(npy, meta_path, resolution)


class DeviceImages:
    """The training images as one uint8 tensor on a device, built once and shared read-only by many runs.

    A study or a search copies its images to the device once and hands this object to every run's
    build_run; each run draws from it with its own BatchSource (its own RNG), so nothing here changes after
    construction. With channels_last the pixels are stored NHWC, so a gathered batch already has the
    memory format the models use and no batch is ever converted.
    """

    def __init__(self, images: ImageSet, device: torch.device, channels_last: bool = False, chunk: int = 4096):
        self.image_set, self.device, self.channels_last = images, torch.device(device), channels_last
        arr = images.images
        n, c, h, w = arr.shape
        shape = (n, h, w, c) if channels_last else (n, c, h, w)
        self.pixels = torch.empty(shape, dtype=torch.uint8, device=self.device)
        for i in range(0, n, chunk):  # a chunk at a time: never a second host copy of a memmap of ~10 GB
            part = torch.from_numpy(np.array(arr[i:i + chunk])).to(self.device)
            self.pixels[i:i + chunk] = part.permute(0, 2, 3, 1) if channels_last else part

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 images at `idx` as (B, 3, H, W); NHWC in memory (channels_last strides) when stored so."""
        x = self.pixels.index_select(0, idx)
        return x.permute(0, 3, 1, 2) if self.channels_last else x


class BatchSource:
    """Random batches drawn from device-resident uint8 images; its RNG state is part of a checkpoint.

    Give it shared DeviceImages (several runs, one copy on the device) or a uint8 array (a private copy).
    """

    def __init__(self, images: DeviceImages | np.ndarray, device: torch.device | None = None, seed: int = 0,
                 channels_last: bool = False):
        if not isinstance(images, DeviceImages):
            images = DeviceImages(ImageSet(images, 0, "array", ""), device or torch.device("cpu"), channels_last)
        self.images = images
        self.device = images.device
        # only when the shared copy has the other layout (a variant that sets train.channels_last) is a batch converted
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(seed)

    def __len__(self) -> int:
        return len(self.images)

    def next(self, batch_size: int) -> torch.Tensor:
        """A float batch in [-1, 1], sampled with replacement on the device (no host sync)."""
        idx = torch.randint(0, len(self), (batch_size,), device=self.device, generator=self.gen)
        x = self.images.gather(idx).float().div_(127.5).sub_(1.0)
        return x.contiguous(memory_format=self.memory_format)  # a no-op when the images are stored this way

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])  # a CPU ByteTensor, also for a CUDA generator
