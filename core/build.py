"""build_run: the single factory that turns a RunConfig into a ready Trainer (data, models, optimizers, FID)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from core import config as config_mod
from core.config import RunConfig
from core.data import BatchSource, DeviceImages, ImageSet, load_images
from core.device import pick_device
from core.hooks import Hooks
from core.metrics import (InceptionFeatures, MetricOptions, MetricResult, ReferenceStats, calc_metric, find_weights,
                          reference_path, reference_stats, weights_digest)
from core.models import Discriminator, Generator, init_weights
from core.regularizers import lazy_adam
from core.sampling import g_source
from core.spectral import apply_spectral_norm
from core.trainer import FID_SEED, Trainer


def make_optimizers(cfg: RunConfig, G: torch.nn.Module, D: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """Adam (weight decay as coupled L2) or AdamW (decoupled), at the derived, batch-scaled LRs.

    With lazy R1 (train.r1_gamma > 0), D's optimizer also takes the Dreg steps, so its lr and betas are scaled by
    r1_interval / (r1_interval + 1), as stylegan does (core/regularizers.py).
    """
    o, t, derived = cfg.optim, cfg.train, config_mod.derive(cfg)
    cls = torch.optim.AdamW if o.weight_decay_mode == "decoupled" else torch.optim.Adam
    fused = {"fused": True} if next(G.parameters()).is_cuda else {}
    lr_d, betas_d = derived.lr_d, (o.beta1, o.beta2)
    if t.r1_gamma > 0:
        lr_d, betas_d = lazy_adam(lr_d, betas_d, t.r1_interval)
    opt_g = cls(G.parameters(), lr=derived.lr_g, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, **fused)
    opt_d = cls(D.parameters(), lr=lr_d, betas=betas_d, weight_decay=o.weight_decay, **fused)
    return opt_g, opt_d


class FidEvaluator:
    """G -> FID result, against reference statistics fixed for the whole run."""

    def __init__(self, cfg: RunConfig, images: ImageSet, device: torch.device, progress: bool = False):
        e = cfg.eval
        self.extractor = InceptionFeatures(find_weights(e.weights), device, batch=e.fid_batch, resize=e.fid_resize)
        self.ref: ReferenceStats = reference_stats(images.images, images.key, e.fid_ref_images, self.extractor,
                                                   Path(cfg.data.cache_dir).expanduser(), progress=progress)
        self.cfg, self.device, self.progress = cfg, device, progress

    def __call__(self, G: torch.nn.Module, num_samples: int) -> MetricResult:
        opts = MetricOptions(G=G, z_dim=self.cfg.model.z_dim, num_samples=num_samples, ref=self.ref,
                             extractor=self.extractor, device=self.device, g_mode=self.cfg.eval.g_mode,
                             seed=FID_SEED, batch=self.cfg.eval.fid_batch, progress=self.progress,
                             g_source=g_source(self.cfg), standing_batches=self._standing_batches())
        return calc_metric("fid", opts)

    def _standing_batches(self) -> int:
        return self.cfg.eval.standing_batches if self.cfg.eval.g_mode == "standing" else 0


def reference_location(cfg: RunConfig, images: ImageSet) -> tuple[Path, str, int]:
    """Where cfg's FID reference statistics of these images are cached, their key, and how many images they cover."""
    e = cfg.eval
    return reference_path(Path(cfg.data.cache_dir).expanduser(), images.key, e.fid_ref_images, len(images.images),
                          resize=e.fid_resize, weights=weights_digest(find_weights(e.weights)))


def ensure_reference(cfg: RunConfig, images: ImageSet, progress: bool = False) -> None:
    """Compute and cache the reference statistics now, with their own bar, when they are not cached yet.

    A study or search calls this before its first run, so no run's time (or parallel worker) pays for them.
    """
    if cfg.eval.fid_final_samples > 0 and not reference_location(cfg, images)[0].is_file():
        FidEvaluator(cfg, images, pick_device(cfg.train.device), progress=progress)


def share_images(cfg: RunConfig, images: ImageSet) -> DeviceImages:
    """The images on cfg's device in its memory format: made once per process, handed to each run's build_run."""
    return DeviceImages(images, pick_device(cfg.train.device), config_mod.derive(cfg).channels_last)


def _same_device(a: torch.device, b: torch.device) -> bool:
    current = torch.cuda.current_device() if a.type == "cuda" else 0
    return a.type == b.type and (current if a.index is None else a.index) == (current if b.index is None else b.index)


def build_run(cfg: RunConfig, *, hooks: Hooks | None = None, tracker=None, run_dir: Path | None = None,
              with_fid: bool = True, images: ImageSet | DeviceImages | None = None, show_progress: bool = False,
              on_log: Callable[[int, dict[str, float]], None] | None = None) -> Trainer:
    """Data, G and D (seeded, DCGAN init), optimizers, batch source and FID, wired into a Trainer.

    `images` may be DeviceImages shared by several runs (see share_images): read, never copied again.
    show_progress: bars while images are decoded and Inception runs; on_log(nimg, stats): called at every log
    interval of training.
    """
    config_mod.validate(cfg)
    device = pick_device(cfg.train.device)
    channels_last = config_mod.derive(cfg).channels_last
    shared = images if isinstance(images, DeviceImages) else None
    image_set = shared.image_set if shared is not None else images or load_images(
        cfg.data, cfg.model.resolution, progress=show_progress)
    if shared is None or not _same_device(shared.device, device):
        shared = DeviceImages(image_set, device, channels_last)  # this run's own copy
    hooks = hooks or Hooks()
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # fastest conv algorithms; GPU runs are not bit-reproducible
    torch.manual_seed(cfg.train.seed)
    G, D = Generator(cfg.model), Discriminator(cfg.model)
    G.apply(init_weights)
    D.apply(init_weights)
    if cfg.model.d_spectral_norm:  # after init (SN divides the initialised weight), before the optimizers see D
        apply_spectral_norm(D, keep_batchnorm=cfg.model.d_sn_keep_bn)
    G, D = hooks.on_models_built(G, D)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    G, D = G.to(device, memory_format=memory_format), D.to(device, memory_format=memory_format)
    opt_g, opt_d = make_optimizers(cfg, G, D)
    batches = BatchSource(shared, seed=cfg.train.seed + 2, channels_last=channels_last)
    evaluate = (FidEvaluator(cfg, image_set, device, progress=show_progress)
                if with_fid and cfg.eval.fid_final_samples > 0 else None)
    return Trainer(cfg, G, D, opt_g, opt_d, batches, device, hooks=hooks, tracker=tracker, evaluate=evaluate,
                   run_dir=run_dir, progress=on_log)
