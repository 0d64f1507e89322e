"""The CycleGAN's networks: intensity curve, generator, PatchGAN discriminator, the four together.

Every normalisation is instance or group norm (or none): per-sample statistics, as DP-SGD's
per-sample clipping needs (no BatchNorm).
"""

from __future__ import annotations

import math

import torch
from monai.networks.nets import PatchDiscriminator, UNet
from torch import nn
from torch.optim.swa_utils import AveragedModel

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
        return self.combine(x, self.correction(x))

    def correction(self, x: torch.Tensor) -> torch.Tensor:
        """What the UNet adds to the curve's output (needs ``residual``)."""
        if self.head is None:
            raise ValueError("a generator without residual has no separate correction")
        return self.head(self.body(x))

    def combine(self, x: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:
        """``clamp0(curve(x) + correction)``: the output, given the UNet's correction.

        ``x`` may be on a finer grid than the one the correction was computed on (mapped to
        ``x``'s grid first): the curve is a per-voxel map and keeps every voxel's detail.
        """
        base = x if self.curve is None else self.curve(x)
        return (base + correction).clamp(min=0)


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


class ExponentialAverage:
    """``AveragedModel``'s ``multi_avg_fn``: ``average <- decay * average + (1 - decay) * new``.

    torch's ``get_ema_multi_avg_fn`` does the same with a closure, which cannot be pickled,
    and a DP site deep-copies the model by pickling it (Opacus' ``ModuleValidator.fix``).
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay

    @torch.no_grad()
    def __call__(self, averaged: list[torch.Tensor], current: list[torch.Tensor],
                 num_averaged: torch.Tensor) -> None:
        torch._foreach_lerp_(averaged, current, 1.0 - self.decay)


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
                g_site2ref, multi_avg_fn=ExponentialAverage(average_decay))
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


def norm_spec(name: str) -> tuple | None:
    """MONAI norm spec; instance and group norm keep per-sample statistics (Opacus)."""
    if name == "instance":
        return ("INSTANCE", {"affine": True})
    if name == "group":
        return ("GROUP", {"num_groups": 2})
    return None
