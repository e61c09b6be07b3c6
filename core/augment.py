"""Augmentations applied to D's inputs: x-flip of real images, and DiffAugment on real and generated images.

D overfits a small data set and its feedback to G degrades; augmenting what D sees delays that. Plain
augmentation of real images only leaks into G's samples (G learns to make augmented-looking images), unless the
transform keeps the image distribution, as a left-right flip of faces does. DiffAugment (Zhao et al. 2020,
"Differentiable Augmentation for Data-Efficient GAN Training", official `DiffAugment_pytorch.py`) instead
applies the same differentiable transforms to real and generated images before D, in both D and G steps, so
gradients reach G through them. Policy 'color,translation,cutout', as in the official code:
- colour: brightness + U(-0.5, 0.5); saturation x U(0, 2) about the per-pixel channel mean; contrast
  x U(0.5, 1.5) about the image mean (applied in that order, each per image);
- translation by up to 1/8 of the side in each axis, in whole pixels, zero-padded;
- cutout: a zeroed square of half the side, centred anywhere in the image (clipped at the borders).

Unlike the official code, every random number is drawn from an explicit torch.Generator on x's device, so
runs are reproducible and a resumed run continues the same stream (save `generator.get_state()`), and the
translation and cutout are one gather and one mask multiplication for the whole batch (no Python loop over
images, no host sync). The arithmetic runs in float32 and the result returns in x's dtype and memory format
(bf16 from autocast, channels_last).
"""

from __future__ import annotations

import torch

TRANSLATION_RATIO = 0.125  # largest shift, as a fraction of the side
CUTOUT_RATIO = 0.5  # side of the cutout square, as a fraction of the image side


def xflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image left-right with probability 0.5, drawn per image from `generator`."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x).contiguous(memory_format=_memory_format(x))


def diff_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """DiffAugment 'color,translation,cutout' on an NCHW batch: differentiable, seeded by `generator`."""
    n, _, h, w = x.shape
    dev = x.device
    # Every draw up front, in a fixed order, so the stream is the same whatever the batch's dtype.
    u = torch.rand(3, n, 1, 1, 1, device=dev, generator=generator)
    brightness, saturation, contrast = u[0] - 0.5, u[1] * 2.0, u[2] + 0.5
    shift_h, shift_w = int(h * TRANSLATION_RATIO + 0.5), int(w * TRANSLATION_RATIO + 0.5)
    ty = torch.randint(-shift_h, shift_h + 1, (n, 1), device=dev, generator=generator)
    tx = torch.randint(-shift_w, shift_w + 1, (n, 1), device=dev, generator=generator)
    cut_h, cut_w = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
    cy = torch.randint(0, h + (1 - cut_h % 2), (n, 1), device=dev, generator=generator)
    cx = torch.randint(0, w + (1 - cut_w % 2), (n, 1), device=dev, generator=generator)

    # Colour.
    y = x.float() + brightness
    mean_c = y.mean(dim=1, keepdim=True)
    y = (y - mean_c) * saturation + mean_c
    mean_img = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean_img) * contrast + mean_img

    # Translation: output pixel (i, j) reads input (i + ty, j + tx), or zero outside the image (the official
    # code's pad-by-one and clamp); one advanced-indexing gather for the whole batch, giving (N, H, W, C).
    rows = torch.arange(h, device=dev) + ty  # (N, H)
    cols = torch.arange(w, device=dev) + tx  # (N, W)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    batch = torch.arange(n, device=dev)[:, None, None]
    y = y[batch, :, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]].permute(0, 3, 1, 2)

    # Cutout: rows [cy - cut_h//2, cy - cut_h//2 + cut_h) x the same for columns, clipped at the borders.
    top, left = cy - cut_h // 2, cx - cut_w // 2
    ii, jj = torch.arange(h, device=dev), torch.arange(w, device=dev)
    in_rows = (ii >= top) & (ii < top + cut_h)  # (N, H)
    in_cols = (jj >= left) & (jj < left + cut_w)  # (N, W)
    keep = inside & ~(in_rows[:, :, None] & in_cols[:, None, :])
    y = y * keep[:, None].to(y.dtype)
    return y.to(x.dtype).contiguous(memory_format=_memory_format(x))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is laid out that way (and not also plainly contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
