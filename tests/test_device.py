"""The device path: precision and memory format chosen per machine, shared device images, runs that free
everything they held, checkpoints that resume on any device."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

import core.device as device_mod
from core import config as config_mod
from core import records as rec
from core.build import build_run, share_images
from core.data import BatchSource, DeviceImages, ImageSet, load_images
from core.errors import UserError
from core.trainer import PHASE_STEPS
from tests.conftest import step_losses
from tests.helpers import build


def test_auto_is_measured_not_read_from_cpu_flags(tiny_cfg, monkeypatch):
    """Whatever the CPU's flags say, auto leaves every path open to measurement (tests/test_fastpath.py); only a
    rough timing that may not measure (the ETA's probe) takes a fixed guess, and explicit values always win."""
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: pytest.fail("auto must not read CPU flags"))
    cfg = config_mod.resolve("cpu", {"train.device": "cpu"})
    assert (cfg.train.amp, cfg.train.channels_last, cfg.train.compile) == ("auto", "auto", "auto")
    assert len(device_mod.candidate_paths(cfg.train)) == 8
    assert device_mod.unmeasured_path(cfg.train, "cpu") == device_mod.ExecPath("fp32", False, False)
    assert device_mod.unmeasured_path(cfg.train, "cuda") == device_mod.ExecPath("bf16", True, False)
    quick = config_mod.resolve("quick").train  # tests and --smoke: one fixed path, nothing to measure
    assert device_mod.candidate_paths(quick) == [device_mod.ExecPath("bf16", True, False)]
    pinned = config_mod.resolve("cpu", {"train.amp": "fp32", "train.channels_last": "on", "train.compile": "off"})
    assert device_mod.unmeasured_path(pinned.train, "cuda") == device_mod.ExecPath("fp32", True, False)


def test_channels_last_and_compile_take_on_off_auto_and_the_old_booleans():
    for given, stored in [("true", "on"), ("False", "off"), (True, "on"), (False, "off"), ("auto", "auto")]:
        assert config_mod.resolve("quick", {"train.channels_last": given}).train.channels_last == stored
        assert config_mod.resolve("quick", {"train.compile": given}).train.compile == stored
    with pytest.raises(UserError, match="train.compile='maybe' is not one of: auto, on, off"):
        config_mod.resolve("quick", {"train.compile": "maybe"})
    with pytest.raises(UserError, match="train.channels_last='sometimes' is not one of: auto, on, off"):
        config_mod.resolve("quick", {"train.channels_last": "sometimes"})
    with pytest.raises(UserError, match="train.amp='fp16' is not one of"):
        config_mod.resolve("quick", {"train.amp": "fp16"})


def test_the_path_a_run_takes_is_a_run_param(tiny_cfg):
    from core.fastpath import PathChoice
    from core.runner import run_params
    cfg = tiny_cfg()
    path = PathChoice(device_mod.ExecPath("bf16", True, False), "measured")
    params = run_params(cfg, load_images(cfg.data, cfg.model.resolution), path)
    assert {k: params[k] for k in ("derived.amp", "derived.channels_last", "derived.compile", "derived.path_source")} == {
        "derived.amp": "bf16", "derived.channels_last": True, "derived.compile": False, "derived.path_source": "measured"}
    assert params["train.amp"] == "fp32"  # what was asked for stays beside what was used


def test_bf16_channels_last_on_the_cpu_tracks_fp32(tiny_cfg):
    """The GPU's mixed-precision path, run on the CPU, against fp32 NCHW from the same seed and batches.

    Step 1 (identical weights) differs only by bf16 rounding in the forward pass: bf16 keeps 8 significant
    bits (~0.4% per value) but convs accumulate in fp32 and the loss averages over the batch, so 1e-3
    relative (measured ~2e-4). After that the weights differ too: Adam's first updates move each weight by
    ~lr whatever its gradient's size, so a rounding-flipped sign of a tiny gradient is a full-size change;
    5e-2 relative over 5 steps (measured up to 1.8e-2 here; the CUDA loss check uses the same 5e-2).
    """
    fast = build(tiny_cfg(train__amp="bf16", train__channels_last="on"), with_fid=False)
    plain = build(tiny_cfg(train__amp="fp32", train__channels_last="off"), with_fid=False)
    assert fast.autocast.fast_dtype == torch.bfloat16 and fast.autocast._enabled and not plain.autocast._enabled
    assert next(fast.D.parameters()).is_contiguous(memory_format=torch.channels_last)
    assert fast.batches.next(4).is_contiguous(memory_format=torch.channels_last)
    fast.batches.load_state_dict(plain.batches.state_dict())  # the draw above moved fast's RNG: rewind it
    ours, ref = step_losses(fast, 5), step_losses(plain, 5)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-3)
    np.testing.assert_allclose(ours, ref, rtol=5e-2)
    assert not np.allclose(ours, ref, rtol=1e-7)  # really a different arithmetic


