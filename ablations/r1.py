from ablations.registry import Ablation, register_ablation


@register_ablation
class R1(Ablation):
    """The R1 gradient penalty on real images (Mescheder et al. 2018), gamma/2 E||grad_x D(x)||^2, which makes
    the game locally convergent: D cannot grow steep around the data, so it stops oscillating around it. Lazy,
    as in StyleGAN2 (Karras et al. 2020): one extra D step with the penalty every train.r1_interval = 16 D
    steps, multiplied by 16, with D's Adam lr and betas scaled by 16/17. gamma 10 is StyleGAN2's FFHQ and
    Mescheder's value; 0.1 is about what stylegan2-ada's auto config picks for 128x128 (0.0002 * res^2 / batch).
    """
    name = "r1"
    summary = "R1 penalty on real images, gamma 0.1 / 10, lazy every 16 D steps"
    variants = {
        "baseline": {},
        "r1_0.1": {"train.r1_gamma": 0.1},
        "r1_10": {"train.r1_gamma": 10.0},
    }
