"""The MR scanner model shared by the structured phantoms (:mod:`anatomy`) and the
real-anatomy federation (:mod:`realanatomy`).

An anatomy generator gives, per native voxel of a scanner's grid, the *fraction* of each tissue
in it (partial volume: a fine sub-grid of ~1 mm is integrated into each voxel). This module
turns fractions into what the scanner stores: per-tissue contrast (one table per image
channel), a contrast curve (``gamma``), a smooth coil bias field, a point-spread function,
Rician noise (everywhere, air included) and the stored dtype and scaling.

:class:`ScannerProfile` (grid, gamma, bias, noise and storage; what the default phantom sites
use) is defined here with the grid it acquires and its storage; :class:`MRProfile` extends it
with the PSF and the tissue contrasts, so either kind of profile works here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from nibabel.orientations import axcodes2ornt
from scipy.ndimage import gaussian_filter

# T1-like tissue intensities before scanner effects (air is 0).
SCALP = 0.9
SKULL = 0.08
CSF = 0.2
GM = 0.5
WM = 0.75
DEEP_GM = 0.6
#: Face and neck soft tissue below the skull base (muscle-like, darker than brain).
SOFT = 0.38

_DTYPES = ("float32", "int16", "uint16")


@dataclass(frozen=True)
class ScannerProfile:
    """How one hospital's scanner images a head.

    Attributes:
        name: profile name (the site it stands for).
        orientation: voxel axis codes, e.g. ``"RAS"``, ``"LPS"``, ``"PIL"``.
        spacing: mm per voxel axis, in voxel-axis order.
        fov_mm: field of view along world x, y, z (mm); the grid is centred at the origin.
        gamma: contrast, applied as ``intensity ** gamma``.
        bias_strength: multiplicative bias field spans about ``exp(+-bias_strength)``.
        noise_std: std of the complex Gaussian noise whose magnitude gives Rician noise.
        scale: stored intensity is ``value * scale + offset``.
        offset: see ``scale``.
        dtype: stored dtype, one of ``float32``, ``int16``, ``uint16``.
    """

    name: str
    orientation: str
    spacing: tuple[float, float, float]
    fov_mm: tuple[float, float, float] = (192.0, 224.0, 208.0)
    gamma: float = 1.0
    bias_strength: float = 0.0
    noise_std: float = 0.0
    scale: float = 1.0
    offset: float = 0.0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        try:
            axes = sorted(int(a) for a in axcodes2ornt(tuple(self.orientation))[:, 0])
        except (ValueError, IndexError):  # unknown codes, or none at all
            axes = []
        # nibabel accepts "RRS" (two codes on one axis), so check for a permutation here.
        if axes != [0, 1, 2]:
            raise ValueError(f"profile {self.name!r}: orientation {self.orientation!r} is not "
                             "three axis codes naming x, y and z once each, such as RAS")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"profile {self.name!r}: spacing must be three positive numbers")
        if len(self.fov_mm) != 3 or min(self.fov_mm) <= 0:
            raise ValueError(f"profile {self.name!r}: fov_mm must be three positive numbers")
        if self.gamma <= 0 or self.bias_strength < 0 or self.noise_std < 0:
            raise ValueError(f"profile {self.name!r}: gamma must be > 0, bias and noise >= 0")
        if self.dtype not in _DTYPES:
            raise ValueError(f"profile {self.name!r}: dtype must be one of {', '.join(_DTYPES)}")


#: Target domain for harmonisation: canonical grid, linear contrast, no bias, no noise.
REFERENCE_PROFILE = ScannerProfile("reference", "RAS", (4.0, 4.0, 4.0))


def profile_grid(profile: ScannerProfile) -> tuple[tuple[int, int, int], np.ndarray]:
    """The voxel grid a profile acquires: shape and 4x4 voxel-to-world (RAS+) affine.

    Column i of the affine is ``+-spacing[i]`` times the world axis named by axis code i;
    ``shape[i]`` covers the field of view along that world axis; the grid is centred at 0.

    Args:
        profile: the scanner profile.

    Returns:
        (shape, affine).
    """
    ornt = axcodes2ornt(tuple(profile.orientation))
    linear = np.zeros((3, 3))
    shape = []
    for i, (axis, flip) in enumerate(ornt):
        axis = int(axis)
        linear[axis, i] = flip * profile.spacing[i]
        shape.append(int(math.ceil(profile.fov_mm[axis] / profile.spacing[i] - 1e-9)))
    centre = (np.array(shape) - 1) / 2.0
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ centre
    return (shape[0], shape[1], shape[2]), affine


def store_intensity(value: np.ndarray, profile: ScannerProfile) -> np.ndarray:
    """Map physical intensity to the profile's stored range and dtype."""
    stored = value * profile.scale + profile.offset
    if profile.dtype == "float32":
        return stored.astype(np.float32)
    info = np.iinfo(profile.dtype)
    return np.clip(np.rint(stored), info.min, info.max).astype(profile.dtype)


