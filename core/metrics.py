"""The metrics of an evaluation: one Inception pass over G's samples, then every registered metric of those features.

Generated images are quantised to uint8 first, exactly like real images saved to disk, so both sides see the
same pipeline (core/inception.py) and are compared with the same reference (core/reference.py). A metric is a
function of (generated features, reference statistics) registered with `@register_metric`, as stylegan's
`metric_main` registers its metrics; `calc_metrics` runs the extractor once and hands the same features to each,
so a new metric costs no second pass. The built-ins:
- `fid`: clean-fid's Frechet distance, and the feature spread (generated over real trace of the covariance,
  a collapse diagnostic);
- `kid`: unbiased MMD^2 against the reference images' features (core/kid.py), in subsets of at most 1,000 as
  clean-fid and stylegan draw them, with a standard error that counts the samples, not only the subsets;
- `pr_dc`: fidelity and diversity apart (core/prdc.py): improved precision and recall at k = 3 (stylegan2-ada's
  `pr50k3`) and density and coverage at k = 5 (Naeem et al.'s choice), from one pass over the distances.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from core import records as rec
from core.config import RunConfig
from core.data import ImageSet
from core.errors import UserError
from core.inception import PROTOCOL_VERSION, RESIZES, InceptionFeatures, with_bar
from core.kid import estimate as kid_estimate
from core.prdc import knn_radii, prdc, prdc_at  # noqa: F401  (core.metrics.prdc: the k-NN fidelity/diversity metrics)
from core.reference import ReferenceStats, load_reference, statistics
from core.sampling import g_source

FID_SEED = 123  # z for every evaluation is drawn from this seed: every evaluation sees the same latents
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 0  # clean-fid's and stylegan's subsets; fixed draws
PR_K, DC_K = 3, 5  # k of precision/recall (Kynkaanniemi et al., stylegan2-ada) and density/coverage (Naeem et al.)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *,
                     feats1: np.ndarray | None = None) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), clean-fid's formula.

    Tr sqrt(S1 S2) = Tr sqrt(A S2 A) with A = sqrt(S1), which is symmetric PSD: two symmetric eigensolves
    (about 1 s for 2048x2048 on two cores) instead of scipy's general sqrtm (about 9 s), and no `disp`
    argument, which SciPy 1.18 removed and clean-fid 0.1.35 still passes. Given the n < d feature rows
    behind (mu1, sigma1), S1 = B^T B with B = (feats1 - mu1) / sqrt(n - 1), and S1 S2 has the non-zero
    eigenvalues of B S2 B^T: the same trace from one n x n eigensolve (small-sample FIDs in CPU tests).
    """
    diff = mu1 - mu2
    if feats1 is not None and len(feats1) < len(mu1):
        b = (feats1 - mu1) / np.sqrt(len(feats1) - 1)
        m = b @ sigma2 @ b.T
    else:
        w, v = np.linalg.eigh(sigma1)
        root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        m = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


@dataclass
class MetricOptions:
    """Everything an evaluation needs; the evaluator builds one per evaluation."""
    G: torch.nn.Module
    z_dim: int
    num_samples: int
    ref: ReferenceStats
    extractor: InceptionFeatures
    device: torch.device
    g_mode: str = "eval"  # eval | train | standing: G's BatchNorm statistics (standing: G is a re-estimated copy)
    g_source: str = "g"  # g | ema: which network G is (core/sampling.py)
    standing_batches: int = 0  # z batches that re-estimated G's BatchNorm statistics (g_mode=standing); else 0
    seed: int = FID_SEED  # z is drawn from this seed
    batch: int = 250
    progress: bool = False  # a progress bar over the generated images


def generate_uint8(opts: MetricOptions) -> Iterator[torch.Tensor]:
    """G's samples in batches, quantised to uint8 like images written to disk (with a bar if opts.progress)."""
    yield from with_bar(_generate_uint8(opts), opts.num_samples, f"FID on {opts.num_samples} samples", opts.progress)


def _generate_uint8(opts: MetricOptions) -> Iterator[torch.Tensor]:
    was_training = opts.G.training
    opts.G.train(opts.g_mode == "train")
    gen = torch.Generator(device=opts.device).manual_seed(opts.seed)
    try:
        with torch.no_grad():
            for start in range(0, opts.num_samples, opts.batch):
                n = min(opts.batch, opts.num_samples - start)
                z = torch.randn(n, opts.z_dim, device=opts.device, generator=gen)
                x = opts.G(z).float()
                yield ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    finally:
        opts.G.train(was_training)


