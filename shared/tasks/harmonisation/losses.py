"""The CycleGAN's losses, each per sample ``(B,)``: item i depends on the site's case i and on
public reference patches only, so a DP site can clip per sample."""

from __future__ import annotations

import torch
from monai.losses import PatchAdversarialLoss

from fedscan.shared.tasks.harmonisation.networks import CycleGAN

#: LSGAN: mean squared error of raw discriminator scores against 1 (real) or 0 (fake).
_LSGAN = PatchAdversarialLoss(reduction="none", criterion="least_squares",
                              no_activation_leastsq=True)


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def adversarial_loss(scores: torch.Tensor, real: bool) -> torch.Tensor:
    """LSGAN loss of discriminator scores ``(B, 1, *grid)`` against real (1) or fake (0).

    Returns:
        ``(B,)``, the mean over each sample's patch scores.
    """
    (per_element,) = _LSGAN(scores, target_is_real=real, for_discriminator=True)
    return _per_sample_mean(per_element)


def l1_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per sample, ``(B,)``."""
    return _per_sample_mean((a - b).abs())


def generator_terms(model: CycleGAN, batch: dict[str, torch.Tensor], *,
                    identity: bool = True) -> dict[str, torch.Tensor]:
    """The generators' loss terms, each per sample ``(B,)`` and unweighted.

    ``adversarial``: both translations scored as real by the (fixed) discriminators;
    ``cycle``: L1 of site -> ref -> site and ref -> site -> ref reconstructions;
    ``identity``: L1 of each generator applied to its own target domain (keeps a reference
    image unchanged, which anchors intensities and anatomy); left out (two generator passes
    saved) with ``identity=False``.
    """
    x, r = batch["image"], batch["reference"]
    fake_ref, fake_site = model.g_site2ref(x), model.g_ref2site(r)
    terms = {
        "adversarial": adversarial_loss(model.d_ref(fake_ref), True)
        + adversarial_loss(model.d_site(fake_site), True),
        "cycle": l1_loss(model.g_ref2site(fake_ref), x) + l1_loss(model.g_site2ref(fake_site), r),
    }
    if identity:
        terms["identity"] = l1_loss(model.g_site2ref(r), r) + l1_loss(model.g_ref2site(x), x)
    return terms


def generator_loss(model: CycleGAN, batch: dict[str, torch.Tensor], lambda_cycle: float,
                   lambda_identity: float) -> torch.Tensor:
    """``adversarial + lambda_cycle * cycle + lambda_identity * identity``, per sample."""
    t = generator_terms(model, batch, identity=lambda_identity > 0)
    loss = t["adversarial"] + lambda_cycle * t["cycle"]
    return loss + lambda_identity * t["identity"] if "identity" in t else loss


def discriminator_loss(model: CycleGAN, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """LSGAN loss of both discriminators on real patches vs detached translations, ``(B,)``.

    Halved per discriminator, as in CycleGAN, to slow them down relative to the generators.
    """
    x, r = batch["image"], batch["reference"]
    with torch.no_grad():  # fakes are inputs here: no generator gradients needed
        fake_ref, fake_site = model.g_site2ref(x), model.g_ref2site(r)
    d_ref = adversarial_loss(model.d_ref(r), True) + adversarial_loss(
        model.d_ref(fake_ref), False)
    d_site = adversarial_loss(model.d_site(x), True) + adversarial_loss(
        model.d_site(fake_site), False)
    return 0.5 * (d_ref + d_site)
