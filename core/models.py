"""The CSPup generator and the DCGAN-style discriminator, one class each, sized by resolution and width."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from core.config import ModelConfig

G_OUT_CHANNELS = 32  # channels of the last CSPup block; doubles per block towards 4x4, capped at 1024
D_IN_CHANNELS = 64  # channels of D's first layer; doubles per layer, capped at 1024
MAX_CHANNELS = 1024


def _act(kind: str, slope: float) -> nn.Module:
    return nn.LeakyReLU(slope, inplace=True) if kind == "leaky" else nn.ReLU(inplace=True)


def conv_norm_act(conv: nn.Module, channels: int, norm: str, act: str, slope: float) -> list[nn.Module]:
    """conv -> BN -> act, conv -> act -> BN, or conv -> act: the placement the leaky_bn ablation varies."""
    if norm == "after_conv":
        return [conv, nn.BatchNorm2d(channels), _act(act, slope)]
    if norm == "after_act":
        return [conv, _act(act, slope), nn.BatchNorm2d(channels)]
    return [conv, _act(act, slope)]


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class Halves(nn.Module):
    """Two layers over one input whose outputs are the channel halves of one wider layer (same parameters).

    The next CSPup splits its input in two; handed the halves as two tensors, it reads each one contiguous,
    where channel slices of one tensor are strided views that every conv would copy on every step.
    """

    def __init__(self, make: Callable[[int], nn.Module], channels: int):
        super().__init__()
        self.out_channels = channels
        self.lo, self.hi = make(channels // 2), make(channels - channels // 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lo(x), self.hi(x)


def _wide(make: Callable[[int], nn.Module], channels: int, halves: bool) -> nn.Module:
    """The layer `make(channels)`, or the same layer as two Halves when the next block reads halves."""
    return Halves(make, channels) if halves else make(channels)


def _bn_after(layer: nn.Module, channels: int) -> nn.Module:
    return nn.Sequential(layer, nn.BatchNorm2d(channels))


class CSPup(nn.Module):
    """Cross-stage-partial upsampling: half the channels take a cheap ConvT shortcut, half a deeper path.

    block="open" (the default): A: ConvT(4,2,1) to out channels. B: 1x1 conv -> act -> ConvT(4,2,1) -> 3x3 conv
    -> act -> 3x3 conv (with BatchNorm where `norm` puts it). Output A + B. Path A is then a chain of linear
    layers from the 4x4 map to the image, and nothing normalises the sum.
    block="closed", the researchers' BatchNorm-closed reading: A: ConvT + BN. B: 3x3 conv -> BN -> act -> ConvT
    -> BN -> 3x3 conv -> BN -> act -> 3x3 conv -> BN. Output A + B.
    block="sum_bn": the open block with BatchNorm + act after A + B, the usual fix for a linear shortcut.
    Splitting halves the cost of the deep path while the shortcut keeps gradients short. With `halves_out` the
    output is (first half, second half) of the block's output as two tensors, ready for the next block (see
    Halves); the input may be one tensor or such a pair.
    """

    def __init__(self, in_ch: int, out_ch: int, norm: str = "after_conv", act: str = "relu", slope: float = 0.2,
                 halves_out: bool = False, block: str = "open"):
        super().__init__()
        half_a = in_ch // 2
        half_b = in_ch - half_a
        self.split = half_a
        self.out_channels = out_ch
        closed = block == "closed"
        closing = (lambda layer, c: _bn_after(layer, c)) if closed else (lambda layer, c: layer)  # BN on closed
        self.path_a = _wide(lambda c: closing(nn.ConvTranspose2d(half_a, c, 4, 2, 1), c), out_ch, halves_out)
        self.path_b = nn.Sequential(
            *conv_norm_act(nn.Conv2d(half_b, out_ch, 3, 1, 1) if closed else nn.Conv2d(half_b, out_ch, 1),
                           out_ch, norm, act, slope),
            *([nn.ConvTranspose2d(out_ch, out_ch, 4, 2, 1)] + ([nn.BatchNorm2d(out_ch)] if closed else [])),
            *conv_norm_act(nn.Conv2d(out_ch, out_ch, 3, 1, 1), out_ch, norm, act, slope),
            _wide(lambda c: closing(nn.Conv2d(out_ch, c, 3, 1, 1), c), out_ch, halves_out),
        )
        post = (lambda c: nn.Sequential(nn.BatchNorm2d(c), _act(act, slope)))
        sizes = (out_ch // 2, out_ch - out_ch // 2) if halves_out else (out_ch,)
        self.post = nn.ModuleList(post(c) for c in sizes) if block == "sum_bn" else None  # per half: same function

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        a, b = x if isinstance(x, tuple) else (x[:, : self.split], x[:, self.split :])
        out_a, out_b = self.path_a(a), self.path_b(b)
        if isinstance(out_a, tuple):
            out = (out_a[0] + out_b[0], out_a[1] + out_b[1])
            return out if self.post is None else tuple(p(h) for p, h in zip(self.post, out))
        out = out_a + out_b
        return out if self.post is None else self.post[0](out)


class Generator(nn.Module):
    """z -> 4x4 map -> CSPup blocks (each doubling resolution) -> 3x3 conv -> tanh, in [-1, 1].

    The 4x4 map is made as the two channel halves the first block reads (a Linear, BatchNorm and activation
    over each half: the same parameters and function as over the whole), and every block but the last hands
    its successor halves too.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n_blocks = int(math.log2(cfg.resolution // 4))
        chans = [_scaled(min(MAX_CHANNELS, G_OUT_CHANNELS * 2**i), cfg.width) for i in range(n_blocks, -1, -1)]
        self.z_dim = cfg.z_dim
        self.stem = Halves(lambda c: nn.Linear(cfg.z_dim, c * 16), chans[0])
        self.stem_post = nn.ModuleList(nn.Sequential(*conv_norm_act(nn.Identity(), c, cfg.g_norm, cfg.g_act,
                                                                    cfg.leaky_slope))
                                       for c in (self.stem.lo.out_features // 16, self.stem.hi.out_features // 16))
        self.blocks = nn.Sequential(*[
            CSPup(cin, cout, cfg.g_norm, cfg.g_act, cfg.leaky_slope, halves_out=i < n_blocks - 1,  # last: to_rgb
                  block=cfg.g_block)
            for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:]))])
        self.to_rgb = nn.Conv2d(chans[-1], 3, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = tuple(post(h.view(z.shape[0], -1, 4, 4)) for post, h in zip(self.stem_post, self.stem(z)))
        x = self.blocks(x)
        return torch.tanh(self.to_rgb(x))


class Discriminator(nn.Module):
    """DCGAN-style mirror: halve resolution per layer (64 -> 1024 channels at 128x128), then one logit.

    Downsampling is a 4x4 stride-2 conv, or a 3x3 stride-1 conv followed by 2x2 MaxPool or AvgPool.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n_layers = int(math.log2(cfg.resolution // 4))
        chans = [3] + [_scaled(min(MAX_CHANNELS, D_IN_CHANNELS * 2**i), cfg.width) for i in range(n_layers)]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
            norm = "none" if i == 0 else cfg.d_norm  # DCGAN: no BatchNorm on D's input layer
            if cfg.d_downsample == "stride":
                layers += conv_norm_act(nn.Conv2d(cin, cout, 4, 2, 1), cout, norm, cfg.d_act, cfg.leaky_slope)
            else:
                pool = nn.MaxPool2d(2) if cfg.d_downsample == "maxpool" else nn.AvgPool2d(2)
                layers += conv_norm_act(nn.Conv2d(cin, cout, 3, 1, 1), cout, norm, cfg.d_act, cfg.leaky_slope)
                layers.append(pool)
        self.features = nn.Sequential(*layers)
        self.to_logit = nn.Conv2d(chans[-1], 1, 4, 1, 0)  # 4x4 map -> one logit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_logit(self.features(x)).flatten()


def init_weights(module: nn.Module) -> None:
    """DCGAN init: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