@dataclass(frozen=True)
class Score:
    """One value a metric measured: its family names the MLflow keys (fid/fid10k, fid/final, fid/best)."""
    family: str  # rec.FID | rec.KID | a registered metric's own
    name: str  # what is measured on how many samples (rec.metric_name): fid10k, kid256
    value: float
    std_error: float = math.nan  # NaN where the metric has none (FID)


@dataclass(frozen=True)
class Measured:
    """What one registered metric found in the features: its scores, diagnostics and protocol tags."""
    scores: tuple[Score, ...]
    diagnostics: dict[str, float] = field(default_factory=dict)  # not scores, by MLflow key (rec.SPREAD_KEY)
    protocol: dict[str, object] = field(default_factory=dict)  # what makes its values comparable (KID's subsets)


@dataclass(frozen=True)
class MetricResult:
    """What an evaluation returns: every metric's scores, diagnostics, and the protocol they were measured under."""
    scores: tuple[Score, ...]  # in registration order: FID first, then KID, then any metric registered later
    diagnostics: dict[str, float]  # not scores, by MLflow key: fid/feature_spread, dc/nn_ratio
    protocol: dict[str, object]  # sample counts, G mode, quantisation, reference key: what makes values comparable
    num_samples: int  # generated images behind every score: best values compare only equal counts

    @property
    def name(self) -> str:
        return self.scores[0].name

    @property
    def value(self) -> float:
        return self.scores[0].value

    def score(self, family: str) -> Score:
        """The score of one family (fid, kid); a UserError naming the families measured when it is absent."""
        for s in self.scores:
            if s.family == family:
                return s
        raise UserError(f"metric '{self.name}' measured no {family}; it measured {', '.join(s.family for s in self.scores)}")


FeatureMetric = Callable[[np.ndarray, ReferenceStats], Measured]  # (generated features, reference) -> Measured
_METRICS: dict[str, FeatureMetric] = {}  # in registration order, which is the order of a result's scores


def register_metric(fn: FeatureMetric) -> FeatureMetric:
    """Register a metric of (generated features, reference) under its function's name; twice is an error."""
    if fn.__name__ in _METRICS:
        raise ValueError(f"metric '{fn.__name__}' registered twice")
    _METRICS[fn.__name__] = fn
    return fn


def list_metrics() -> list[str]:
    """The registered metrics' names, sorted."""
    return sorted(_METRICS)


def _unique(what: str, keys: Sequence[str]) -> None:
    # two metrics writing one key would overwrite each other's values without a word
    doubled = sorted({k for k in keys if list(keys).count(k) > 1})
    if doubled:
        raise ValueError(f"metrics return the same {what}: {', '.join(doubled)}")


def measure(feats: np.ndarray, ref: ReferenceStats, names: Sequence[str] | None = None) -> MetricResult:
    """Every registered metric (or those named) of one set of generated features against the reference.

    Its protocol holds only the metrics' own tags; calc_metrics adds how the features were made.
    """
    chosen = list(_METRICS) if names is None else list(names)
    unknown = [n for n in chosen if n not in _METRICS]
    if unknown or not chosen:
        raise UserError(f"unknown metric {', '.join(map(repr, unknown)) or '(none named)'}; "
                        f"known: {', '.join(list_metrics())}")
    parts = [fn(feats, ref) for name, fn in _METRICS.items() if name in chosen]  # registration order
    scores = tuple(s for p in parts for s in p.scores)
    _unique("score", [s.name for s in scores])
    _unique("diagnostic", [k for p in parts for k in p.diagnostics])
    _unique("protocol tag", [k for p in parts for k in p.protocol])
    return MetricResult(scores, {k: v for p in parts for k, v in p.diagnostics.items()},
                        {k: v for p in parts for k, v in p.protocol.items()}, num_samples=len(feats))


def calc_metrics(opts: MetricOptions, names: Sequence[str] | None = None) -> MetricResult:
    """Every registered metric (or those named) of `num_samples` generated images, from one Inception pass."""
    measured = measure(opts.extractor.stream(generate_uint8(opts)), opts.ref, names)
    ref = opts.ref
    return dataclasses.replace(measured, protocol={
        "num_gen": opts.num_samples, "num_ref": ref.num_images, "ref_key": ref.key, "g_mode": opts.g_mode,
        "quantise": "uint8", "resize": RESIZES[opts.extractor.resize_mode], "version": PROTOCOL_VERSION,
        **measured.protocol, "g_source": opts.g_source, "standing_batches": opts.standing_batches})


