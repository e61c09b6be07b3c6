import numpy as np
import pytest
import torch

from core import metrics
from core import records as rec
from core.config import DataConfig, ModelConfig
from core.data import load_images
from core.inception import InceptionFeatures, find_weights
from core.kid import estimate as kid_estimate
from core.metrics import (Measured, MetricOptions, Score, calc_metrics, frechet_distance, list_metrics,
                          register_metric)
from core.models import Generator, init_weights
from core.reference import ReferenceStats, reference_stats, statistics


@pytest.fixture(scope="module")
def extractor():
    return InceptionFeatures(find_weights(), torch.device("cpu"), batch=32)


def sqrtm_reference(mu1, s1, mu2, s2) -> float:
    """clean-fid's formula written out: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), SciPy's general sqrtm.

    Nothing here can skip: no clean-fid call (whose `disp` argument SciPy 1.18 removed), only scipy.linalg.
    """
    from scipy import linalg
    covmean = np.real(linalg.sqrtm(s1 @ s2))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("n1,n2", [(300, 300), (40, 300), (300, 40), (40, 30)],
                         ids=["full-rank", "rank-deficient-1", "rank-deficient-2", "both-deficient"])
def test_frechet_distance_equals_the_sqrtm_formula(n1, n2):
    """Our two symmetric eigensolves (and the n x n shortcut given the feature rows) against scipy's sqrtm,
    on full-rank and rank-deficient (n < d = 64) statistics: the small-sample FIDs every CPU test computes."""
    rng = np.random.default_rng(n1 * 1000 + n2)
    a, b = rng.normal(size=(n1, 64)), rng.normal(0.3, 1.2, size=(n2, 64))
    mu1, s1 = statistics(a)
    mu2, s2 = statistics(b)
    expected = sqrtm_reference(mu1, s1, mu2, s2)
    assert expected > 1  # far from 0: a relative tolerance means something
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, s1, mu2, s2, feats1=a) == pytest.approx(expected, rel=1e-6)  # the metric's call
    assert frechet_distance(mu2, s2, mu1, s1, feats1=b) == pytest.approx(expected, rel=1e-6)  # symmetric
    assert frechet_distance(mu1, s1, mu1, s1, feats1=a) == pytest.approx(0, abs=1e-6)


def test_frechet_distance_of_diagonal_gaussians_in_closed_form():
    """Commuting (diagonal) covariances: FID = ||mu1 - mu2||^2 + sum((sqrt(a_i) - sqrt(b_i))^2), exactly."""
    va, vb = np.array([1.0, 4.0, 9.0, 0.0]), np.array([4.0, 1.0, 9.0, 16.0])  # one zero variance: rank 3
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = 1 + 4 + (1 + 1 + 0 + 16)
    assert frechet_distance(mu1, np.diag(va), mu2, np.diag(vb)) == pytest.approx(expected, rel=1e-12)


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


def test_features_equal_clean_fids_own_pipeline(extractor):
    """clean-fid's resizer and its InceptionV3W forward, which scales the resized image as (x - 128) / 128,
    on the same uint8 images and the same network: the reference for our input scaling and layout."""
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer
    net = torch.jit.load(str(find_weights()), map_location="cpu")
    theirs = InceptionV3W.__new__(InceptionV3W)  # its __init__ would download NVIDIA's file; same layers, no base
    torch.nn.Module.__init__(theirs)
    theirs.layers, theirs.resize_inside = (net.layers if hasattr(net, "layers") else net.net.layers).eval(), False
    images = np.random.default_rng(1).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    resize = build_resizer("clean")
    resized = np.stack([resize(img.transpose(1, 2, 0)) for img in images])  # HWC float, 299 x 299
    with torch.no_grad():
        expected = theirs(torch.from_numpy(resized).permute(0, 3, 1, 2)).double().numpy()
    ours = extractor(torch.from_numpy(images))
    assert ours.shape == (3, 2048) and ours.dtype == np.float64
    assert np.abs(ours - expected).max() <= 1e-4 * np.abs(expected).max()