def bias_field(
    world: list[np.ndarray], strength: float, rng: np.random.Generator
) -> np.ndarray:
    """Smooth multiplicative field ``exp(strength * f)``, f a random quadratic with max |f| 1."""
    x, y, z = (w / 100.0 for w in world)  # ~unit scale over a head
    basis = [x, y, z, x * x, y * y, z * z, x * y, x * z, y * z]
    coef = rng.normal(size=len(basis)) * np.array([1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    f = sum(c * b for c, b in zip(coef, basis, strict=True))
    f = f - f.mean()
    f = f / max(float(np.abs(f).max()), 1e-12)
    return np.exp(strength * f)


#: Tissues a generator may give fractions of; air is what is left (1 - sum).
TISSUES = ("csf", "gm", "wm", "deep_gm", "scalp", "skull", "soft")
#: Voxels per mm of the fine sub-grid that partial volume is integrated from.
FINE_MM = 1.0
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@dataclass(frozen=True)
class TissueContrast:
    """Signal of each tissue in one image channel, before the contrast curve (air is 0)."""

    csf: float
    gm: float
    wm: float
    deep_gm: float
    scalp: float
    skull: float
    soft: float

    def as_dict(self) -> dict[str, float]:
        """Tissue name to signal, in :data:`TISSUES` order."""
        return {name: float(getattr(self, name)) for name in TISSUES}


#: T1-weighted (MPRAGE-like): WM brightest of the brain, CSF dark, scalp fat bright. The
#: phantoms' values, so both generators look alike under the same profile.
T1 = TissueContrast(csf=CSF, gm=GM, wm=WM, deep_gm=DEEP_GM, scalp=SCALP, skull=SKULL, soft=SOFT)
#: T2-weighted: CSF brightest, GM above WM, fat intermediate, bone dark.
T2 = TissueContrast(csf=0.95, gm=0.55, wm=0.38, deep_gm=0.45, scalp=0.6, skull=0.05, soft=0.3)


@dataclass(frozen=True)
class MRProfile(ScannerProfile):
    """A scanner profile with a point-spread function and per-channel tissue contrast.

    Attributes (besides :class:`ScannerProfile`'s):
        psf_fwhm: Gaussian PSF full width at half maximum (mm) along each voxel axis, on top of
            the voxel's own box average; 0 is none.
        contrasts: tissue signals for image channel 0, 1, ... (a generator renders as many
            channels as it is asked for, up to this many).
    """

    psf_fwhm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    contrasts: tuple[TissueContrast, ...] = field(default=(T1, T2))

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.psf_fwhm) != 3 or min(self.psf_fwhm) < 0:
            raise ValueError(f"profile {self.name!r}: psf_fwhm must be three numbers >= 0")
        if not self.contrasts:
            raise ValueError(f"profile {self.name!r}: needs at least one tissue contrast")


def contrasts_of(profile: ScannerProfile, channels: int) -> tuple[TissueContrast, ...]:
    """The first ``channels`` tissue contrasts of a profile (a plain profile is T1, T2).

    Raises:
        ValueError: the profile has fewer contrasts than ``channels``.
    """
    available = profile.contrasts if isinstance(profile, MRProfile) else (T1, T2)
    if not 1 <= channels <= len(available):
        raise ValueError(f"profile {profile.name!r} has {len(available)} contrast(s); "
                         f"{channels} channel(s) asked for")
    return available[:channels]


def clean_profile(profile: ScannerProfile, reference: ScannerProfile) -> MRProfile:
    """``profile``'s grid seen by ``reference``'s tissue contrast and curve, with no bias field,
    PSF or noise, stored as plain float32: the paired truth of a site's scan.

    Args:
        profile: the site's scanner (its orientation, spacing and field of view are kept).
        reference: the reference scanner (its contrasts and gamma are used).

    Returns:
        The truth profile.
    """
    contrasts = reference.contrasts if isinstance(reference, MRProfile) else (T1, T2)
    return MRProfile(f"{profile.name}-truth", profile.orientation, profile.spacing,
                     fov_mm=profile.fov_mm, gamma=reference.gamma, contrasts=contrasts)


# --------------------------------------------------------------------------------------------
# The fine sub-grid
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FineGrid:
    """Sub-voxel sample points of a block of a profile's native grid.

    Native voxel axis i is split into ``factors[i]`` equal parts; the samples are the parts'
    centres, so the mean over a voxel's samples is the voxel's box average. Sample arrays are
    6D, ``(n0, k0, n1, k1, n2, k2)``: native voxel index and sub-voxel index per voxel axis,
    so a per-voxel array ``(n0, 1, n1, 1, n2, 1)`` broadcasts against them for free.
    ``world[a]`` is world axis a's coordinate (RAS+, mm, float32), shaped to broadcast.

    Attributes:
        shape: the native grid's shape.
        affine: the native grid's voxel-to-world affine.
        factors: sub-samples per native voxel along each voxel axis.
        box: native voxel ranges the samples cover (everything else is air).
        world: three broadcastable arrays of world x, y, z at the samples.
        axis_of_world: voxel axis along which world axis a runs.
        step: sample spacing (mm) along each world axis.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    factors: tuple[int, int, int]
    box: tuple[slice, slice, slice]
    world: list[np.ndarray]
    axis_of_world: tuple[int, int, int]
    step: np.ndarray

    @property
    def fine_shape(self) -> tuple[int, ...]:
        """Shape of the sample arrays (6D)."""
        out: list[int] = []
        for s, k in zip(self.box, self.factors, strict=True):
            out += [s.stop - s.start, k]
        return tuple(out)

    def world_axis_1d(self, axis: int, centres: bool = False) -> np.ndarray:
        """World coordinate ``axis`` along its voxel axis (1D): at the samples, or at the
        voxel centres."""
        k = self.factors[self.axis_of_world[axis]]
        coord = self.world[axis].reshape(-1, k)
        return coord.mean(axis=1) if centres else coord.reshape(-1)

    def region(self, bounds: np.ndarray) -> tuple[slice, ...]:
        """Index of the sample arrays' whole voxels whose samples may fall in a world box.

        Args:
            bounds: (2, 3) min and max world x, y, z (mm).

        Returns:
            A 6D index (slices over voxels, all sub-samples), possibly empty.
        """
        out = [slice(None)] * 6
        for axis in range(3):
            i = self.axis_of_world[axis]
            coord = self.world[axis].reshape(-1, self.factors[i])
            hit = np.flatnonzero((coord.max(axis=1) >= bounds[0, axis])
                                 & (coord.min(axis=1) <= bounds[1, axis]))
            out[2 * i] = slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, 0)
        return tuple(out)

    def integrate(self, fine: np.ndarray) -> np.ndarray:
        """Box-average samples into native voxels; voxels outside :attr:`box` are 0.

        Args:
            fine: an array of :attr:`fine_shape` (or broadcastable to it).

        Returns:
            A float32 array of :attr:`shape`.
        """
        fine = np.broadcast_to(fine, self.fine_shape)
        out = np.zeros(self.shape, dtype=np.float32)
        out[self.box] = fine.mean(axis=(1, 3, 5), dtype=np.float32)
        return out


def fine_grid(
    profile: ScannerProfile,
    bounds: np.ndarray | None = None,
    fine_mm: float = FINE_MM,
) -> FineGrid:
    """Sub-voxel samples of ``profile``'s grid, at most ``fine_mm`` apart, over ``bounds``.

    Args:
        profile: the scanner's grid.
        bounds: (2, 3) world box (min and max x, y, z in mm) outside which everything is air;
            None covers the whole field of view.
        fine_mm: largest sample spacing (mm).

    Returns:
        The fine grid.
    """
    shape, affine = profile_grid(profile)
    ornt = axcodes2ornt(tuple(profile.orientation))
    factors = tuple(max(1, math.ceil(s / fine_mm - 1e-6)) for s in profile.spacing)
    box = []
    world: list[np.ndarray] = [np.zeros(1)] * 3
    axis_of_world = [0, 0, 0]
    step = np.zeros(3)
    for i, (axis, _) in enumerate(ornt):
        axis = int(axis)
        centres = affine[axis, i] * np.arange(shape[i]) + affine[axis, 3]
        lo, hi = 0, shape[i]
        if bounds is not None:
            inside = np.flatnonzero((centres >= bounds[0, axis] - profile.spacing[i])
                                    & (centres <= bounds[1, axis] + profile.spacing[i]))
            lo, hi = (int(inside[0]), int(inside[-1]) + 1) if inside.size else (0, 1)
        box.append(slice(lo, hi))
        k = factors[i]
        sub = (np.arange(k) + 0.5) / k - 0.5  # sub-voxel centres, in voxels
        index = np.arange(lo, hi)[:, None] + sub[None, :]
        along = [1] * 6
        along[2 * i], along[2 * i + 1] = hi - lo, k
        world[axis] = (affine[axis, i] * index + affine[axis, 3]).astype(np.float32).reshape(along)
        axis_of_world[axis] = i
        step[axis] = profile.spacing[i] / k
    return FineGrid(shape=shape, affine=affine, factors=factors,  # type: ignore[arg-type]
                    box=(box[0], box[1], box[2]), world=world,
                    axis_of_world=(axis_of_world[0], axis_of_world[1], axis_of_world[2]),
                    step=step)


def native_world(profile: ScannerProfile) -> list[np.ndarray]:
    """World x, y, z at the native voxel centres, broadcastable in voxel order (3D)."""
    grid = fine_grid(profile, None, fine_mm=max(profile.spacing) + 1.0)
    return [w.reshape(w.shape[0::2]) for w in grid.world]


# --------------------------------------------------------------------------------------------
# Plane-wave fields (smooth random functions), evaluated fast on axis-aligned grids
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PlaneWaves:
    """``f(p) = sum_k amp_k cos(freq_k . p + phase_k)`` with ``p`` in a rotated, shifted frame
    ``p = rotation^T (world - translation)``.

    Attributes:
        freq: (K, 3) angular frequencies (rad/mm) in the local frame.
        amp: (K,) amplitudes.
        phase: (K,) phases (rad).
    """

    freq: np.ndarray
    amp: np.ndarray
    phase: np.ndarray

    def on_grid(self, grid: FineGrid, rotation: np.ndarray, translation: np.ndarray,
                per_voxel: bool = False) -> np.ndarray:
        """Evaluate at every sample of ``grid`` (float32, :attr:`FineGrid.fine_shape`), or with
        ``per_voxel`` once per native voxel, at its centre (shape ``(n0, 1, n1, 1, n2, 1)``,
        which broadcasts against the samples: for fields smooth on the voxel's scale).

        A plane wave in a rotated frame is a plane wave in world coordinates, and on an
        axis-aligned grid it factorises per axis: the sum over waves is then two matrix
        products, not K passes over the volume.
        """
        g = self.freq @ rotation.T  # world frequencies: f . R^T (w - t) = (R f) . w - ...
        coeff = self.amp * np.exp(1j * (self.phase - g @ translation))
        factors = []
        for i in range(3):
            axis = grid.axis_of_world.index(i)
            coord = grid.world_axis_1d(axis, centres=per_voxel).astype(np.float64)
            factors.append(np.exp(1j * np.outer(coord, g[:, axis])))
        n = [len(f) for f in factors]
        first = (factors[0] * coeff)[:, None, :] * factors[1][None, :, :]
        first = first.reshape(n[0] * n[1], -1).astype(np.complex64)
        last = factors[2].astype(np.complex64)
        out = first.real @ last.real.T - first.imag @ last.imag.T
        if per_voxel:
            return out.reshape(n[0], 1, n[1], 1, n[2], 1)
        return out.reshape(grid.fine_shape)


def sample_waves(rng: np.random.Generator, k: int, wavelength: tuple[float, float],
                 rms: float) -> PlaneWaves:
    """``k`` plane waves, random directions and phases, wavelengths (mm) in ``wavelength``,
    scaled so that the field's root mean square is ``rms``."""
    direction = rng.normal(size=(k, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    lam = rng.uniform(*wavelength, size=(k, 1))
    weight = rng.uniform(0.5, 1.0, size=k)
    amp = weight * rms / math.sqrt(float(np.sum(weight**2)) / 2.0)
    return PlaneWaves(freq=direction * (2 * np.pi / lam), amp=amp,
                      phase=rng.uniform(0.0, 2 * np.pi, size=k))


# --------------------------------------------------------------------------------------------
# Acquisition
# --------------------------------------------------------------------------------------------


def tissue_signal(fractions: dict[str, np.ndarray], contrast: TissueContrast) -> np.ndarray:
    """Mix tissue signals by their fractions (air contributes 0)."""
    values = contrast.as_dict()
    out = None
    for name, frac in fractions.items():
        term = frac * np.float32(values[name])
        out = term if out is None else out + term
    assert out is not None
    return out


def acquire(
    signal: np.ndarray,
    profile: ScannerProfile,
    rng: np.random.Generator | None,
) -> np.ndarray:
    """What the scanner stores for a tissue signal on its native grid.

    Order follows the physics: contrast curve, coil bias field (multiplicative), point-spread
    function, complex Gaussian noise whose magnitude is Rician, storage. ``rng=None`` is the
    clean path (curve and storage only: the paired truth).

    Args:
        signal: tissue signal on the profile's native grid (voxel order).
        profile: the scanner.
        rng: drives the bias field and the noise.

    Returns:
        The stored image (the profile's dtype).
    """
    value = np.maximum(signal, 0.0) ** profile.gamma
    if rng is None:
        return store_intensity(value, profile)
    value = value * bias_field(native_world(profile), profile.bias_strength, rng)
    fwhm = profile.psf_fwhm if isinstance(profile, MRProfile) else (0.0, 0.0, 0.0)
    if max(fwhm) > 0:
        sigma = [f * _FWHM_TO_SIGMA / s for f, s in zip(fwhm, profile.spacing, strict=True)]
        value = gaussian_filter(value, sigma=sigma, mode="nearest")
    if profile.noise_std > 0:
        real = value + rng.normal(0.0, profile.noise_std, size=value.shape)
        imag = rng.normal(0.0, profile.noise_std, size=value.shape)
        value = np.sqrt(real**2 + imag**2)
    return store_intensity(value, profile)


def ramp(d: np.ndarray, width: float) -> np.ndarray:
    """Fraction inside a boundary at signed distance ``d`` (negative inside) for a sample of
    extent ``width`` across it: the box filter of a plane, a linear ramp (float32)."""
    return np.clip(np.float32(0.5) - d * np.float32(1.0 / width), 0.0, 1.0)
