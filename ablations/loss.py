from ablations.registry import Ablation, register_ablation


@register_ablation
class Loss(Ablation):
    """The GAN objective. The baseline is the non-saturating BCE loss (Goodfellow et al. 2014), whose
    gradient vanishes once D is confident. Hinge (Lim & Ye 2017; SNGAN, Miyato et al. 2018; BigGAN) stops
    pushing D once a sample is past its margin, and least squares (LSGAN, Mao et al. 2017) penalises samples
    by their distance to the target even when they are on the right side, so G keeps a gradient. Label
    smoothing keeps its meaning for BCE and least squares (its labels are the regression targets); hinge has
    margins, not targets, so a smoothed label with hinge is refused (e.g. `label_smoothing --base loss=hinge`).
    """
    name = "loss"
    summary = "objective: non-saturating BCE vs hinge vs least squares"
    variants = {
        "baseline": {},
        "hinge": {"train.loss": "hinge"},
        "lsgan": {"train.loss": "lsgan"},
    }
