from ablations.registry import Ablation, register_ablation


@register_ablation
class WeightDecay(Ablation):
    """An L2 penalty on G and D parameters, meant to keep D from growing large weights and overconfident
    logits (a common source of vanishing G gradients). Two mechanisms: `l2_*` adds wd * w to the gradient
    inside Adam (coupled, so Adam's per-parameter scaling weakens it where gradients are large); `adamw_*`
    shrinks the weights directly by lr * wd per step (decoupled, Loshchilov & Hutter 2019), which is why its
    coefficient is larger. The seeds used coupled decay by hand.
    """
    name = "weight_decay"
    summary = "L2 on G and D: coupled Adam L2 (1e-5, 1e-3) vs decoupled AdamW (1e-2)"
    variants = {
        "baseline": {},
        "l2_1e-5": {"optim.weight_decay": 1e-5, "optim.weight_decay_mode": "l2"},
        "l2_1e-3": {"optim.weight_decay": 1e-3, "optim.weight_decay_mode": "l2"},
        "adamw_1e-2": {"optim.weight_decay": 1e-2, "optim.weight_decay_mode": "decoupled"},
    }
