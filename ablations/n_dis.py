from ablations.registry import Ablation, register_ablation


@register_ablation
class NDis(Ablation):
    """How often D is updated relative to G. Several D steps per G step (WGAN used 5) keep D near its
    optimum so G follows a meaningful gradient; the seeds tried the opposite, training D only every k-th G
    step, to stop a too-strong D from saturating G's loss. Both are phase intervals of the one trainer:
    n_dis D updates (each on a fresh real batch) before every G update, or D trained only every d_interval
    steps. Images seen count G's batches, so D sees n_dis / d_interval times as many real images.
    """
    name = "n_dis"
    summary = "D updates per G update: 1, 2, 5, and D only every 2nd step"
    variants = {
        "baseline": {},
        "n_dis_2": {"train.n_dis": 2},
        "n_dis_5": {"train.n_dis": 5},
        "d_every_2": {"train.d_interval": 2},
    }
