import numpy as np
import pytest
import torch

from core.config import DataConfig, ModelConfig
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
    mu, sigma = statistics(extractor(torch.from_numpy(np.array(images.images[64:128]))))
    real_vs_real = frechet_distance(mu, sigma, ref.mu, ref.sigma)

    torch.manual_seed(0)
    G = Generator(ModelConfig(resolution=32, width=0.125))
    G.apply(init_weights)
    assert "fid" in list_metrics()
    out = calc_metric("fid", MetricOptions(G=G, z_dim=128, num_samples=64, ref=ref, extractor=extractor,
                                           device=torch.device("cpu"), batch=32))
    untrained = out.values["fid64"]
    assert out.name == "fid64" and out.value == untrained
    assert out.protocol["num_gen"] == 64 and out.protocol["g_mode"] == "eval"
    assert out.protocol["ref_key"] == ref.key
    # 64 vs 64 samples bias both values up; the gap is what matters
    assert real_vs_real < 0.5 * untrained, (real_vs_real, untrained)
    assert ref.path.is_file()
    again = reference_stats(images.images[:64], images.key, 64, extractor, tmp_path)  # from the cache
    np.testing.assert_array_equal(again.sigma, ref.sigma)
