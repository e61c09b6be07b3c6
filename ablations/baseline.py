from ablations.registry import Ablation, register_ablation


@register_ablation
class Baseline(Ablation):
    """The plain configuration every variant of every study differs from: CSPup G with ReLU and BatchNorm
    after each conv, DCGAN-style D with strided convs, ReLU and BatchNorm, non-saturating BCE loss, Adam
    (2e-4, betas 0.5/0.999) for both networks, batch 128, one D step per G step, hard 1/0 targets. Running it
    alone measures seed-to-seed spread, the noise floor every other study's differences must clear.
    """
    name = "baseline"
    summary = "the plain configuration alone: seed-to-seed spread"
    variants = {"baseline": {}}