class Recorder(torch.nn.Module):
    """A 'generator' that outputs fixed values and remembers the mode (train/eval) of every call."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.tensor(values, dtype=torch.float32)
        self.modes = []

    def forward(self, z):
        self.modes.append(self.training)
        return self.values.view(1, 1, 1, -1).expand(len(z), 3, 2, -1).clone()


class FeatureSpy:
    """Stands in for InceptionFeatures: keeps what it is fed, returns seeded random features."""
    resize_mode, weights_hash = "clean", "spy"

    def __init__(self, fail=False):
        self.fed, self.fail, self.passes = [], fail, []

    def stream(self, batches):
        if self.fail:
            raise AssertionError("features computed: the cached statistics were not read")
        fed = [b.clone() for b in batches]
        self.fed += fed
        n = sum(len(b) for b in fed)
        self.passes.append(np.random.default_rng(n).normal(size=(n, 2048)))
        return self.passes[-1]


def spy_options(G, extractor, **kw) -> MetricOptions:
    ref = ReferenceStats(np.zeros(2048), np.eye(2048), 8, "refkey", None, np.random.default_rng(0).normal(size=(8, 2048)))
    return MetricOptions(G=G, z_dim=4, num_samples=6, ref=ref, extractor=extractor, device=torch.device("cpu"),
                         batch=4, **kw)


def test_generated_images_reach_inception_as_rounded_uint8():
    """G's [-1, 1] output becomes uint8 exactly as a saved PNG would: (x + 1) * 127.5, rounded, clamped."""
    x = [-1.5, -1.0, 100.6 / 127.5 - 1, 0.002, 1.0, 1.2]  # 100.6 rounds up; 127.755 rounds up (truncation: 127)
    spy = FeatureSpy()
    out = calc_metrics(spy_options(Recorder(x), spy))
    fed = torch.cat(spy.fed)
    assert fed.dtype == torch.uint8 and fed.shape == (6, 3, 2, 6)
    assert fed[0, 0, 0].tolist() == [0, 0, 101, 128, 255, 255]
    assert (fed == fed[:1]).all()
    assert out.protocol["quantise"] == "uint8" and out.protocol["num_gen"] == 6 == len(fed)


@pytest.mark.parametrize("g_mode,before", [("eval", True), ("train", False)])
def test_fid_samples_g_in_its_protocol_mode_with_fixed_latents_and_restores_the_mode(g_mode, before):
    G = Recorder([0.0])
    G.train(before)  # the trainer leaves G in train mode; a caller may have it in eval mode
    zs = []
    forward = G.forward
    G.forward = lambda z: (zs.append(z.clone()), forward(z))[1]
    opts = spy_options(G, FeatureSpy(), g_mode=g_mode, seed=7)
    out = calc_metrics(opts)
    assert set(G.modes) == {g_mode == "train"} and out.protocol["g_mode"] == g_mode
    assert G.training is before  # put back as it was
    first = torch.cat(zs)
    zs.clear()
    calc_metrics(opts)
    assert torch.equal(torch.cat(zs), first)  # every evaluation sees the same z


PROTOCOL_TAGS = ["num_gen", "num_ref", "ref_key", "g_mode", "quantise", "resize", "version", "kid_subsets",
                 "kid_std_error", "pr_k", "dc_k", "g_source", "standing_batches"]  # in this order


def test_every_registered_metric_comes_from_one_inception_pass(monkeypatch):
    """A metric registered later is one more function of the same features: no second pass, its score in the result."""
    monkeypatch.setattr(metrics, "_METRICS", dict(metrics._METRICS))  # the throwaway is gone after the test
    seen = []

    @register_metric
    def throwaway(feats, ref):
        seen.append(feats)
        return Measured((Score("throwaway", f"throwaway{len(feats)}", float(feats.sum())),), {"throwaway_spread": 1.0},
                        {"throwaway_k": 3})

    spy = FeatureSpy()
    opts = spy_options(Recorder([0.0]), spy)
    out = calc_metrics(opts)
    (feats,) = spy.passes  # one Inception pass for every metric
    assert len(seen) == 1 and seen[0] is feats
    assert [s.family for s in out.scores] == [rec.FID, rec.KID, *rec.FIDELITY_DIVERSITY, "throwaway"]  # FID first
    assert out.score("throwaway") == Score("throwaway", "throwaway6", float(feats.sum()))
    # FID and KID saw those same features
    assert out.score(rec.FID) == metrics.fid(feats, opts.ref).scores[0]
    assert out.score(rec.KID) == metrics.kid(feats, opts.ref).scores[0]
    assert out.score(rec.COVERAGE) == metrics.pr_dc(feats, opts.ref).scores[3]
    assert list(out.diagnostics) == [rec.SPREAD_KEY, rec.NN_RATIO_KEY, "throwaway_spread"]
    assert out.diagnostics[rec.SPREAD_KEY] == metrics.fid(feats, opts.ref).diagnostics[rec.SPREAD_KEY]
    assert list(out.protocol) == PROTOCOL_TAGS[:-2] + ["throwaway_k"] + PROTOCOL_TAGS[-2:]
    assert out.num_samples == 6 and (out.name, out.value) == ("fid6", out.score(rec.FID).value)


