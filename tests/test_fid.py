import numpy as np
import pytest
import torch

from core.config import DataConfig, ModelConfig
from core.kid import estimate as kid_estimate
from core.data import load_images
from core.metrics import (InceptionFeatures, MetricOptions, calc_metric, find_weights, frechet_distance, list_metrics,
                          reference_stats, statistics)
from core.models import Generator, init_weights


@pytest.fixture(scope="module")
def extractor():
    return InceptionFeatures(find_weights(), torch.device("cpu"), batch=32)


def test_frechet_distance_equals_clean_fid():
    cleanfid_fid = pytest.importorskip("cleanfid.fid")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 64)), rng.normal(0.3, 1.2, size=(300, 64))
    mu1, s1 = statistics(a)
    mu2, s2 = statistics(b)
    try:
        theirs = cleanfid_fid.frechet_distance(mu1, s1, mu2, s2)
    except TypeError as exc:  # clean-fid 0.1.35 passes `disp` to sqrtm, which SciPy 1.18 removed
        pytest.skip(f"clean-fid's frechet_distance is broken on this SciPy: {exc}")
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(theirs, rel=1e-7)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6)


def test_features_are_inception_pool3(extractor):
    feats = extractor(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))
    assert feats.shape == (3, 2048) and np.isfinite(feats).all() and (feats >= 0).all()  # post-ReLU avg pool


def test_fid_small_for_real_halves_and_large_for_an_untrained_generator(real_celeba, tmp_path, extractor):
    images = load_images(DataConfig(root=str(real_celeba.parent), max_images=128, cache_dir=str(tmp_path)), 32)
    ref = reference_stats(images.images[:64], images.key, 64, extractor, tmp_path)
    feats = extractor(torch.from_numpy(np.array(images.images[64:128])))
    mu, sigma = statistics(feats)
    real_vs_real = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    # KID of two halves of real CelebA, from the cached reference features: 0 within 3 standard errors
    assert ref.feats.dtype == np.float32 and ref.feats.shape == (64, 2048)
    halves = kid_estimate(ref.feats, feats)
    assert 0 < halves.std_error and abs(halves.value) < 3 * halves.std_error, halves

    torch.manual_seed(0)
    G = Generator(ModelConfig(resolution=32, width=0.125))
    G.apply(init_weights)
    assert "fid" in list_metrics()
    out = calc_metric("fid", MetricOptions(G=G, z_dim=128, num_samples=64, ref=ref, extractor=extractor,
                                           device=torch.device("cpu"), batch=32))
    untrained = out.score("fid").value
    assert out.name == "fid64" and out.value == untrained and out.score("kid").name == "kid64"
    assert out.protocol["num_gen"] == 64 and out.protocol["g_mode"] == "eval"
    assert out.protocol["ref_key"] == ref.key
    # 64 vs 64 samples bias both values up; the gap is what matters
    assert real_vs_real < 0.5 * untrained, (real_vs_real, untrained)
    untrained_kid = out.score("kid")
    assert untrained_kid.value > 10 * untrained_kid.std_error and untrained_kid.value > 10 * abs(halves.value)
    assert ref.path.is_file()
    again = reference_stats(images.images[:64], images.key, 64, extractor, tmp_path)  # from the cache
    np.testing.assert_array_equal(again.sigma, ref.sigma)
    np.testing.assert_array_equal(again.feats, ref.feats)


def test_a_reference_cache_without_features_is_recomputed(tmp_path, extractor):
    images = np.random.default_rng(0).integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    ref = reference_stats(images, "old-cache", 6, extractor, tmp_path)
    feats_file = ref.path.with_suffix(".feats.npy")
    assert feats_file.is_file() and ref.path.is_file()
    saved = np.array(ref.feats)
    del ref
    feats_file.unlink()  # a cache written before features were kept: statistics only
    again = reference_stats(images, "old-cache", 6, extractor, tmp_path)
    assert feats_file.is_file() and again.feats.shape == (6, 2048)
    np.testing.assert_allclose(again.feats, saved, rtol=1e-6)


def test_fast_inception_gives_the_plain_features(extractor):
    """The NHWC fast path against the network as loaded (NCHW): the same features to 1e-4 of their scale."""
    plain = InceptionFeatures(find_weights(), torch.device("cpu"), batch=32, fast=False)
    assert extractor.memory_format == torch.channels_last and plain.memory_format == torch.contiguous_format
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8))
    x = extractor.resize(images)  # float, 299 x 299
    with torch.no_grad():
        plain_feats = plain._forward(x.contiguous())
        scale = plain_feats.abs().max()
        for layout in (x.contiguous(), x.contiguous(memory_format=torch.channels_last)):  # torch / clean resize
            assert (extractor._forward(layout) - plain_feats).abs().max() <= 1e-4 * scale


def test_weights_digest_is_cached_by_path_mtime_and_size(tmp_path):
    import os
    from core.metrics import weights_digest
    path = tmp_path / "w.pt"
    path.write_bytes(b"a" * 100)
    first = weights_digest(path)
    stat = path.stat()
    path.write_bytes(b"b" * 100)  # same size; put the old mtime back: the cached digest is returned unread
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights_digest(path) == first
    path.write_bytes(b"b" * 101)
    assert weights_digest(path) != first


def test_reference_key_names_the_weights(tmp_path):
    from core.metrics import reference_path
    keys = {reference_path(tmp_path, "data", 64, 100, resize="clean", weights=w)[1] for w in ("aaaa", "bbbb")}
    assert len(keys) == 2


def test_tf32_is_off_within_the_fid_pass_on_cuda_and_restored_after():
    from core.metrics import no_tf32
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = True
        with no_tf32(torch.device("cuda")):  # only flips the flags: runs without a GPU too
            assert not matmul.allow_tf32 and not cudnn.allow_tf32
        assert matmul.allow_tf32 and cudnn.allow_tf32
        with no_tf32(torch.device("cpu")):
            assert matmul.allow_tf32
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def test_reference_statistics_and_fid_show_progress_when_asked(tmp_path, extractor, capsys):
    images = np.random.default_rng(0).integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    ref = reference_stats(images, "bar-test", 6, extractor, tmp_path, progress=True)
    G = Generator(ModelConfig(resolution=32, width=0.125))
    calc_metric("fid", MetricOptions(G=G, z_dim=128, num_samples=4, ref=ref, extractor=extractor,
                                     device=torch.device("cpu"), batch=4, progress=True))
    err = capsys.readouterr().err
    assert "FID reference statistics:" in err and "/6 [" in err  # a tqdm bar over the 6 images
    assert "FID on 4 samples:" in err and "/4 [" in err
    reference_stats(images, "bar-test-2", 6, extractor, tmp_path)  # progress off: silent
    assert capsys.readouterr().err == ""
