from ablations.registry import Ablation, register_ablation


@register_ablation
class Combine(Ablation):
    """Every trick the campaign summary shows significantly better than its study's baseline, stacked into one
    variant, `stacked`, as the researchers combined BatchNorm, label smoothing and a slower G by hand: one
    variant per ablation (its best: significant within its study by Holm, not failing more often, the largest
    improvement), composed as --base layers are. A study whose baseline departs from the preset (the ema study's
    turns off the G_ema the cpu preset samples) is left out: nothing compared its variants with the preset's own
    setting. `python -m studies.run combine` builds it from the committed reports' runs.csv of the preset it
    runs on, refuses it with one line where two winners set the same key, and compares it with the baseline
    over the same seeds (the baseline's runs are reused from the campaign).
    Tricks that help alone may not add up: their effects can overlap or clash.
    """
    name = "combine"
    summary = "the campaign's winners stacked into one variant, against the baseline (built from reports/)"
    variants = {"baseline": {}}
    STACKED = "stacked"  # the variant studies.run adds, from the winners
