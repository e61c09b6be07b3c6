import pytest
import torch
from torch import nn

from core.config import ModelConfig
from core.models import CSPup, Discriminator, Generator, count_params, init_weights


def test_cspup_doubles_resolution_and_sums_two_paths():
    block = CSPup(16, 8)
    x = torch.randn(2, 16, 4, 4)
    assert block(x).shape == (2, 8, 8, 8)
    # output = A(first half) + B(second half): zeroing half B's input changes only path B's contribution
    with torch.no_grad():
        a_only = block.path_a(x[:, :8])
        b_only = block.path_b(x[:, 8:])
    torch.testing.assert_close(block(x), a_only + b_only)
    assert isinstance(block.path_a, nn.ConvTranspose2d) and block.path_a.in_channels == 8
    kinds = [type(m).__name__ for m in block.path_b if not isinstance(m, (nn.BatchNorm2d,))]
    assert kinds == ["Conv2d", "ReLU", "ConvTranspose2d", "Conv2d", "ReLU", "Conv2d"]


@pytest.mark.parametrize("resolution,width", [(128, 1.0), (64, 0.25), (32, 0.125), (16, 0.125)])
def test_generator_and_discriminator_shapes(resolution, width):
    cfg = ModelConfig(resolution=resolution, width=width)
    G, D = Generator(cfg), Discriminator(cfg)
    fake = G(torch.randn(2, cfg.z_dim))
    assert fake.shape == (2, 3, resolution, resolution)
    assert fake.abs().max() <= 1  # tanh output
    assert D(fake).shape == (2,)


def test_default_sizes_match_the_design():
    G, D = Generator(ModelConfig()), Discriminator(ModelConfig())
    assert 19e6 < count_params(G) < 21e6  # "G about 20M parameters"
    assert 10e6 < count_params(D) < 12e6  # "D about 11M"
    convs = [m for m in D.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1024]
    assert [b.path_a.out_channels for b in G.blocks] == [512, 256, 128, 64, 32]


@pytest.mark.parametrize("downsample", ["stride", "maxpool", "avgpool"])
def test_gradients_reach_every_parameter(downsample):
    cfg = ModelConfig(resolution=32, width=0.125, d_downsample=downsample)
    G, D = Generator(cfg), Discriminator(cfg)
    G.apply(init_weights)
    D.apply(init_weights)
    D(G(torch.randn(4, cfg.z_dim))).mean().backward()
    for name, p in list(G.named_parameters()) + list(D.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_discriminator_downsampling_layers():
    layers = {d: [type(m) for m in Discriminator(ModelConfig(resolution=32, d_downsample=d)).features]
              for d in ("stride", "maxpool", "avgpool")}
    assert nn.MaxPool2d not in layers["stride"] and nn.AvgPool2d not in layers["stride"]
    assert layers["maxpool"].count(nn.MaxPool2d) == 3 and nn.AvgPool2d not in layers["maxpool"]
    assert layers["avgpool"].count(nn.AvgPool2d) == 3
    # each pool follows a stride-1 conv's activation
    convs = [m for m in Discriminator(ModelConfig(resolution=32, d_downsample="maxpool")).features
             if isinstance(m, nn.Conv2d)]
    assert all(c.stride == (1, 1) for c in convs)


def test_cspup_halves_out_is_the_wide_block_split_in_two():
    """Same parameters and function as one wide block; the output halves come out as separate tensors."""
    torch.manual_seed(0)
    split, wide = CSPup(16, 8, halves_out=True), CSPup(16, 8)
    assert count_params(split) == count_params(wide)
    with torch.no_grad():  # the wide layers are the two halves stacked along their output channels
        wide.path_a.weight.copy_(torch.cat([split.path_a.lo.weight, split.path_a.hi.weight], 1))
        wide.path_a.bias.copy_(torch.cat([split.path_a.lo.bias, split.path_a.hi.bias]))
        for w, s in zip(wide.path_b[:-1].parameters(), split.path_b[:-1].parameters()):
            w.copy_(s)
        wide.path_b[-1].weight.copy_(torch.cat([split.path_b[-1].lo.weight, split.path_b[-1].hi.weight]))
        wide.path_b[-1].bias.copy_(torch.cat([split.path_b[-1].lo.bias, split.path_b[-1].hi.bias]))
    x = torch.randn(2, 16, 4, 4)
    lo, hi = split((x[:, :8].contiguous(), x[:, 8:].contiguous()))  # a pair in, as the generator passes it
    assert lo.shape == hi.shape == (2, 4, 8, 8)
    torch.testing.assert_close(torch.cat([lo, hi], 1), wide(x))
    torch.testing.assert_close(torch.cat(split(x), 1), wide(x))  # one tensor in still works


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_every_block_reads_contiguous_halves(memory_format):
    G = Generator(ModelConfig(resolution=32, width=0.25)).to(memory_format=memory_format)
    seen = []

    def check(module, args):
        x = args[0]
        seen.append(x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))

    for block in G.blocks:
        block.path_a.register_forward_pre_hook(check)
        block.path_b.register_forward_pre_hook(check)
    assert G(torch.randn(3, 128)).shape == (3, 3, 32, 32)
    assert seen == [True] * 2 * len(G.blocks)  # no strided channel slices for a conv to copy
