from ablations.registry import Ablation, register_ablation


@register_ablation
class Augment(Ablation):
    """Augmenting what D sees, so it overfits the training images later. x-flip mirrors each real image with
    probability 1/2, which keeps the distribution of faces (G may learn it, harmlessly). DiffAugment (Zhao et
    al. 2020, policy colour + translation + cutout) applies the same differentiable transforms to real and
    generated images before D, in the D and the G step, so G is never taught to make augmented-looking
    images and its gradient passes through the transforms; it matters most with little data (our CelebA subset).
    """
    name = "augment"
    summary = "what D sees: plain vs x-flipped reals vs DiffAugment on reals and fakes"
    variants = {
        "baseline": {},
        "xflip": {"train.augment": "xflip"},
        "diffaug": {"train.augment": "diffaug"},
    }
