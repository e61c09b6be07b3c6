"""Spectral normalisation of D: every conv and linear weight divided by its largest singular value.

Miyato et al. 2018 ("Spectral Normalization for Generative Adversarial Networks") bound D's Lipschitz constant
layer by layer, which keeps D's gradients to G informative; in compare_gan (Kurach et al. 2019) SN took an
SNDCGAN on CelebA-HQ 128 from FID 61.15 to 28.21. We use torch's parametrization
(`torch.nn.utils.parametrizations.spectral_norm`): one power iteration per forward in train mode, the
singular vectors kept as buffers (so they are in the state dict and a resumed run continues exactly), and the
weight normalised as `weight.flatten(1)`. SNGAN's D has no BatchNorm; `keep_batchnorm=False` replaces D's
BatchNorm2d layers with Identity (same positions, so layer order and indices are unchanged).

Apply after weight initialisation (the parametrized `weight` is computed, not stored) and before the
optimizer is built (the parameters become `parametrizations.weight.original`).

Under bf16 autocast (read from torch 2.14's `_SpectralNorm` and ATen's autocast op lists; the trainer computes
`weight` inside D's forward, so inside autocast): on CUDA `torch.mv` is on the lower-precision list, so each power
iteration's products are rounded to bf16, but `F.normalize(..., out=self._u)` writes them into the float32 `_u`/`_v`
buffers, `vdot` is on the promote list (the fix for pytorch#125544, where it used to fail on mixed dtypes), and
`weight / sigma` stays float32; sigma carries bf16 rounding (~2^-9 relative), far below what one power iteration per
step leaves anyway. On the CPU, `mv` is not autocast at all (float32). The trainer's CPU tests run SN under bf16
autocast; a CUDA run has not been checked on a device here.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm


def apply_spectral_norm(D: nn.Module, keep_batchnorm: bool) -> nn.Module:
    """SN on every Conv2d / Linear of D (in place), BatchNorm2d replaced by Identity unless kept; returns D."""
    for parent in list(D.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Conv2d, nn.Linear)) and not parametrize.is_parametrized(child, "weight"):
                spectral_norm(child)
            elif isinstance(child, nn.BatchNorm2d) and not keep_batchnorm:
                setattr(parent, name, nn.Identity())
    return D