def test_shared_device_images_give_each_run_its_own_draws(tiny_cfg):
    cfg = tiny_cfg(train__channels_last="on")
    images = load_images(cfg.data, cfg.model.resolution)
    shared = share_images(cfg, images)
    assert shared.pixels.shape == (len(images.images), 32, 32, 3)  # NHWC, stored once
    a, b = build_run(cfg, with_fid=False, images=shared), build_run(cfg, with_fid=False, images=shared)
    assert a.batches.images is shared and b.batches.images is shared
    x = a.batches.next(8)
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, b.batches.next(8))  # same seed, separate generators: the same first batch
    # NHWC storage serves exactly the batches NCHW storage does
    nchw = BatchSource(images.images, torch.device("cpu"), seed=cfg.train.seed + 2)
    torch.testing.assert_close(nchw.next(8), BatchSource(shared, seed=cfg.train.seed + 2, channels_last=True).next(8))


def test_build_run_decides_precision_once_and_copies_images_from_another_device(tiny_cfg):
    cfg = tiny_cfg(train__amp="fp32", train__channels_last="on")
    images = load_images(cfg.data, cfg.model.resolution)
    elsewhere = DeviceImages(images, torch.device("meta"))  # shared on another device than cfg's (cpu), NCHW
    trainer = build_run(cfg, with_fid=False, images=elsewhere)
    assert trainer.path == device_mod.ExecPath("fp32", True, False) and trainer.path_choice.source == "explicit"
    assert trainer.path.channels_last and not trainer.autocast._enabled
    copy = trainer.batches.images
    assert copy is not elsewhere and copy.device == torch.device("cpu") and copy.image_set is images
    assert copy.channels_last and copy.pixels.shape == (len(images.images), 32, 32, 3)  # this run's layout
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in trainer.G.parameters() if p.dim() == 4)


def run_parts(trainer) -> list[weakref.ref]:
    return [weakref.ref(o) for o in (trainer, trainer.G, trainer.D, trainer.opt_g, trainer.opt_d, trainer.batches)]


def test_a_finished_run_is_freed_by_reference_counting_alone(tiny_cfg):
    """No reference cycles: with the cyclic garbage collector off, dropping the trainer frees all it held."""
    cfg = tiny_cfg()
    shared = share_images(cfg, load_images(cfg.data, cfg.model.resolution))
    gc.collect()
    gc.disable()
    try:
        for seed in range(3):
            trainer = build_run(tiny_cfg(train__seed=seed), with_fid=False, images=shared)
            parts = run_parts(trainer)
            trainer.run()
            del trainer
            assert [p() for p in parts] == [None] * len(parts), f"run {seed} still alive"
    finally:
        gc.enable()


def test_several_runs_in_one_process_leave_nothing_behind(tiny_cfg, tmp_path, monkeypatch):
    import core.runner as runner
    from core.tracking import NullTracker

    built = []

    def spy(*args, **kwargs):
        trainer = build_run(*args, **kwargs)
        built.append(run_parts(trainer) + [weakref.ref(trainer.evaluate)])
        return trainer

    monkeypatch.setattr(runner, "build_run", spy)
    cfg = tiny_cfg()
    shared = share_images(cfg, load_images(cfg.data, cfg.model.resolution))
    for seed in range(3):
        result = runner.execute_run(tiny_cfg(train__seed=seed), NullTracker(), tmp_path / f"run{seed}", images=shared)
        assert result.status == "finished" and rec.FID in result.final
        assert [p() for p in built[-1]] == [None] * len(built[-1]), f"run {seed} still alive"
    assert len(built) == 3


def test_g_step_leaves_d_gradients_alone(tiny_cfg):
    trainer = build(tiny_cfg(), with_fid=False)
    PHASE_STEPS["D"](trainer, 0)
    assert all(p.grad is not None for p in trainer.D.parameters())
    for p in trainer.D.parameters():
        p.grad = None
    g_before = [p.detach().clone() for p in trainer.G.parameters()]
    PHASE_STEPS["G"](trainer, 0)
    assert all(p.grad is None for p in trainer.D.parameters())  # backward went through D, not into its weights
    assert all(p.requires_grad for p in trainer.D.parameters())  # and D trains again in its next phase
    assert all(p.grad is not None for p in trainer.G.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(g_before, trainer.G.parameters()))


def test_device_images_copy_in_chunks_and_keep_their_layout():
    arr = np.random.default_rng(0).integers(0, 256, (10, 3, 4, 4), dtype=np.uint8)
    images = ImageSet(arr, 0, "array", "k")
    nhwc, nchw = DeviceImages(images, "cpu", channels_last=True, chunk=3), DeviceImages(images, "cpu", chunk=4)
    idx = torch.tensor([9, 0, 4])
    assert torch.equal(nhwc.gather(idx), torch.from_numpy(arr[[9, 0, 4]]))
    assert torch.equal(nchw.gather(idx), torch.from_numpy(arr[[9, 0, 4]]))
    assert nhwc.gather(idx).is_contiguous(memory_format=torch.channels_last) and nchw.gather(idx).is_contiguous()


def test_release_memory_collects_cycles():
    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a
    ref = weakref.ref(a)
    del a, b
    device_mod.release_memory(torch.device("cpu"))
    assert ref() is None
