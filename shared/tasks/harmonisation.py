"""Scanner harmonisation task: an unpaired CycleGAN from a site's domain to a public reference.

Each site trains two generators (site -> reference, reference -> site) and two PatchGAN
discriminators on random patches of its own scans and of a public reference-domain dataset
that every site holds. Only the generators are federated; each site keeps its
discriminators, which know its scanner (as in FedMed-GAN).

Pure PyTorch/MONAI (no Flower). Every loss is per sample: item i of a batch depends on the
site's case i and on public reference patches only, so a DP site can clip per sample. One
local step is two :class:`~fedscan.shared.tasks.base.Phase` updates (generators, then
discriminators), each on its own batch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict

import numpy as np
import torch
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator, UNet
from monai.transforms import (
    Compose,
    EnsureTyped,
    RandFlipd,
    Randomizable,
    RandSpatialCropd,
    SpatialPadd,
    SqueezeDimd,
)
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset

from fedscan.shared.config import Config, DataConfig
from fedscan.shared.data import read_dataset
from fedscan.shared.errors import ConfigError, DataError, FedscanError, root_cause
from fedscan.shared.harmonisation_io import psnr, ssim, translate
from fedscan.shared.inference import load_nifti, preprocess_image
from fedscan.shared.preprocessing import preprocess_transforms
from fedscan.shared.tasks.base import (
    Case,
    EvalResult,
    MetricSpec,
    Phase,
    StepCallback,
    TrainResult,
    proximal_hook,
    shared_params,
)

# The volume cache and loop helpers are segmentation's: one cache budget per process, and
# the same handling of empty Poisson batches for every task.
from fedscan.shared.tasks.common import (
    VOLUME_CACHE,
    batch_size,
    case_loader,
    cycle,
    empty_step,
    file_key,
)
from fedscan.shared.tasks.segmentation import case_id

GENERATORS = ("g_site2ref", "g_ref2site")
#: Parts of a generator that stay at the site (see HarmonisationTask.shared_keys).
SITE_PARTS = ("curve", "head")
DISCRIMINATORS = ("d_site", "d_ref")


class IntensityCurve(nn.Module):
    """A learnt monotone intensity curve, the identity at initialisation.

    Piecewise linear over ``knots`` equal segments of [0, 1] (the preprocessed scale), with
    a non-negative slope per segment (softplus) and an offset; values above 1 continue the
    last segment, values below 0 (never produced by the preprocessing) map to the offset.
    A scanner's contrast curve (gamma) and its noise floor are functions of a voxel's own
    intensity, which a UNet with normalisation layers does not see, and a monotone map keeps
    tissue order, so it cannot swap grey and white matter.

    The slopes are stored divided by :data:`CURVE_GAIN` so that Adam, whose steps are about
    ``lr`` per parameter whatever the gradient's scale, moves them ``CURVE_GAIN`` times
    faster than the UNet's weights: a contrast curve is a few numbers that must travel far.

    Args:
        knots: number of linear segments.
    """

    def __init__(self, knots: int) -> None:
        super().__init__()
        self.knots = knots
        # softplus(log(e - 1)) = 1: slope one everywhere, the identity.
        self.slopes = nn.Parameter(torch.full((knots,), math.log(math.e - 1) / CURVE_GAIN))
        self.offset = nn.Parameter(torch.zeros(1))
        self.register_buffer("starts", torch.arange(knots, dtype=torch.float32) / knots)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slopes = nn.functional.softplus(self.slopes * CURVE_GAIN)
        width = 1.0 / self.knots
        below = (x.unsqueeze(-1) - self.starts).clamp(min=0)
        # Every segment but the last is at most one width long; the last one extends past 1.
        run = torch.cat([below[..., :-1].clamp(max=width), below[..., -1:]], dim=-1)
        return self.offset * CURVE_GAIN + (run * slopes).sum(-1)


#: How much faster than the network weights the intensity curve learns (see IntensityCurve).
#: At 10 the UNet correction, learning as fast, took over and the curves stayed nearly
#: straight; at 50 site-c's curve (strongest noise) was still moving after 300 steps
#: (docs/harmonisation.md, "What we measured on the way").
CURVE_GAIN = 100.0


class Generator(nn.Module):
    """An image-to-image generator: a site's intensity curve plus a MONAI UNet correction.

    With ``residual`` the output is ``curve(x) + head(unet(x))``: the :class:`IntensityCurve`
    maps each voxel's intensity (a scanner's contrast and noise floor) and the UNet, through
    a zero-initialised 1x1 convolution, adds what needs context (bias field, noise). Both
    start as the identity: harmonisation is a change of contrast, bias and noise, not a new
    image. Without ``residual`` the UNet maps the image directly. Outputs are magnitude
    images, so negative values are cut to 0, which is also the reference's background.

    Args:
        spatial_dims: 2 or 3.
        channels_in: image channels.
        channels: UNet channels per level.
        strides: UNet strides between levels.
        num_res_units: residual units per UNet block.
        norm: MONAI norm spec, or None (no BatchNorm: Opacus needs per-sample statistics).
        residual: curve plus a (zero-initialised) correction of the UNet.
        curve_knots: segments of the intensity curve; 0 for none (needs ``residual``).
    """

    def __init__(self, spatial_dims: int, channels_in: int, channels: list[int],
                 strides: list[int], num_res_units: int, norm: tuple | None, residual: bool,
                 curve_knots: int = 0) -> None:
        super().__init__()
        self.residual = residual
        width = channels[0] if residual else channels_in
        self.body = UNet(spatial_dims=spatial_dims, in_channels=channels_in, out_channels=width,
                         channels=channels, strides=strides, num_res_units=num_res_units,
                         norm=norm)
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.head = conv(width, channels_in, kernel_size=1) if residual else None
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.curve = IntensityCurve(curve_knots) if residual and curve_knots else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            return self.body(x)
        base = x if self.curve is None else self.curve(x)
        return (base + self.head(self.body(x))).clamp(min=0)


class Discriminator(nn.Module):
    """MONAI's PatchDiscriminator returning only its final patch scores ``(B, 1, *grid)``."""

    def __init__(self, spatial_dims: int, channels_in: int, channels: int, num_layers: int,
                 norm: tuple) -> None:
        super().__init__()
        # bias=True: the default (False) assumes batch norm's shift follows every conv.
        self.net = PatchDiscriminator(spatial_dims=spatial_dims, channels=channels,
                                      in_channels=channels_in, num_layers_d=num_layers,
                                      norm=norm, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[-1]


class CycleGAN(nn.Module):
    """The four networks of a CycleGAN; the forward pass is :meth:`harmoniser`.

    Attributes:
        g_site2ref: site domain to reference domain (what harmonisation applies).
        g_ref2site: reference domain to site domain.
        d_site: scores site-domain patches (real site vs translated reference).
        d_ref: scores reference-domain patches (real reference vs translated site).
        g_site2ref_avg: exponential moving average of ``g_site2ref``'s weights over the
            site's local steps (torch's ``AveragedModel``), or None. A GAN's generator
            oscillates from step to step as its discriminator moves; the average does not,
            and is what a site harmonises with. It never trains and never leaves the site.
    """

    def __init__(self, g_site2ref: Generator, g_ref2site: Generator, d_site: Discriminator,
                 d_ref: Discriminator, average_decay: float = 0.0) -> None:
        super().__init__()
        self.g_site2ref = g_site2ref
        self.g_ref2site = g_ref2site
        self.d_site = d_site
        self.d_ref = d_ref
        self.g_site2ref_avg = None
        if average_decay > 0:
            self.g_site2ref_avg = AveragedModel(
                g_site2ref, multi_avg_fn=get_ema_multi_avg_fn(average_decay))
            self.g_site2ref_avg.requires_grad_(False)

    def update_average(self) -> None:
        """Fold the current ``g_site2ref`` into the average (after a generator update)."""
        if self.g_site2ref_avg is not None:
            self.g_site2ref_avg.update_parameters(self.g_site2ref)

    def harmoniser(self) -> nn.Module:
        """The site-to-reference generator to apply: the average once it has been updated
        (a site's own model), else ``g_site2ref`` (e.g. the global model, or no average)."""
        avg = self.g_site2ref_avg
        return avg.module if avg is not None and int(avg.n_averaged) > 0 else self.g_site2ref

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.harmoniser()(x)


# -- losses ---------------------------------------------------------------------------------

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


def _unwrap(model: nn.Module) -> CycleGAN:
    """The CycleGAN inside an Opacus ``GradSampleModule`` (or the model itself)."""
    return getattr(model, "_module", model)


def generator_terms(model: nn.Module, batch: dict[str, torch.Tensor], *,
                    identity: bool = True) -> dict[str, torch.Tensor]:
    """The generators' loss terms, each per sample ``(B,)`` and unweighted.

    ``adversarial``: both translations scored as real by the (fixed) discriminators;
    ``cycle``: L1 of site -> ref -> site and ref -> site -> ref reconstructions;
    ``identity``: L1 of each generator applied to its own target domain (keeps a reference
    image unchanged, which anchors intensities and anatomy); left out (two generator passes
    saved) with ``identity=False``.
    """
    m = _unwrap(model)
    x, r = batch["image"], batch["reference"]
    fake_ref, fake_site = m.g_site2ref(x), m.g_ref2site(r)
    terms = {
        "adversarial": adversarial_loss(m.d_ref(fake_ref), True)
        + adversarial_loss(m.d_site(fake_site), True),
        "cycle": l1_loss(m.g_ref2site(fake_ref), x) + l1_loss(m.g_site2ref(fake_site), r),
    }
    if identity:
        terms["identity"] = l1_loss(m.g_site2ref(r), r) + l1_loss(m.g_ref2site(x), x)
    return terms


def generator_loss(model: nn.Module, batch: dict[str, torch.Tensor], lambda_cycle: float,
                   lambda_identity: float) -> torch.Tensor:
    """``adversarial + lambda_cycle * cycle + lambda_identity * identity``, per sample."""
    t = generator_terms(model, batch, identity=lambda_identity > 0)
    loss = t["adversarial"] + lambda_cycle * t["cycle"]
    return loss + lambda_identity * t["identity"] if "identity" in t else loss


def discriminator_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """LSGAN loss of both discriminators on real patches vs detached translations, ``(B,)``.

    Halved per discriminator, as in CycleGAN, to slow them down relative to the generators.
    """
    m = _unwrap(model)
    x, r = batch["image"], batch["reference"]
    with torch.no_grad():  # fakes are inputs here: no generator gradients needed
        fake_ref, fake_site = m.g_site2ref(x), m.g_ref2site(r)
    d_ref = adversarial_loss(m.d_ref(r), True) + adversarial_loss(m.d_ref(fake_ref), False)
    d_site = adversarial_loss(m.d_site(x), True) + adversarial_loss(m.d_site(fake_site), False)
    return 0.5 * (d_ref + d_site)


# -- the task -------------------------------------------------------------------------------


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
        MetricSpec("cycle_psnr", higher_is_better=True, low=0.0, headline=True, unit="dB"),
        MetricSpec("cycle_ssim", higher_is_better=True, low=-1.0, high=1.0),
        MetricSpec("change", higher_is_better=False, low=0.0),
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
            return Generator(dims, c, h.channels, h.strides, h.num_res_units, _norm(h.norm),
                             h.residual, h.curve_knots)

        def discriminator() -> Discriminator:
            return Discriminator(dims, c, h.disc_channels, h.disc_layers, _norm(h.disc_norm))

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
        return [k for k in _unwrap(model).state_dict()
                if k.split(".", 1)[0] in GENERATORS and k.split(".")[1] not in SITE_PARTS]

    def phases(self, model: nn.Module) -> list[Phase]:
        """Generators (adversarial + cycle + identity), then discriminators (real vs fake)."""
        m = _unwrap(model)
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

    def patch_transforms(self) -> Compose:
        """Random patch (padded if the volume is smaller) and a left-right flip.

        No intensity augmentation: intensities are exactly what the generators must learn to
        map, so a random contrast change would teach them the wrong domain.
        """
        cfg = self.cfg
        patch = cfg.train.patch_size
        lr_axis = next(i for i, c in enumerate(cfg.data.orientation.upper()) if c in "LR")
        steps = [
            SpatialPadd("image", spatial_size=patch),
            RandSpatialCropd("image", roi_size=patch, random_size=False),
            RandFlipd("image", prob=0.5, spatial_axis=lr_axis),
        ]
        if cfg.model.spatial_dims == 2:
            steps.append(SqueezeDimd("image", dim=-1))  # (C, X, Y, 1) -> (C, X, Y)
        steps.append(EnsureTyped("image", track_meta=False))
        return Compose(steps)

    def reference_cases(self) -> list[Case]:
        """Every case of the public reference dataset (``harmonisation.reference``).

        Raises:
            ConfigError: no reference folder is configured.
            DataError: the folder violates the data contract.
        """
        ref = self.cfg.harmonisation.reference
        if ref is None:
            raise ConfigError("config key 'harmonisation.reference': required to train (a "
                              "public reference-domain dataset folder, MSD layout)")
        data = self.cfg.data
        site = read_dataset(ref, name="reference", in_channels=data.in_channels, check=False)
        return site.cases

    def make_train_loader(self, cases: list[Case], seed: int) -> DataLoader:
        """Map-style loader: one item per site case, with a random reference patch.

        Item i is ``{"image": random patch of case i, "reference": random patch of a random
        reference case}``, so Poisson sampling over the site's cases is sampling over
        patients. Preprocessed volumes (site and reference) are cached per process. Batches
        are ``{"image": (B, C, *patch), "reference": (B, C, *patch)}``.

        Raises:
            DataError: a case is missing, unreadable or has the wrong channel count.
            ConfigError: no reference dataset is configured.
        """
        if not cases:
            raise DataError("no training cases")
        data = self.cfg.data
        reference_cases = self.reference_cases()  # a missing reference fails before any load
        site = [_cached_image(c["image"], data) for c in cases]
        reference = [_cached_image(c["image"], data) for c in reference_cases]
        dataset = UnpairedPatchDataset(site, reference, self.patch_transforms())
        dataset.set_random_state(seed=seed % 2**32)
        return case_loader(dataset, self.cfg.train, seed)

    def train_steps(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader,
        steps: int,
        *,
        proximal_mu: float = 0.0,
        on_step: StepCallback | None = None,
    ) -> TrainResult:
        """Run ``steps`` local steps; each updates the generators, then the discriminators.

        Each phase draws its own batch and takes one ``optimizer`` step with gradients of
        its loss for its own parameters only (Adam skips parameters without a gradient, so
        one optimiser serves both). FedProx's ``mu * (w - w0)`` is added to the shared
        weights' gradients only (the generators' UNets): they are what the server averages;
        the curves and discriminators never leave. After each generator update the site's
        moving average of ``g_site2ref`` (:meth:`CycleGAN.update_average`) takes it in.
        An empty batch (Poisson sampling) takes the DP optimiser's noise-only step.

        Returns:
            Mean generator loss over non-empty batches, ``len(loader.dataset)``, ``steps``.
        """
        m = _unwrap(model)
        device = next(m.parameters()).device
        phases = self.phases(model)
        hook = (proximal_hook(optimizer, proximal_mu, shared_params(self, model))
                if proximal_mu > 0 else None)
        model.train()
        losses: list[float] = []
        batches = cycle(loader)
        try:
            for step in range(1, steps + 1):
                for phase in phases:
                    batch = next(batches)
                    optimizer.zero_grad(set_to_none=True)
                    if batch_size(batch) == 0:
                        empty_step(optimizer)
                    else:
                        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                        loss = phase.loss(model, batch).mean()
                        grads = torch.autograd.grad(loss, phase.params)
                        for p, g in zip(phase.params, grads, strict=True):
                            p.grad = g
                        optimizer.step()
                        if phase.name == "generators":
                            losses.append(loss.item())
                    if phase.after_update is not None:
                        phase.after_update()
                if on_step is not None:
                    on_step(step, steps, float(np.mean(losses)) if losses else float("nan"))
        finally:
            optimizer.zero_grad(set_to_none=True)
            if hook is not None:
                hook.remove()
        mean = float(np.mean(losses)) if losses else float("nan")
        return TrainResult(loss=mean, num_examples=len(loader.dataset), steps=steps)

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
        m = _unwrap(model)
        device = next(m.parameters()).device
        was_training = m.training
        m.eval()
        per_case: dict[str, dict[str, float]] = {}
        try:
            for case in cases:
                try:
                    image, _ = preprocess_image(case["image"], self.cfg)
                except FedscanError as exc:
                    raise DataError(str(exc)) from None
                x = image.as_tensor().float()
                fake = translate(m.harmoniser(), x, self.cfg, device)
                rec = translate(m.g_ref2site, fake, self.cfg, device)
                per_case[case_id(case)] = _cycle_metrics(x, rec, fake, self.cfg)
        finally:
            m.train(was_training)
        metrics = {k: float(np.mean([c[k] for c in per_case.values()]))
                   for k in ("cycle_psnr", "cycle_ssim", "change")}
        return EvalResult(metrics=metrics, num_examples=len(cases), per_case=per_case)


def _cycle_metrics(x: torch.Tensor, rec: torch.Tensor, fake: torch.Tensor,
                   cfg: Config) -> dict[str, float]:
    """Cycle PSNR/SSIM (first channel, clipped to [0, 1]) and mean change of one case."""
    a = x[0].clamp(0, 1).numpy()
    b = rec[0].clamp(0, 1).numpy()
    if cfg.model.spatial_dims == 2 or min(a.shape) < 11:
        # SSIM's 11-voxel window: thin volumes (2D runs on few slices) are scored per slice.
        s = float(np.mean([ssim(a[..., k], b[..., k]) for k in range(a.shape[-1])]))
    else:
        s = ssim(a, b)
    return {"cycle_psnr": psnr(b, a), "cycle_ssim": s,
            "change": float((fake - x).abs().mean())}


def _norm(name: str) -> tuple | None:
    """MONAI norm spec; instance and group norm keep per-sample statistics (Opacus)."""
    if name == "instance":
        return ("INSTANCE", {"affine": True})
    if name == "group":
        return ("GROUP", {"num_groups": 2})
    return None


# -- training data ---------------------------------------------------------------------------


class UnpairedPatchDataset(Randomizable, Dataset):
    """One item per site case: a random patch of it and of a random reference volume.

    Randomizable, so MONAI's ``worker_init_fn`` re-seeds the reference picks and the patch
    transform in each worker.

    Args:
        site: preprocessed site images ``(C, *spatial)``, one per case (private).
        reference: preprocessed reference images (public).
        transform: random patch sampling (:meth:`HarmonisationTask.patch_transforms`).
    """

    def __init__(self, site: list[torch.Tensor], reference: list[torch.Tensor],
                 transform: Compose) -> None:
        if not reference:
            raise DataError("the reference dataset has no cases")
        self.site = site
        self.reference = reference
        self.transform = transform

    def set_random_state(self, seed: int | None = None,
                         state: np.random.RandomState | None = None) -> UnpairedPatchDataset:
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed=int(self.R.randint(2**31)))
        return self

    def randomize(self, data: object = None) -> None:
        self._ref = int(self.R.randint(len(self.reference)))

    def __len__(self) -> int:
        return len(self.site)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.randomize()
        # Copies (clone), so no transform can ever write into the shared cache.
        image = self.transform({"image": self.site[index].clone()})["image"]
        reference = self.transform({"image": self.reference[self._ref].clone()})["image"]
        return {"image": image, "reference": reference}


def _cached_image(path: str, data: DataConfig) -> torch.Tensor:
    """A preprocessed ``(C, *spatial)`` image, from the process-wide cache if there.

    Raises:
        DataError: missing, unreadable, unpreprocessable or wrong channel count.
    """
    key = ("harmonisation-image", file_key(path, "image"),
           json.dumps(asdict(data), sort_keys=True))
    hit = VOLUME_CACHE.get(key)
    if hit is not None:
        return hit["image"]
    try:
        load_nifti(path)  # header check: a one-line error naming the file
        image = preprocess_transforms(data, ("image",))({"image": path})["image"].as_tensor()
    except FedscanError as exc:
        raise DataError(str(exc)) from None
    except Exception as exc:  # MONAI wraps reader errors in RuntimeError chains
        root = root_cause(exc)
        raise DataError(f"{path}: could not be read or preprocessed ({type(root).__name__})") \
            from None
    if image.shape[0] != data.in_channels:
        raise DataError(f"{path}: has {image.shape[0]} channel(s), data.in_channels is "
                        f"{data.in_channels}")
    VOLUME_CACHE.put(key, {"image": image.contiguous()})
    return image.contiguous()
