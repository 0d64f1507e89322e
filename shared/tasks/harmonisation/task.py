"""Scanner harmonisation behind the Task seam: what is shared, the phases, the evaluation."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedscan.shared.config import Config
from fedscan.shared.data import case_id
from fedscan.shared.errors import ConfigError
from fedscan.shared.inference import preprocess_image, sliding_window
from fedscan.shared.metrics import cycle_metrics
from fedscan.shared.tasks.base import Case, EvalResult, MetricSpec, Phase, evaluating
from fedscan.shared.tasks.harmonisation.data import unpaired_loader
from fedscan.shared.tasks.harmonisation.losses import discriminator_loss, generator_loss
from fedscan.shared.tasks.harmonisation.networks import (
    DISCRIMINATORS,
    GENERATORS,
    SITE_PARTS,
    CycleGAN,
    Discriminator,
    Generator,
    norm_spec,
)


class HarmonisationTask:
    """CycleGAN harmonisation behind the :class:`~fedscan.shared.tasks.base.Task` seam.

    Args:
        cfg: the run's config (``data``, ``model.spatial_dims``/``norm``, ``train`` patch,
            batch and steps, ``harmonisation`` keys).

    Raises:
        ConfigError: inconsistent harmonisation keys, naming the key.
    """

    name = "harmonisation"
    #: Cycle consistency on the site's own scans (no paired truth needed): data range 1.
    metrics = (
        MetricSpec("cycle_psnr", higher_is_better=True, low=0.0, headline=True, unit="dB",
                   description="PSNR of a scan mapped to the reference domain and back, "
                   "against the scan"),
        MetricSpec("cycle_ssim", higher_is_better=True, low=-1.0, high=1.0,
                   description="SSIM of the same reconstruction (1 is identical)"),
        MetricSpec("change", higher_is_better=False, low=0.0,
                   description="mean absolute intensity change harmonisation makes "
                   "(0: none; a good model changes what differs between scanners only)"),
    )

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        h, dims, patch = cfg.harmonisation, cfg.model.spatial_dims, cfg.train.patch_size

        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"config key 'harmonisation.{key}': {why}")

        if len(h.channels) < 2 or any(c < 1 for c in h.channels):
            raise bad("channels", "needs at least two positive channel counts")
        if len(h.strides) != len(h.channels) - 1 or any(s < 1 for s in h.strides):
            raise bad("strides", "needs one positive entry fewer than harmonisation.channels")
        factor = math.prod(h.strides)
        if any(p % factor for p in patch[:dims]):
            raise ConfigError(f"config key 'train.patch_size': the first {dims} entries must be "
                              f"multiples of {factor} (the product of harmonisation.strides)")
        if h.num_res_units < 0 or h.curve_knots < 0:
            raise bad("curve_knots", "num_res_units and curve_knots must be >= 0")
        if h.disc_layers < 1 or h.disc_channels < 1:
            raise bad("disc_layers", "disc_layers and disc_channels must be >= 1")
        # Each stride-2 conv (kernel 4, padding 1) halves the patch, the last two lose a voxel.
        side = min(patch[:dims]) // 2**h.disc_layers - 2
        if side < 2:
            raise bad("disc_layers", f"too many layers for train.patch_size {patch[:dims]}: "
                      "the discriminator's score grid would be empty")
        if not (h.lr > 0 and math.isfinite(h.lr)):
            raise bad("lr", "must be a positive number")
        if not 0 <= h.average_decay < 1:
            raise bad("average_decay", "must be in [0, 1)")
        if h.lambda_cycle < 0 or h.lambda_identity < 0:
            raise bad("lambda_cycle", "lambda_cycle and lambda_identity must be >= 0")
        if h.norm == "group" and any(c % 2 for c in h.channels):
            raise bad("channels", "group norm (2 groups) needs even channel counts")
        if h.disc_norm == "group" and h.disc_channels % 2:
            raise bad("disc_channels", "group norm (2 groups) needs an even channel count")

    # -- model and optimiser -----------------------------------------------------------------

    def build_model(self) -> CycleGAN:
        """Two generators and two discriminators; initial weights depend only on ``cfg.seed``."""
        cfg, h = self.cfg, self.cfg.harmonisation
        dims, c = cfg.model.spatial_dims, cfg.data.in_channels

        def generator() -> Generator:
            return Generator(dims, c, h.channels, h.strides, h.num_res_units, norm_spec(h.norm),
                             h.residual, h.curve_knots)

        def discriminator() -> Discriminator:
            return Discriminator(dims, c, h.disc_channels, h.disc_layers, norm_spec(h.disc_norm))

        with torch.random.fork_rng(devices=[]):  # seed the init without touching global RNG
            torch.manual_seed(cfg.seed)
            return CycleGAN(generator(), generator(), discriminator(), discriminator(),
                            h.average_decay)

    def make_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """Adam at ``harmonisation.lr`` with CycleGAN's betas (0.5, 0.999)."""
        return torch.optim.Adam(params, lr=self.cfg.harmonisation.lr, betas=(0.5, 0.999))

    def shared_keys(self, model: nn.Module) -> list[str]:
        """The generators' UNet bodies; everything else stays at the site.

        A generator's curve and output head (:data:`SITE_PARTS`) describe one scanner: the
        curve its contrast, the head how the shared UNet features correct its bias and
        noise. Each site needs its own, as FedBN keeps normalisation layers local (FedRep's
        split: a shared representation, a head per client). A discriminator knows what that
        scanner's images look like.
        """
        return [k for k in model.state_dict()
                if k.split(".", 1)[0] in GENERATORS and k.split(".")[1] not in SITE_PARTS]

    def phases(self, model: nn.Module) -> list[Phase]:
        """Generators (adversarial + cycle + identity), then discriminators (real vs fake)."""
        m: CycleGAN = model
        h = self.cfg.harmonisation

        def g_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return generator_loss(model, batch, h.lambda_cycle, h.lambda_identity)

        return [
            Phase("generators", [p for n in GENERATORS for p in getattr(m, n).parameters()],
                  g_loss, after_update=m.update_average),
            Phase("discriminators",
                  [p for n in DISCRIMINATORS for p in getattr(m, n).parameters()],
                  discriminator_loss),
        ]

    # -- training ------------------------------------------------------------------------------

    def make_train_loader(self, cases: list[Case], seed: int) -> DataLoader:
        """Items ``{"image": random patch of case i, "reference": random reference patch}``
        (:func:`~fedscan.shared.tasks.harmonisation.data.unpaired_loader`)."""
        return unpaired_loader(self.cfg, cases, seed)

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, cases: list[Case]) -> EvalResult:
        """Cycle consistency on a site's cases, which needs no paired ground truth.

        Each preprocessed image ``x`` goes site -> reference -> site through whole-volume
        sliding windows; ``cycle_psnr`` and ``cycle_ssim`` compare the reconstruction with
        ``x`` (data range 1, the preprocessed scale), and ``change`` is the mean absolute
        difference between ``x`` and its harmonised version (0 means the generator does
        nothing). Only means over cases leave the site.

        Returns:
            Mean ``cycle_psnr``, ``cycle_ssim`` and ``change``, ``len(cases)``, per case.
        """
        if not cases:
            return EvalResult(metrics={}, num_examples=0, per_case={})
        m: CycleGAN = model
        device = next(m.parameters()).device
        per_case: dict[str, dict[str, float]] = {}
        with evaluating(m):
            for case in cases:
                image, _ = preprocess_image(case["image"], self.cfg)
                x = image.as_tensor().float()
                fake = sliding_window(m.harmoniser(), x, self.cfg, device)
                rec = sliding_window(m.g_ref2site, fake, self.cfg, device)
                per_case[case_id(case)] = cycle_metrics(
                    x, rec, fake, per_slice=self.cfg.model.spatial_dims == 2)
        metrics = {s.name: float(np.mean([c[s.name] for c in per_case.values()]))
                   for s in self.metrics}
        return EvalResult(metrics=metrics, num_examples=len(cases), per_case=per_case)
