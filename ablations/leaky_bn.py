from ablations.registry import Ablation, register_ablation


@register_ablation
class LeakyBN(Ablation):
    """LeakyReLU(0.2) instead of ReLU in G (stem and CSPup blocks) and D, with BatchNorm after the conv
    (DCGAN's placement), after the activation, or not at all. LeakyReLU keeps gradients flowing through
    negative pre-activations, which DCGAN found important in D; where BatchNorm sits changes what it
    normalises (pre- vs post-nonlinearity statistics), and removing it tests whether it stabilises training
    or only couples samples within a batch. Seeds 000, 002 and 004 tried these combinations.
    """
    name = "leaky_bn"
    summary = "LeakyReLU(0.2) in G and D, with BatchNorm after conv / after activation / none"
    variants = {
        "baseline": {},
        "leaky": {"model.g_act": "leaky", "model.d_act": "leaky"},
        "leaky_bn_after_act": {"model.g_act": "leaky", "model.d_act": "leaky",
                               "model.g_norm": "after_act", "model.d_norm": "after_act"},
        "leaky_no_bn": {"model.g_act": "leaky", "model.d_act": "leaky", "model.g_norm": "none", "model.d_norm": "none"},
    }
