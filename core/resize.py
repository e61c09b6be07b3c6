"""PIL's bicubic resize (the one clean-fid uses for FID) as two matrix products, so it can run on the GPU.

Pillow resamples separably (Resample.c, `precompute_coeffs`): each output pixel takes the bicubic kernel
(a = -0.5, support 2 input pixels, widened by the scale factor only when shrinking) at the input pixel
centres it covers, drops the taps that fall outside the image and renormalises the rest to sum to 1.
Those weights form one (out, in) matrix per axis, so resize(img) = Wh @ img @ Ww^T. Computed in float64
this reproduces clean-fid's per-image PIL float resize to ~1e-4 of a grey level, on any device, and the
float64 matmul is immune to TF32 settings. (torch's `interpolate(mode="bicubic", antialias=True)` uses the
same kernel and agrees to ~2e-3; without antialias it uses a = -0.75 and clamped borders, ~20 levels off.)
"""

from __future__ import annotations

import numpy as np
import torch

PIL_BICUBIC_A = -0.5  # Pillow's bicubic_filter; torch's non-antialiased bicubic uses -0.75
SUPPORT = 2.0  # the cubic kernel is non-zero on (-2, 2) input pixels


def _cubic(x: np.ndarray) -> np.ndarray:
    a, x = PIL_BICUBIC_A, np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def pil_bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """The (out_size, in_size) float64 matrix Pillow applies along one axis."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)  # the kernel stretches only when downscaling (that is the antialiasing)
    support = SUPPORT * filterscale
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)  # int() truncates like Pillow's C cast
        hi = min(int(center + support + 0.5), in_size)
        k = _cubic((np.arange(lo, hi) - center + 0.5) / filterscale)
        total = k.sum()
        weights[i, lo:hi] = k / total if total != 0 else k
    return weights


class BicubicResize:
    """(B, C, H, W) uint8 or float in [0, 255] -> float32 (B, C, size, size), clipped to [0, 255] like clean-fid."""

    def __init__(self, size: int = 299):
        self.size = size
        self._cache: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def _weights(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (h, w, str(device))
        if key not in self._cache:
            self._cache[key] = (torch.from_numpy(pil_bicubic_weights(h, self.size)).to(device),
                                torch.from_numpy(pil_bicubic_weights(w, self.size)).T.contiguous().to(device))
        return self._cache[key]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        wh, ww_t = self._weights(images.shape[-2], images.shape[-1], images.device)
        out = wh @ images.double() @ ww_t
        return out.clamp_(0, 255).float()
