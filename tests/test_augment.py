"""x-flip and DiffAugment: seeded, differentiable, shape/dtype/layout kept, and each transform really happens."""

import pytest
import torch

from core.augment import diff_augment, xflip


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 4, c: int = 3, h: int = 16, w: int = 16) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=gen(99)) * 2 - 1


def test_xflip_flips_about_half_and_each_image_is_whole():
    x = images(1000, 1, 4, 4)
    y = xflip(x, gen())
    same = (y == x).flatten(1).all(1)
    flipped = (y == x.flip(3)).flatten(1).all(1)
    assert bool((same | flipped).all())  # each image is itself or its exact mirror
    assert 400 <= int((flipped & ~same).sum()) <= 600
    assert torch.equal(xflip(x, gen(5)), xflip(x, gen(5)))
    assert not torch.equal(xflip(x, gen(5)), xflip(x, gen(6)))


def test_diff_augment_keeps_shape_dtype_and_is_seeded():
    x = images()
    y = diff_augment(x, gen(1))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y, diff_augment(x, gen(1)))
    assert not torch.equal(y, diff_augment(x, gen(2)))
    g = gen(3)  # a resumed run: saving and restoring the generator state replays the same draws
    diff_augment(x, g)
    state = g.get_state()
    first = diff_augment(x, g)
    g.set_state(state)
    assert torch.equal(first, diff_augment(x, g))


def test_diff_augment_is_differentiable():
    x = images().requires_grad_(True)
    (diff_augment(x, gen()) * torch.randn(4, 3, 16, 16, generator=gen(7))).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_channels_last_and_bf16_autocast():
    x = images()
    y = diff_augment(x, gen(4))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y_cl = diff_augment(x_cl, gen(4))
    assert torch.allclose(y_cl, y, atol=1e-6) and y_cl.is_contiguous(memory_format=torch.channels_last)
    assert xflip(x_cl, gen()).is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_bf = diff_augment(x.bfloat16(), gen(4))
    assert y_bf.dtype == torch.bfloat16
    assert torch.allclose(y_bf.float(), y, atol=0.05)


def cutout_and_translation_only(monkeypatch):
    """Neutral colour draws (brightness 0, saturation 1, contrast 1) so geometry can be read off exactly."""
    import core.augment as augment
    real_rand = torch.rand

    def rand(*shape, **kw):
        if shape and shape[0] == 3:  # the colour draw
            kw.pop("generator")
            return torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1, 1, 1).expand(*shape).clone()
        return real_rand(*shape, **kw)
    monkeypatch.setattr(augment.torch, "rand", rand)


def test_cutout_zeroes_a_square_of_half_the_side(monkeypatch):
    cutout_and_translation_only(monkeypatch)
    x = torch.ones(64, 1, 16, 16)
    y = diff_augment(x, gen())
    zero = (y == 0)[:, 0]
    # zeros from translation sit on full border rows/columns; the cutout square is what is left
    for img in zero:
        rows, cols = img.all(1), img.all(0)
        inner = img[~rows][:, ~cols]
        assert inner.any(), "no cutout inside the kept image"
        r_idx, c_idx = inner.any(1).nonzero().flatten(), inner.any(0).nonzero().flatten()
        assert int(r_idx.max() - r_idx.min()) + 1 <= 8 and int(c_idx.max() - c_idx.min()) + 1 <= 8
    full = [img for img in zero if int(img.sum()) == 64]  # the square fully inside and no shift
    assert full, "a 16x16 image never got an 8x8 cutout"


def test_translation_shifts_content_with_zero_padding(monkeypatch):
    cutout_and_translation_only(monkeypatch)
    import core.augment as augment
    monkeypatch.setattr(augment, "CUTOUT_RATIO", 0.0)
    h = w = 16
    ramp = (torch.arange(h)[:, None] * w + torch.arange(w)[None, :]).float() + 1  # every pixel distinct, > 0
    x = ramp.expand(200, 1, h, w).clone()
    y = diff_augment(x, gen())
    shifts = set()
    for img in y[:, 0]:
        nz = img.nonzero()
        top, left = int(nz[:, 0].min()), int(nz[:, 1].min())
        src = img[top, left]
        dy, dx = divmod(int(src) - 1, w)  # where that pixel came from
        ty, tx = dy - top, dx - left
        shifts.add((ty, tx))
        assert abs(ty) <= 2 and abs(tx) <= 2  # 16 / 8
        expect = torch.zeros(h, w)  # out[i, j] = in[i + ty, j + tx], zero outside
        expect[max(0, -ty):h - max(0, ty), max(0, -tx):w - max(0, tx)] = \
            ramp[max(0, ty):h - max(0, -ty), max(0, tx):w - max(0, -tx)]
        assert torch.equal(img, expect)
    assert len(shifts) > 15  # most of the 25 shifts in [-2, 2]^2 seen


def test_colour_changes_values():
    x = images()
    y = diff_augment(x, gen())
    # brightness shifts image means; with translation/cutout zeroing parts, compare where both are nonzero
    assert not torch.allclose(y[y != 0], x.expand_as(y)[y != 0])
