"""The run factory: `build_run` turns a RunConfig and the shared device images into a ready Trainer.

It builds G and D (seeded, DCGAN init), their optimizers, the batch source and the evaluator, on the run's path
(precision, memory format, compiled or not: core/fastpath.py measures which is fastest here, once per model).
Images are decoded and copied to the device before it, once per process (`share_images`); reference
statistics are core/reference.py's, metrics core/metrics.py's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from core import config as config_mod
from core.config import Derived, RunConfig
from core.data import BatchSource, DeviceImages, ImageSet
from core.device import ExecPath, pick_device
from core.fastpath import PathChoice, choose_path, recorded_path
from core.hooks import Hooks
from core.metrics import FidEvaluator
from core.models import Discriminator, Generator, init_weights
from core.regularizers import lazy_adam
from core.spectral import apply_spectral_norm
from core.trainer import Trainer


def make_optimizers(cfg: RunConfig, derived: Derived, G: torch.nn.Module,
                    D: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """Adam (weight decay as coupled L2) or AdamW (decoupled), at the derived, batch-scaled LRs.

    With lazy R1 (train.r1_gamma > 0), D's optimizer also takes the Dreg steps, so its lr and betas are scaled by
    r1_interval / (r1_interval + 1), as stylegan does (core/regularizers.py).
    """
    o, t = cfg.optim, cfg.train
    cls = torch.optim.AdamW if o.weight_decay_mode == "decoupled" else torch.optim.Adam
    fused = {"fused": True} if next(G.parameters()).is_cuda else {}
    lr_d, betas_d = derived.lr_d, (o.beta1, o.beta2)
    if t.r1_gamma > 0:
        lr_d, betas_d = lazy_adam(lr_d, betas_d, t.r1_interval)
    opt_g = cls(G.parameters(), lr=derived.lr_g, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, **fused)
    opt_d = cls(D.parameters(), lr=lr_d, betas=betas_d, weight_decay=o.weight_decay, **fused)
    return opt_g, opt_d


CALIBRATION_IMAGES = 256  # real images the path measurement draws its batches from (its own small device copy)


def share_images(cfg: RunConfig, images: ImageSet) -> DeviceImages:
    """The images on cfg's device in the memory format of cfg's path, as far as it is known without measuring
    (explicit, or cached from an earlier measurement): made once per process, handed to each run's build_run.
    A run on the other layout converts each batch it draws (one copy of a batch, small beside a step)."""
    device = pick_device(cfg.train.device)
    return DeviceImages(images, device, choose_path(cfg, device, None).path.channels_last)


def _same_device(a: torch.device, b: torch.device) -> bool:
    current = torch.cuda.current_device() if a.type == "cuda" else 0
    return a.type == b.type and (current if a.index is None else a.index) == (current if b.index is None else b.index)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_path(cfg: RunConfig, images: ImageSet, device: torch.device | None = None, run_dir: Path | None = None,
             say: Callable[[str], None] | None = _say) -> PathChoice:
    """The path a run of cfg takes: its checkpoint's when it resumes one (bit-identical continuation), else
    core.fastpath.choose_path's (explicit settings, the measurement cache, or a measurement now, announced
    through `say`)."""
    device = device or pick_device(cfg.train.device)
    recorded = recorded_path(run_dir)
    if recorded is not None:
        return PathChoice(recorded, "resumed")
    choice = choose_path(cfg, device, path_builder(cfg, images, device), progress=say)
    if choice.source == "measured" and say:
        say(choice.line())
    return choice


def path_builder(cfg: RunConfig, images: ImageSet, device: torch.device) -> Callable[[ExecPath], Trainer]:
    """build(path): a trainer of cfg on that path, without FID, drawing from its own small copy of the first
    CALIBRATION_IMAGES images in the path's layout: what core.fastpath times."""
    small = ImageSet(np.asarray(images.images[:CALIBRATION_IMAGES]), 0, images.source, images.key)

    def build(path: ExecPath) -> Trainer:
        return _assemble(cfg, device, DeviceImages(small, device, path.channels_last), PathChoice(path, "measuring"))
    return build


def build_run(cfg: RunConfig, *, images: DeviceImages, hooks: Hooks | None = None, tracker=None,
              run_dir: Path | None = None, with_fid: bool = True, show_progress: bool = False,
              on_log: Callable[[int, dict[str, float]], None] | None = None,
              path: PathChoice | None = None) -> Trainer:
    """G and D (seeded, DCGAN init), optimizers, batch source and evaluator, wired into a Trainer on its path.

    `images` are shared by every run of the process (share_images) and only read; on another device than
    cfg's they are copied for this run. show_progress: bars while Inception runs (the reference statistics,
    each evaluation); on_log(nimg, stats): called at every log interval of training. path: run_path's choice
    (decided here when not given).
    """
    config_mod.validate(cfg)
    device = pick_device(cfg.train.device)
    path = path or run_path(cfg, images.image_set, device, run_dir)
    if not _same_device(images.device, device):
        images = DeviceImages(images.image_set, device, path.path.channels_last)  # this run's own copy
    return _assemble(cfg, device, images, path, hooks=hooks, tracker=tracker, run_dir=run_dir, with_fid=with_fid,
                     show_progress=show_progress, on_log=on_log)


def _assemble(cfg: RunConfig, device: torch.device, images: DeviceImages, path: PathChoice, *,
              hooks: Hooks | None = None, tracker=None, run_dir: Path | None = None, with_fid: bool = False,
              show_progress: bool = False, on_log: Callable[[int, dict[str, float]], None] | None = None) -> Trainer:
    derived = config_mod.derive(cfg)
    hooks = hooks or Hooks()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fastest conv algorithms; GPU runs are not bit-reproducible
    torch.manual_seed(cfg.train.seed)
    G, D = Generator(cfg.model), Discriminator(cfg.model)
    G.apply(init_weights)
    D.apply(init_weights)
    if cfg.model.d_spectral_norm:  # after init (SN divides the initialised weight), before the optimizers see D
        apply_spectral_norm(D, keep_batchnorm=cfg.model.d_sn_keep_bn)
    G, D = hooks.on_models_built(G, D)
    memory_format = torch.channels_last if path.path.channels_last else torch.contiguous_format
    G, D = G.to(device, memory_format=memory_format), D.to(device, memory_format=memory_format)
    opt_g, opt_d = make_optimizers(cfg, derived, G, D)
    batches = BatchSource(images, seed=cfg.train.seed + 2, channels_last=path.path.channels_last)
    evaluate = (FidEvaluator(cfg, images.image_set, device, progress=show_progress)
                if with_fid and cfg.eval.fid_final_samples > 0 else None)
    return Trainer(cfg, G, D, opt_g, opt_d, batches, device, hooks=hooks, tracker=tracker, evaluate=evaluate,
                   run_dir=run_dir, progress=on_log, path=path)
