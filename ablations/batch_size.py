from ablations.registry import Ablation, register_ablation


@register_ablation
class BatchSize(Ablation):
    """Batch size at equal images seen: larger batches give D and G less noisy gradients (BigGAN found them
    to help a lot) but fewer updates for the same compute. Every variant trains on the same train.kimg, so
    steps = images / batch differ. Learning rates follow optim.lr_scaling relative to optim.lr_ref_batch:
    `none` (default: same LRs for every batch), `sqrt` or `linear`; pick one with --set optim.lr_scaling=sqrt.
    Metrics are logged against images seen, so the curves line up. A variant at the preset's own batch size
    (batch_64 under `cpu`) is the baseline itself, and a study leaves it out; the others bracket it.
    """
    name = "batch_size"
    summary = "batch 32 / 64 / 256 against the preset's at equal images seen (LR rule: --set optim.lr_scaling)"
    variants = {
        "baseline": {},
        "batch_32": {"train.batch_size": 32},
        "batch_64": {"train.batch_size": 64},
        "batch_256": {"train.batch_size": 256},
    }
