"""Scanner harmonisation task: an unpaired CycleGAN from a site's domain to a public reference.

Each site trains two generators (site -> reference, reference -> site) and two PatchGAN
discriminators on random patches of its own scans and of a public reference-domain dataset
that every site holds. Only the generators are federated; each site keeps its
discriminators, which know its scanner (as in FedMed-GAN).

Pure PyTorch/MONAI (no Flower). One local step is two
:class:`~fedscan.shared.tasks.base.Phase` updates (generators, then discriminators), each on
its own batch. The package: :mod:`.networks`, :mod:`.losses`, :mod:`.data` (the unpaired
patches) and :mod:`.task` (the Task seam).
"""

from fedscan.shared.tasks.harmonisation.losses import (
    adversarial_loss,
    discriminator_loss,
    generator_loss,
    generator_terms,
    l1_loss,
)
from fedscan.shared.tasks.harmonisation.networks import (
    CURVE_GAIN,
    CycleGAN,
    Discriminator,
    Generator,
    IntensityCurve,
)
from fedscan.shared.tasks.harmonisation.task import HarmonisationTask

__all__ = ["CURVE_GAIN", "CycleGAN", "Discriminator", "Generator", "HarmonisationTask",
           "IntensityCurve", "adversarial_loss", "discriminator_loss", "generator_loss",
           "generator_terms", "l1_loss"]
