from ablations.registry import Ablation, register_ablation


@register_ablation
class LabelSmoothing(Ablation):
    """One-sided label smoothing: D's target for real images becomes 0.9 or 0.8 instead of 1, so D is
    penalised for overconfident real logits (Salimans et al. 2016). Fake targets stay 0: smoothing them
    would reward D for giving fakes a nonzero score in regions G has not reached, which Salimans et al.
    warn against; the `two_sided` variant tests that warning. Seed 002 used 0.1 smoothing (real 0.9).
    """
    name = "label_smoothing"
    summary = "D's real target 1.0 / 0.9 / 0.8 (fake stays 0), plus two-sided 0.9/0.1"
    variants = {
        "baseline": {},
        "real_0.9": {"train.real_label": 0.9},
        "real_0.8": {"train.real_label": 0.8},
        "two_sided": {"train.real_label": 0.9, "train.fake_label": 0.1},
    }
