"""The benchmark's CPU smoke run, the device FID resize against clean-fid's, and speed not changing results."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core import config as config_mod
from tests.helpers import build
from core.errors import UserError
from core.inception import RESIZES
from core.metrics import MetricOptions, calc_metrics
from core.reference import ReferenceStats, reference_path
from core.resize import BicubicResize, pil_bicubic_weights
from studies.bench.plain import plain_losses
from tests.conftest import step_losses

REPO = Path(__file__).resolve().parents[1]


def trainer_losses(cfg, steps: int) -> list[tuple[float, float]]:
    return step_losses(build(cfg, with_fid=False), steps)


def test_bench_cpu_smoke_writes_json(tmp_path, synthetic_root):
    out = tmp_path / "bench.json"
    args = ["--preset", "quick", "--data", str(synthetic_root), "--batches", "8", "--steps", "2", "--warmup", "2",
            "--fid-samples", "4", "--fid-resize", "torch", "--workers", "0", "--compile", "--out", str(out),
            "--set", "data.max_images=32", "--set", "eval.fid_ref_images=4", "--set", "eval.fid_batch=4",
            "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", "train.amp=fp32", "--set", "train.channels_last=off"]  # auto is bf16 on a bf16 CPU
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "studies.bench", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "img/s" in proc.stdout and "resize torch" in proc.stdout
    result = json.loads(out.read_text())
    assert result["device_type"] == "cpu" and result["flops_per_img"] > 0
    assert [row["batch"] for row in result["plain"]] == [8] and result["plain"][0]["img_per_s"] > 0
    eager, *compiled = result["suite"]
    assert eager["error"] is None and eager["variant"] == "fp32+NCHW+eager" and eager["finite"]
    for key in ("img_per_s", "ratio", "mfu", "seconds"):
        assert eager[key] > 0 and math.isfinite(eager[key]), key
    # CPU runs both loops in fp32 on the same batches: the first losses agree
    assert len(eager["loss_check"]["suite"]) == 2 and eager["loss_check"]["max_rel_diff"] < 1e-5
    assert len(compiled) == 2 and all(row["error"].startswith("skipped") for row in compiled)
    (fid,) = result["fid"]
    assert fid["resize"] == "torch" and fid["seconds"] > 0 and math.isfinite(fid["value"])
    assert fid["protocol"]["resize"] == RESIZES["torch"] and fid["protocol"]["num_gen"] == 4


def test_bench_bad_input_is_one_line_and_exit_2(capsys):
    from studies.bench.__main__ import main
    assert main(["--batches", "64,x"]) == 2
    assert main(["--fid-resize", "cv2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--batches" in err[0] and "cv2" in err[1]


@pytest.mark.parametrize("size", [(32, 32), (128, 128), (218, 178), (512, 400)], ids=str)
def test_device_resize_matches_clean_fid_resizer(size):
    resize_clean = pytest.importorskip("cleanfid.resize").build_resizer("clean")
    rng = np.random.default_rng(sum(size))
    images = rng.integers(0, 256, (2, *size, 3), dtype=np.uint8)
    theirs = np.stack([resize_clean(img) for img in images])
    ours = BicubicResize(299)(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert ours.shape == theirs.shape == (2, 299, 299, 3)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-3)
    # the kernel matters: torch's plain bicubic (a = -0.75, clamped borders) is far off, so the check can fail
    plain = torch.nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=(299, 299),
                                            mode="bicubic", align_corners=False).clamp(0, 255)
    assert np.abs(plain.permute(0, 2, 3, 1).numpy() - theirs).max() > 1


def test_resize_weights_are_normalised_and_shrink_with_a_wider_kernel():
    up, down = pil_bicubic_weights(128, 299), pil_bicubic_weights(512, 299)
    np.testing.assert_allclose(up.sum(1), 1, atol=1e-12)
    np.testing.assert_allclose(down.sum(1), 1, atol=1e-12)
    assert (up[150] != 0).sum() == 4 and (down[150] != 0).sum() > 4  # support widens only when downscaling


def test_trainer_step_gives_the_plain_fp32_loss_trajectory(tiny_cfg):
    """In fp32 NCHW both paths do the same arithmetic on the same batches and z: losses agree to float rounding.

    With bf16 autocast and channels_last (auto on CUDA and on CPUs with native bf16) the first steps agree
    to about 1e-2 relative (bf16 keeps 8 significant bits); test_..._on_cuda below, tests/test_device.py and
    the bench's loss check show it.
    """
    cfg = tiny_cfg(train__amp="fp32", train__channels_last="off")
    from core.data import load_images
    images = load_images(cfg.data, cfg.model.resolution).images
    ours, plain = trainer_losses(cfg, 3), plain_losses(cfg, images, torch.device("cpu"), 3)
    np.testing.assert_allclose(ours, plain, rtol=1e-5)
    other_seed = plain_losses(config_mod.apply_overrides(cfg, {"train.seed": 1}), images, torch.device("cpu"), 3)
    assert not np.allclose(ours, other_seed, rtol=1e-3)  # the comparison can tell runs apart


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_trainer_step_on_cuda_stays_within_bf16_tolerance_of_plain_fp32(tiny_cfg):
    cfg = tiny_cfg(train__device="cuda")
    from core.data import load_images
    images = load_images(cfg.data, cfg.model.resolution).images
    ours, plain = trainer_losses(cfg, 3), plain_losses(cfg, images, torch.device("cuda"), 3)
    np.testing.assert_allclose(ours, plain, rtol=5e-2)


class FakeExtractor:
    """Features without Inception: the protocol, not the network, is under test."""

    def __init__(self, resize_mode: str):
        self.resize_mode = resize_mode

    def stream(self, batches) -> np.ndarray:
        return np.concatenate([x.double().flatten(1)[:, :8].numpy() for x in batches])


def test_fid_protocol_is_the_same_except_the_resize_and_keys_never_mix(tmp_path):
    from core.models import Generator, init_weights
    torch.manual_seed(0)
    G = Generator(config_mod.ModelConfig(resolution=16, width=0.125))
    G.apply(init_weights)
    protocols = {}
    for mode in RESIZES:
        path, key, n = reference_path(tmp_path, "data", 64, 100, resize=mode)
        ref = ReferenceStats(np.zeros(8), np.eye(8), n, key, path, np.random.default_rng(0).normal(size=(n, 8)))
        opts = MetricOptions(G=G, z_dim=128, num_samples=6, ref=ref, extractor=FakeExtractor(mode),
                             device=torch.device("cpu"), batch=4)
        protocols[mode] = calc_metrics(opts).protocol
    clean, torch_ = protocols["clean"], protocols["torch"]
    assert {k for k in clean if clean[k] != torch_[k]} == {"resize", "ref_key"}
    assert clean["resize"] == "clean-fid PIL bicubic 299"  # unchanged: earlier runs stay comparable
    with pytest.raises(UserError, match="eval.fid_resize"):
        config_mod.resolve("default", {"eval.fid_resize": "bilinear"})


def test_small_sample_frechet_distance_equals_the_full_eigensolve():
    from core.metrics import frechet_distance
    from core.reference import statistics
    rng = np.random.default_rng(0)
    feats, ref = rng.normal(size=(40, 256)), rng.normal(0.2, 1.3, size=(500, 256))
    mu, sigma = statistics(feats)
    full = frechet_distance(mu, sigma, *statistics(ref))
    # the full eigensolve takes square roots of rounding noise in S1's null space: agreement to ~1e-8
    assert frechet_distance(mu, sigma, *statistics(ref), feats1=feats) == pytest.approx(full, rel=1e-6)
    assert frechet_distance(mu, sigma, mu, sigma, feats1=feats) == pytest.approx(0, abs=1e-8)


def test_metric_bench_times_every_registered_metric(capsys, tmp_path):
    from core.metrics import list_metrics
    from studies.bench.metrics import main
    assert main(["--ref", "40", "--gen", "20", "--dim", "16", "--repeats", "2", "--out", str(tmp_path / "m.json")]) == 0
    out = json.loads((tmp_path / "m.json").read_text())
    assert set(out["seconds"]) == set(list_metrics()) and all(t["min"] > 0 for t in out["seconds"].values())
    printed = capsys.readouterr().out
    assert "40 reference x 20 generated features, 16-d, on " in printed and all(m in printed for m in list_metrics())
