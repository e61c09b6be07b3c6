from ablations.registry import Ablation, register_ablation


@register_ablation
class SpectralNorm(Ablation):
    """Spectral normalisation of D (Miyato et al. 2018): every conv weight is divided by its largest singular
    value, estimated by one power iteration per forward, so each layer is 1-Lipschitz and D cannot sharpen its
    decision boundary without bound; its gradients to G stay informative instead of saturating. In compare_gan
    (Kurach et al. 2019) SN took an SNDCGAN on CelebA-HQ 128 from FID 61.15 to 28.21. SNGAN's D has no
    BatchNorm, whose per-batch rescaling undoes part of the constraint, so the second variant also removes it.
    """
    name = "spectral_norm"
    summary = "SN on every D conv, with D's BatchNorm kept or removed"
    variants = {
        "baseline": {},
        "sn": {"model.d_spectral_norm": True},
        "sn_no_bn": {"model.d_spectral_norm": True, "model.d_sn_keep_bn": False},
    }
