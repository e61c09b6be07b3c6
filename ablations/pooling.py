from ablations.registry import Ablation, register_ablation


@register_ablation
class Pooling(Ablation):
    """How D halves its resolution: a learned 4x4 stride-2 conv (DCGAN, the baseline), or a 3x3 stride-1 conv
    followed by fixed 2x2 MaxPool or AvgPool. Radford et al. (2015) replaced pooling with strided convs so the
    network learns its own downsampling; max pooling makes D's gradients sparse (only one input of four
    receives gradient), which starves G of signal, while average pooling is a smooth low-pass filter that
    may help against high-frequency artefacts. The seeds tried pooling discriminators by hand.
    """
    name = "pooling"
    summary = "D downsampling: strided conv vs conv + MaxPool vs conv + AvgPool"
    variants = {
        "baseline": {},
        "maxpool": {"model.d_downsample": "maxpool"},
        "avgpool": {"model.d_downsample": "avgpool"},
    }
