"""The plain PyTorch loop the suite's trainer is measured against, written the way a notebook would write it.

    python -m studies.bench --batches 128 --workers 14   # the "plain" column: measure_plain with 14 workers

torchvision transforms on PIL images in a DataLoader with worker processes, fp32, NCHW, eager, no cuDNN
autotuning. Same G and D (core.models), same init and seed, same losses, Adam settings and step order as
core.trainer: a D step on a real batch and a no-grad fake, then a G step on a fresh fake. `plain_losses`
feeds this step the trainer's own batches and latents, so the two loss trajectories can be compared.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from core import config as config_mod
from core.config import RunConfig
from core.data import BatchSource, find_source
from core.errors import UserError
from core.models import Discriminator, Generator, init_weights

CELEBA_CROP = 178  # aligned CelebA is 178x218: the centre square, as core.data crops it


class ImageFiles(Dataset):
    """JPEG files -> centre crop, bicubic resize, [-1, 1] tensors, decoded on every access."""

    def __init__(self, files: list[Path], resolution: int):
        from torchvision import transforms as T

        self.files = files
        self.transform = T.Compose([
            T.CenterCrop(CELEBA_CROP), T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("RGB"))


def image_files(cfg: RunConfig, roots: Sequence[Path] = ()) -> list[Path]:
    """The files the suite loads for this config (same source and selection), as paths."""
    source = find_source(cfg.data, roots)
    if source.kind != "folder":
        raise UserError(f"the plain loop reads a folder of JPEGs, not {source.describe()}; unzip it and pass --data")
    names = source.names[: cfg.data.max_images] if cfg.data.max_images else source.names
    return [source.path / name for name in names]


class PlainGAN:
    """G, D and their optimizers, stepped in fp32 NCHW eager mode exactly as core.trainer steps them."""

    def __init__(self, cfg: RunConfig, device: torch.device):
        t, o = cfg.train, cfg.optim
        if t.n_dis != 1 or t.d_interval != 1:
            raise UserError("the plain loop does one D and one G step per step; use train.n_dis=1, d_interval=1")
        torch.manual_seed(t.seed)  # the same draws, in the same order, as core.build.build_run
        self.G, self.D = Generator(cfg.model), Discriminator(cfg.model)
        self.G.apply(init_weights)
        self.D.apply(init_weights)
        self.G.to(device)
        self.D.to(device)
        derived = config_mod.derive(cfg)
        cls = torch.optim.AdamW if o.weight_decay_mode == "decoupled" else torch.optim.Adam
        self.opt_g = cls(self.G.parameters(), lr=derived.lr_g, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        self.opt_d = cls(self.D.parameters(), lr=derived.lr_d, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        self.real_label, self.fake_label = t.real_label, t.fake_label

    def step(self, real: torch.Tensor, z_d: torch.Tensor, z_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # D: real batch against a fake made without grad
        with torch.no_grad():
            fake = self.G(z_d)
        logits_real, logits_fake = self.D(real), self.D(fake)
        loss_d = (F.binary_cross_entropy_with_logits(logits_real, torch.full_like(logits_real, self.real_label))
                  + F.binary_cross_entropy_with_logits(logits_fake, torch.full_like(logits_fake, self.fake_label)))
        self.opt_d.zero_grad()
        loss_d.backward()
        self.opt_d.step()
        # G: non-saturating loss on a fresh fake
        logits = self.D(self.G(z_g))
        loss_g = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        self.opt_g.zero_grad()
        loss_g.backward()
        self.opt_g.step()
        return loss_d.detach(), loss_g.detach()


def plain_losses(cfg: RunConfig, images: np.ndarray, device: torch.device, steps: int) -> list[tuple[float, float]]:
    """(loss_d, loss_g) of the first `steps` plain steps, fed the batches and z the trainer draws from this seed."""
    gan = PlainGAN(cfg, device)
    batches = BatchSource(images, device, seed=cfg.train.seed + 2)  # core.build's seeds, NCHW
    zgen = torch.Generator(device=device).manual_seed(cfg.train.seed + 1)
    n, z_dim = cfg.train.batch_size, cfg.model.z_dim
    out = []
    for _ in range(steps):
        real = batches.next(n)
        z_d = torch.randn(n, z_dim, device=device, generator=zgen)
        z_g = torch.randn(n, z_dim, device=device, generator=zgen)
        out.append(torch.stack(gan.step(real, z_d, z_g)))
    return [tuple(row) for row in torch.stack(out).tolist()]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_plain(cfg: RunConfig, files: list[Path], device: torch.device, *, steps: int, warmup: int,
                  workers: int) -> dict:
    """Images per second of the plain loop after `warmup` steps, and its peak device memory."""
    batch = cfg.train.batch_size
    if len(files) < batch:
        raise UserError(f"{len(files)} images are fewer than one batch of {batch}")
    cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False  # a notebook leaves cuDNN's default; build_run turns autotuning on
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        gan = PlainGAN(cfg, device)
        loader = DataLoader(ImageFiles(files, cfg.model.resolution), batch_size=batch, shuffle=True,
                            num_workers=workers, drop_last=True, pin_memory=device.type == "cuda",
                            persistent_workers=workers > 0)

        def batches():
            while True:
                yield from loader

        it = batches()
        for i in range(warmup + steps):
            if i == warmup:
                _sync(device)
                start = time.perf_counter()
            real = next(it).to(device)
            gan.step(real, torch.randn(batch, cfg.model.z_dim, device=device),
                     torch.randn(batch, cfg.model.z_dim, device=device))
        _sync(device)
        seconds = time.perf_counter() - start
        del it, loader
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"img_per_s": steps * batch / seconds, "seconds": seconds, "peak_mem_gib": peak, "workers": workers}