def test_the_built_in_result_has_the_scores_diagnostics_and_tags_the_trainer_logs():
    out = calc_metrics(spy_options(Recorder([0.0]), FeatureSpy()))
    assert [(s.family, s.name) for s in out.scores] == [(rec.FID, "fid6"), (rec.KID, "kid6"), *(
        (m, m) for m in rec.FIDELITY_DIVERSITY)]
    assert np.isnan(out.scores[0].std_error) and out.scores[1].std_error > 0
    assert list(out.diagnostics) == [rec.SPREAD_KEY, rec.NN_RATIO_KEY] and list(out.protocol) == PROTOCOL_TAGS
    assert out.protocol["kid_subsets"] == "100 x 6"


@pytest.mark.parametrize("name", list_metrics())
def test_each_registered_metric_alone_gives_what_it_gives_beside_the_others(name):
    spy = FeatureSpy()
    alone = calc_metrics(spy_options(Recorder([0.0]), spy), names=[name])
    everything = calc_metrics(spy_options(Recorder([0.0]), FeatureSpy()))
    assert len(spy.passes) == 1 and alone.scores
    for s in alone.scores:
        assert everything.score(s.family) == s


def test_an_unknown_or_doubly_registered_metric_is_refused(monkeypatch):
    from core.errors import UserError
    with pytest.raises(UserError, match="unknown metric 'fdi'; known: " + ", ".join(list_metrics())):
        calc_metrics(spy_options(Recorder([0.0]), FeatureSpy()), names=["fdi"])
    monkeypatch.setattr(metrics, "_METRICS", dict(metrics._METRICS))
    with pytest.raises(ValueError, match="registered twice"):
        register_metric(metrics.fid)


def test_trainers_fid_uses_the_configured_g_mode_and_seed(tiny_cfg, monkeypatch):
    seen = []
    monkeypatch.setattr(InceptionFeatures, "for_eval", lambda *a, **k: FeatureSpy())
    monkeypatch.setattr(metrics, "load_reference", lambda *a, **k: spy_options(None, None).ref)
    monkeypatch.setattr(metrics, "calc_metrics", lambda opts: seen.append(opts))
    cfg = tiny_cfg(eval__g_mode="train")
    evaluate = metrics.FidEvaluator(cfg, load_images(cfg.data, 32), torch.device("cpu"))
    evaluate(Recorder([0.0]), 16)
    (opts,) = seen
    assert (opts.g_mode, opts.seed, opts.num_samples, opts.z_dim) == ("train", metrics.FID_SEED, 16, cfg.model.z_dim)


def test_cached_reference_statistics_are_read_back_not_recomputed(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    first = reference_stats(images, "cache-test", 8, FeatureSpy(), tmp_path)
    assert first.path.is_file()
    again = reference_stats(images, "cache-test", 8, FeatureSpy(fail=True), tmp_path)  # must not compute features
    np.testing.assert_array_equal(again.mu, first.mu)
    np.testing.assert_array_equal(again.sigma, first.sigma)
    assert (again.key, again.num_images) == (first.key, 8)
    recomputed = FeatureSpy()
    other = reference_stats(images, "cache-test", 4, recomputed, tmp_path)  # another count: another key
    assert other.key != first.key and sum(len(b) for b in recomputed.fed) == 4


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
    out = calc_metrics(MetricOptions(G=G, z_dim=128, num_samples=64, ref=ref, extractor=extractor,
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
    from core.inception import weights_digest
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
    from core.reference import reference_path
    keys = {reference_path(tmp_path, "data", 64, 100, resize="clean", weights=w)[1] for w in ("aaaa", "bbbb")}
    assert len(keys) == 2


def test_tf32_is_off_within_the_fid_pass_on_cuda_and_restored_after():
    from core.inception import no_tf32
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
    calc_metrics(MetricOptions(G=G, z_dim=128, num_samples=4, ref=ref, extractor=extractor,
                               device=torch.device("cpu"), batch=4, progress=True))
    err = capsys.readouterr().err
    assert "FID reference statistics:" in err and "/6 [" in err  # a tqdm bar over the 6 images
    assert "FID on 4 samples:" in err and "/4 [" in err
    reference_stats(images, "bar-test-2", 6, extractor, tmp_path)  # progress off: silent
    assert capsys.readouterr().err == ""