@register_metric
def fid(feats: np.ndarray, ref: ReferenceStats) -> Measured:
    """FID against the reference, and the feature spread: collapse shows as far less spread than real features."""
    mu, sigma = statistics(feats)
    value = frechet_distance(mu, sigma, ref.mu, ref.sigma, feats1=feats)
    spread = float(np.trace(sigma) / np.trace(ref.sigma))
    return Measured((Score(rec.FID, rec.metric_name(rec.FID, len(feats)), value),), {rec.SPREAD_KEY: spread})


@register_metric
def kid(feats: np.ndarray, ref: ReferenceStats) -> Measured:
    """KID against the reference images' features, with its standard error (core/kid.py)."""
    e = kid_estimate(ref.feats, feats, KID_SUBSETS, KID_SUBSET_SIZE, seed=KID_SEED)
    return Measured((Score(rec.KID, rec.metric_name(rec.KID, len(feats)), e.value, e.std_error),), protocol={
        f"{rec.KID}_subsets": f"{e.num_subsets} x {e.subset_size}",
        f"{rec.KID}_std_error": "two-sample jackknife + subsets"})


def nn_ratio(feats: np.ndarray, real: np.ndarray, k: int = DC_K) -> float:
    """Diversity without fidelity: the median distance from a generated sample to its k-th nearest generated
    neighbour over the same among as many real images (rec.NN_RATIO), m = the smaller count of both, the first m
    of each. 0 for one image repeated, ~1 for samples as spread out as real images; NaN for m <= k.

    Recall and coverage need generated samples near real ones: a G that draws varied but unrealistic images
    (every `quick` run, and every run early on) scores 0 on both, exactly like a G that draws one image. This
    ratio looks at the generated set alone, against real images on the same count under the same protocol. The
    real side is the reference's own features: a set's spread within itself never meets the other set, so the
    images need not be held out (and under the `default` preset the reference is every image, none left over).
    """
    m = min(len(feats), len(real))
    if m <= k:
        return math.nan
    device = _device()
    return float(np.median(knn_radii(feats[:m], k, device=device)) /
                 np.median(knn_radii(np.asarray(real[:m]), k, device=device)))


def _device() -> torch.device:
    """Where the k-NN metrics compute their distances: the GPU where there is one (50k x 50k features are ~4e13
    flops in float64), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@register_metric
def pr_dc(feats: np.ndarray, ref: ReferenceStats) -> Measured:
    """Precision and recall (k = 3), density and coverage (k = 5) against the reference features, and the nearest-
    neighbour ratio (nn_ratio); NaN with too few samples for k (a smoke run's handful)."""
    if min(len(feats), ref.num_images) <= max(PR_K, DC_K):
        at = {k: dict.fromkeys(rec.FIDELITY_DIVERSITY, math.nan) for k in (PR_K, DC_K)}
    else:
        at = prdc_at(ref.feats, feats, (PR_K, DC_K), device=_device())
    k_of = {rec.PRECISION: PR_K, rec.RECALL: PR_K, rec.DENSITY: DC_K, rec.COVERAGE: DC_K}
    return Measured(tuple(Score(m, m, at[k_of[m]][m]) for m in rec.FIDELITY_DIVERSITY),
                    {rec.NN_RATIO_KEY: nn_ratio(feats, ref.feats)}, protocol={f"{rec.PR}_k": PR_K, f"{rec.DC}_k": DC_K})


class FidEvaluator:
    """G -> MetricResult of every registered metric, against reference statistics fixed for the whole run."""

    def __init__(self, cfg: RunConfig, images: ImageSet, device: torch.device, progress: bool = False):
        self.extractor = InceptionFeatures.for_eval(cfg.eval, device)
        self.ref: ReferenceStats = load_reference(cfg, images, self.extractor, progress)
        self.cfg, self.device, self.progress = cfg, device, progress

    def __call__(self, G: torch.nn.Module, num_samples: int) -> MetricResult:
        e = self.cfg.eval
        return calc_metrics(MetricOptions(
            G=G, z_dim=self.cfg.model.z_dim, num_samples=num_samples, ref=self.ref, extractor=self.extractor,
            device=self.device, g_mode=e.g_mode, g_source=g_source(self.cfg), seed=FID_SEED, batch=e.fid_batch,
            standing_batches=e.standing_batches if e.g_mode == "standing" else 0, progress=self.progress))
