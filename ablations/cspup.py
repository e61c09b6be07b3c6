from ablations.registry import Ablation, register_ablation


@register_ablation
class CSPupBlock(Ablation):
    """The CSPup block, in the researchers' two readings. Today's block (the baseline) leaves path A, a single
    ConvT, and the end of path B without normalisation, so the shortcut is a chain of linear layers from the 4x4
    map to the image and nothing rescales the sum A + B (the last notes suspected it of collapse at small
    widths). The researchers' other implementation closes both paths with BatchNorm: A = ConvT + BN; B = 3x3 conv
    + BN + ReLU, ConvT + BN, 3x3 conv + BN + ReLU, 3x3 conv + BN; out = A + B (`closed`). `sum_bn` keeps today's
    paths and puts BatchNorm + activation after the sum, the usual fix for a linear shortcut. The report's table
    of what was ablated gives G's and D's parameter counts per variant.
    """
    name = "cspup"
    summary = "the CSPup block: open paths (today) vs BatchNorm-closed paths vs BatchNorm + act after the sum"
    variants = {
        "baseline": {},
        "closed": {"model.g_block": "closed"},
        "sum_bn": {"model.g_block": "sum_bn"},
    }
