from ablations.registry import Ablation, register_ablation


@register_ablation
class TTUR(Ablation):
    """Separate learning rates for D and G. The two time-scale update rule (Heusel et al. 2017) gives D a
    faster rate (4e-4) than G (1e-4) so that D tracks the current G closely, with a convergence proof to a
    local Nash equilibrium; seed 002 pushed the ratio to 10:1 by slowing G (2e-4 / 2e-5). The baseline uses
    2e-4 for both, as DCGAN.
    """
    name = "ttur"
    summary = "LR pairs D/G: equal 2e-4/2e-4, TTUR 4e-4/1e-4, 10:1 2e-4/2e-5"
    variants = {
        "baseline": {},
        "ttur": {"optim.lr_d": 4e-4, "optim.lr_g": 1e-4},
        "ratio_10": {"optim.lr_d": 2e-4, "optim.lr_g": 2e-5},
    }
