"""Procedural head phantoms with a folded cortex, tissue classes and partial volume.

Each patient is a :class:`FoldedHead`: continuous functions of world coordinates (mm, RAS+),
in a head frame that each patient rotates and shifts. The brain has

- a **folded cortex**: sulci are the zero sheets of a band-limited random field (gyral period
  ~10-15 mm), cut to a depth of ~8-17 mm below the brain's outer hull and along the
  interhemispheric fissure; grey matter is every point of the brain within the local cortical
  thickness (~2-3.2 mm, varying smoothly) of cerebrospinal fluid, so a ribbon lines the outer
  surface, both banks of every sulcus and the fundi; white matter fills the gyral cores;
- CSF in the sulci, the fissure, a layer under the skull and two lateral ventricles (size
  varies by patient), deep grey matter (thalamus, lentiform nucleus), skull, scalp and neck.

Tissue fractions are evaluated on a fine sub-grid (~1 mm, aligned with the scanner's voxels)
and box-averaged into the scanner's native voxels, so sulci and the cortical ribbon blur into
partial volume as they do in real scans. :mod:`scanners` turns fractions into the stored image.

Interface as :mod:`fedscan.simulations.phantoms` (``sample_anatomy``, ``render``, ``render_clean``),
plus :func:`render_tissues` (fractions and GM/WM/CSF classes) and :func:`render_truth` (the
same head through the reference scanner on a site's grid, for harmonisation evaluation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedscan.simulations.scanners import (
    FINE_MM,
    REFERENCE_PROFILE,
    FineGrid,
    PlaneWaves,
    ScannerProfile,
    acquire,
    clean_profile,
    contrasts_of,
    fine_grid,
    ramp,
    sample_waves,
    tissue_signal,
)
from fedscan.simulations.shapes import cylinder_sdf, ellipsoid_sdf, rotation_matrix

#: Tissue classes of :func:`render_tissues` (inside the brain mask; 0 is outside).
TISSUE_CLASSES = {0: "background", 1: "csf", 2: "gm", 3: "wm"}


@dataclass(frozen=True, eq=False)
class FoldedHead:
    """One synthetic patient; lengths in mm, in the head frame (``world = R local + t``).

    Attributes:
        head_radii: head ellipsoid radii (x, y, z).
        rotation: (3, 3) local-to-world rotation.
        translation: (3,) head centre in world coordinates.
        scalp_mm, skull_mm, csf_mm: scalp, skull and subarachnoid CSF thickness.
        hull_waves: brain outline variation (mm; lobes, tens of mm).
        skull_base_z, skull_base_tilt: the plane the brain sits on (z at y = 0, dz/dy).
        neck_radii, neck_y, neck_top: neck elliptic cylinder (x, y radii), centre y, top z.
        fold_waves: the folding field (unit RMS); sulci are its zero sheets.
        sulcus_half_width: half width of the CSF in a sulcus (mm).
        depth_mm, depth_waves: mean sulcal depth and its variation (mm).
        thickness_mm, thickness_waves: mean cortical thickness and its variation (mm).
        fissure_half_width: half width of the interhemispheric fissure.
        callosum_z, callosum_y, callosum_half_length: where the hemispheres join (the
            fissure stops at height ``callosum_z`` for ``|y - callosum_y| <`` half length).
        ventricle_centres, ventricle_radii: (4, 3) lateral ventricle bodies and horns.
        deep_centres, deep_radii: (4, 3) thalami and lentiform nuclei.
        texture: smooth multiplicative intensity variation (relative).
    """

    head_radii: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray
    scalp_mm: float
    skull_mm: float
    csf_mm: float
    hull_waves: PlaneWaves
    skull_base_z: float
    skull_base_tilt: float
    neck_radii: np.ndarray
    neck_y: float
    neck_top: float
    fold_waves: PlaneWaves
    sulcus_half_width: float
    depth_mm: float
    depth_waves: PlaneWaves
    thickness_mm: float
    thickness_waves: PlaneWaves
    fissure_half_width: float
    callosum_z: float
    callosum_y: float
    callosum_half_length: float
    ventricle_centres: np.ndarray
    ventricle_radii: np.ndarray
    deep_centres: np.ndarray
    deep_radii: np.ndarray
    texture: PlaneWaves


def _mirror(right: np.ndarray) -> np.ndarray:
    """Stack right-side centres (x > 0) with their left mirror images."""
    left = right * np.array([-1.0, 1.0, 1.0])
    return np.concatenate([right, left])


def sample_anatomy(rng: np.random.Generator) -> FoldedHead:
    """Draw one random head (shape, pose, folding pattern, thickness, ventricle size).

    Args:
        rng: source of randomness; the same generator state gives the same head.

    Returns:
        The head.
    """
    head = np.array([rng.uniform(70, 80), rng.uniform(88, 100), rng.uniform(80, 92)])
    rotation = rotation_matrix(np.deg2rad(rng.uniform(-8, 8, size=3)))
    translation = rng.uniform(-6, 6, size=3)
    scalp, skull, csf = rng.uniform(4, 6), rng.uniform(5, 7), rng.uniform(1.5, 3.0)
    brain_z = head[2] - scalp - skull - csf

    # Lateral ventricles: a body above the thalami and a posterior horn; size varies ~2.5x.
    v = rng.uniform(0.7, 1.5)
    v_x, v_z = rng.uniform(5.0, 7.0) + 2.0 * (v - 1.0), rng.uniform(8, 12)
    body = [v_x, rng.uniform(-2, 4), v_z]
    horn = [v_x + 6.0, body[1] - 22.0, v_z - 4.0]
    v_radii = np.array([[3.5 * v, 20.0, 6.0 * v], [3.0 * v, 10.0, 4.0 * v]])
    thalamus = [v_x + 4.0 + 3.0 * v, rng.uniform(-14, -10), rng.uniform(-2, 2)]
    lentiform = [thalamus[0] + rng.uniform(10, 14), rng.uniform(2, 6), rng.uniform(-2, 2)]
    d_radii = np.array([[7.0, 11.0, 8.0], [5.5, 13.0, 8.0]]) * rng.uniform(0.9, 1.1)

    return FoldedHead(
        head_radii=head,
        rotation=rotation,
        translation=translation,
        scalp_mm=scalp,
        skull_mm=skull,
        csf_mm=csf,
        hull_waves=sample_waves(rng, 6, wavelength=(70.0, 160.0), rms=2.0),
        skull_base_z=-rng.uniform(0.6, 0.7) * brain_z,
        skull_base_tilt=rng.uniform(0.1, 0.25),
        neck_radii=np.array([rng.uniform(48, 56), rng.uniform(50, 58)]),
        neck_y=-rng.uniform(10, 20),
        neck_top=-rng.uniform(30, 45),
        # Zero sheets of a field with wavelengths 15-24 mm lie ~8-12 mm apart: gyri.
        fold_waves=sample_waves(rng, 64, wavelength=(15.0, 24.0), rms=1.0),
        sulcus_half_width=rng.uniform(0.2, 0.5),
        depth_mm=rng.uniform(10.0, 14.0),
        depth_waves=sample_waves(rng, 5, wavelength=(50.0, 120.0), rms=2.5),
        thickness_mm=rng.uniform(2.3, 2.8),
        thickness_waves=sample_waves(rng, 5, wavelength=(40.0, 100.0), rms=0.3),
        fissure_half_width=rng.uniform(0.6, 1.2),
        callosum_z=v_z + 6.0 * v + rng.uniform(3, 5),
        callosum_y=rng.uniform(-8, -2),
        callosum_half_length=rng.uniform(34, 40),
        ventricle_centres=_mirror(np.array([body, horn])),
        ventricle_radii=np.concatenate([v_radii, v_radii]),
        deep_centres=_mirror(np.array([thalamus, lentiform])),
        deep_radii=np.concatenate([d_radii, d_radii]),
        texture=sample_waves(rng, 6, wavelength=(12.0, 40.0), rms=0.012),
    )


# --------------------------------------------------------------------------------------------
# Tissue fractions
# --------------------------------------------------------------------------------------------


def head_bounds(head: FoldedHead, profile: ScannerProfile) -> np.ndarray:
    """World box (2, 3) holding the head: its rotated ellipsoid and the neck down to the
    field of view's floor."""
    r = head.head_radii
    half = np.sqrt((head.rotation**2) @ (r**2)) + 2.0  # extent of a rotated ellipsoid
    lo, hi = head.translation - half, head.translation + half
    neck = max(head.neck_radii) + abs(head.neck_y)
    lo[:2] = np.minimum(lo[:2], head.translation[:2] - neck)
    hi[:2] = np.maximum(hi[:2], head.translation[:2] + neck)
    lo[2] = -profile.fov_mm[2] / 2.0
    return np.stack([lo, hi])


def _world_box(head: FoldedHead, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """World box (2, 3) holding the head-frame box ``[lo, hi]`` after the head's pose."""
    corners = np.array([[(lo, hi)[i >> k & 1][k] for k in range(3)] for i in range(8)])
    world = corners @ head.rotation.T + head.translation
    return np.stack([world.min(axis=0), world.max(axis=0)])


def _local(head: FoldedHead, grid: FineGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Head-frame x, y, z of the grid's samples (float32)."""
    rot, t = head.rotation.astype(np.float32), head.translation.astype(np.float32)
    w = [grid.world[a] - t[a] for a in range(3)]
    x, y, z = (w[0] * rot[0, k] + w[1] * rot[1, k] + w[2] * rot[2, k] for k in range(3))
    return x, y, z


def _skull_base(head: FoldedHead, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Signed distance to the skull-base plane the brain sits on (negative above it)."""
    tilt = head.skull_base_tilt
    return ((np.float32(head.skull_base_z) + np.float32(tilt) * y - z)
            / np.float32(math.sqrt(1.0 + tilt**2)))


def _shell_fractions(head: FoldedHead, grid: FineGrid) -> dict[str, np.ndarray]:
    """Native fractions of the head's smooth shells: ``head`` (anything but air), ``under_scalp``
    (inside the scalp), ``in_skull`` (inside the skull's outer surface) and ``cavity`` (inside
    the cranial cavity: CSF and brain)."""
    f32 = np.float32
    x, y, z = _local(head, grid)
    width = float(np.mean(grid.step))
    d_head = np.minimum(ellipsoid_sdf(x, y, z, head.head_radii.astype(f32)),
                        np.maximum(cylinder_sdf(x, y - f32(head.neck_y),
                                                 head.neck_radii.astype(f32)),
                                   z - f32(head.neck_top)))
    plane = _skull_base(head, y, z)
    outer = f32(head.scalp_mm + head.skull_mm)
    return {
        "head": grid.integrate(ramp(d_head, width)),
        "under_scalp": grid.integrate(ramp(d_head + f32(head.scalp_mm), width)),
        "in_skull": grid.integrate(ramp(np.maximum(d_head + f32(head.scalp_mm),
                                                   plane - f32(3.0 + head.skull_mm)), width)),
        "cavity": grid.integrate(ramp(np.maximum(d_head + outer, plane - f32(3.0)), width)),
    }


def _brain_fractions(head: FoldedHead, grid: FineGrid) -> dict[str, np.ndarray]:
    """Native fractions of the brain's tissues (``gm``, ``wm``, ``deep_gm``), of the brain mask
    (``brain``: everything inside the brain's outline, sulcal CSF and ventricles included),
    and the multiplicative intensity ``texture``, from the grid's samples."""
    f32 = np.float32
    x, y, z = _local(head, grid)
    width = float(np.mean(grid.step))

    def waves(field: PlaneWaves, per_voxel: bool = True) -> np.ndarray:
        return field.on_grid(grid, head.rotation, head.translation, per_voxel=per_voxel)

    # The outline: the cranial cavity shrunk by the CSF layer (>= 0.8 mm, so the brain stays
    # inside the cavity), varied by lobe-sized waves, on the skull base.
    outer = head.scalp_mm + head.skull_mm
    gap = np.maximum(f32(head.csf_mm) + waves(head.hull_waves), f32(0.8))
    d_hull = np.maximum(ellipsoid_sdf(x, y, z, head.head_radii.astype(f32)) + f32(outer)
                        + gap, _skull_base(head, y, z))
    brain = ramp(d_hull, width)

    # Interhemispheric fissure: a CSF sheet at x = 0 down to the corpus callosum.
    cc = np.abs(y - f32(head.callosum_y)) < f32(head.callosum_half_length)
    floor = np.where(cc, f32(head.callosum_z), f32(-1e3))
    to_fissure = np.sqrt(np.maximum(np.abs(x) - f32(head.fissure_half_width), 0.0) ** 2
                         + np.maximum(floor - z, 0.0) ** 2)
    surface = np.minimum(-d_hull, to_fissure)  # depth below the brain's outer CSF
    del d_hull, floor, cc

    # Sulci: zero sheets of the folding field, |n| / |grad n| from the sheet, cut to a depth.
    fold = waves(head.fold_waves, per_voxel=False)
    shape = grid.fine_shape
    flat = fold.reshape(shape[0] * shape[1], shape[2] * shape[3], shape[4] * shape[5])
    spacing = [float(grid.step[grid.axis_of_world.index(i)]) for i in range(3)]
    slope = np.zeros_like(flat)
    for g in np.gradient(flat, *spacing):
        slope += g * g
    to_sheet = np.abs(fold) / np.maximum(np.sqrt(slope).reshape(fold.shape), f32(1e-3))
    to_sheet -= f32(head.sulcus_half_width)
    del fold, flat, slope
    below = surface - (f32(head.depth_mm) + waves(head.depth_waves))
    to_sulcus = np.sqrt(np.maximum(to_sheet, 0.0) ** 2 + np.maximum(below, 0.0) ** 2)
    sulcal = ramp(np.maximum(to_sheet, below), width)
    tissue = brain * (1 - sulcal) * (1 - ramp(to_fissure, width))
    del to_sheet, below, to_fissure, sulcal
    thickness = np.clip(f32(head.thickness_mm) + waves(head.thickness_waves), 1.8, 3.4)
    core = ramp(thickness - np.minimum(surface, to_sulcus), width)  # beyond the ribbon: WM
    del surface, to_sulcus

    # Ventricles (CSF) and deep grey matter sit inside the white-matter core; they are
    # evaluated only in the box that holds them.
    centres = np.concatenate([head.ventricle_centres, head.deep_centres])
    radii = np.concatenate([head.ventricle_radii, head.deep_radii])
    inner = grid.region(_world_box(head, (centres - radii).min(axis=0) - 2.0,
                                   (centres + radii).max(axis=0) + 2.0))
    xi, yi, zi = (np.broadcast_to(c, grid.fine_shape)[inner] for c in (x, y, z))

    def union(centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
        d = None
        for c, r in zip(centres, radii, strict=True):
            e = ellipsoid_sdf(xi - f32(c[0]), yi - f32(c[1]), zi - f32(c[2]), r.astype(f32))
            d = e if d is None else np.minimum(d, e)
        assert d is not None
        return d

    wm_core = tissue * core
    deep_gm = np.zeros_like(wm_core)
    wm_core[inner] *= 1 - ramp(union(head.ventricle_centres, head.ventricle_radii), width)
    deep_gm[inner] = wm_core[inner] * ramp(union(head.deep_centres, head.deep_radii), width)
    return {
        "gm": grid.integrate(tissue * (1 - core)),
        "wm": grid.integrate(wm_core - deep_gm),
        "deep_gm": grid.integrate(deep_gm),
        "brain": grid.integrate(brain),
        "texture": grid.integrate(1 + waves(head.texture)),
    }


#: Sub-grid spacing for the smooth head shells (scalp, skull, neck): their partial volume
#: needs no finer sampling, and they cover most of the field of view.
SHELL_MM = 2.0


def render_fractions(
    head: FoldedHead, profile: ScannerProfile, fine_mm: float = FINE_MM
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each tissue's fraction of every native voxel (partial volume), before any scanner effect.

    The brain is sampled every ``fine_mm`` (at most) inside its bounding box, the smooth head
    shells every :data:`SHELL_MM`; samples are box-averaged into the native voxels.

    Args:
        head: the patient.
        profile: the scanner's grid (orientation, spacing, field of view).
        fine_mm: spacing of the sub-grid integrated into each voxel.

    Returns:
        ({tissue: fraction in [0, 1]} for the tissues of :data:`scanners.TISSUES` (they sum
        to at most 1; air is the rest) plus ``brain``, the brain mask's fraction, and
        ``texture``, the voxel's mean multiplicative intensity texture (about 1 +- 0.02, 0
        outside the brain's box); 4x4 affine).
    """
    shells = _shell_fractions(head, fine_grid(profile, head_bounds(head, profile),
                                              max(fine_mm, SHELL_MM)))
    reach = head.head_radii - (head.scalp_mm + head.skull_mm) + 2.0
    grid = fine_grid(profile, _world_box(head, -reach, reach), fine_mm)
    brain = _brain_fractions(head, grid)
    parenchyma = brain["gm"] + brain["wm"] + brain["deep_gm"]
    # Shells and brain come from different samplings: where they meet, brain wins.
    cavity = np.maximum(shells["cavity"], parenchyma)
    fractions = {
        "csf": cavity - parenchyma,
        "gm": brain["gm"],
        "wm": brain["wm"],
        "deep_gm": brain["deep_gm"],
        "scalp": shells["head"] - shells["under_scalp"],
        "skull": np.maximum(shells["in_skull"] - cavity, 0.0),
        "soft": shells["under_scalp"] - shells["in_skull"],
        "brain": brain["brain"],
        "texture": brain["texture"],
    }
    return fractions, grid.affine


def _labels(fractions: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Brain mask (fraction >= 0.5) and GM/WM/CSF classes (largest fraction, in the mask)."""
    brain = fractions["brain"] >= 0.5
    gm = fractions["gm"] + fractions["deep_gm"]
    wm = fractions["wm"]
    csf = np.maximum(fractions["brain"] - gm - wm, 0.0)
    classes = np.argmax(np.stack([csf, gm, wm]), axis=0).astype(np.uint8) + 1
    return brain.astype(np.uint8), np.where(brain, classes, 0).astype(np.uint8)


def _image(fractions: dict[str, np.ndarray], profile: ScannerProfile, channels: int,
           rng: np.random.Generator | None) -> np.ndarray:
    tissues = {k: v for k, v in fractions.items() if k not in ("brain", "texture")}
    texture = np.where(fractions["texture"] > 0, fractions["texture"], 1.0)
    images = [acquire(tissue_signal(tissues, contrast) * texture, profile, rng)
              for contrast in contrasts_of(profile, channels)]
    return images[0] if channels == 1 else np.stack(images, axis=-1)


def render(
    head: FoldedHead,
    profile: ScannerProfile,
    rng: np.random.Generator | None = None,
    *,
    channels: int = 1,
    fine_mm: float = FINE_MM,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render a head as the profile's scanner acquires it (as ``phantoms.render``).

    Args:
        head: the patient.
        profile: the scanner (a :class:`scanners.MRProfile` adds PSF and tissue contrasts).
        rng: drives the bias field and the noise; ``None`` draws fresh OS entropy.
        channels: image channels (1: T1; 2: T1 and T2, stacked last).
        fine_mm: partial-volume sub-grid spacing.

    Returns:
        (image in the profile's dtype, brain mask uint8 0/1, 4x4 affine).
    """
    rng = np.random.default_rng() if rng is None else rng
    fractions, affine = render_fractions(head, profile, fine_mm)
    return _image(fractions, profile, channels, rng), _labels(fractions)[0], affine


def render_clean(
    head: FoldedHead, profile: ScannerProfile, *, channels: int = 1, fine_mm: float = FINE_MM
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`render` with the profile's contrast and storage but no bias, PSF or noise."""
    fractions, affine = render_fractions(head, profile, fine_mm)
    return _image(fractions, profile, channels, None), _labels(fractions)[0], affine


def render_tissues(
    head: FoldedHead, profile: ScannerProfile, fine_mm: float = FINE_MM
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue classes on the profile's grid (:data:`TISSUE_CLASSES`: 0 outside the brain mask,
    1 CSF, 2 GM, deep GM included, 3 WM), by largest fraction in each voxel.

    Returns:
        (classes uint8, 4x4 affine).
    """
    fractions, affine = render_fractions(head, profile, fine_mm)
    return _labels(fractions)[1], affine


def render_truth(
    head: FoldedHead,
    profile: ScannerProfile,
    reference: ScannerProfile = REFERENCE_PROFILE,
    *,
    channels: int = 1,
    fine_mm: float = FINE_MM,
) -> tuple[np.ndarray, np.ndarray]:
    """Paired truth for harmonisation (evaluation only): the same head as the reference scanner
    sees tissue (its contrasts and curve; no bias, PSF or noise; float32), on the site's grid.

    Args:
        head: the patient.
        profile: the site's scanner (only its grid is used).
        reference: the reference scanner.
        channels: image channels, as the site's image.
        fine_mm: partial-volume sub-grid spacing.

    Returns:
        (image float32, 4x4 affine equal to the site image's).
    """
    image, _, affine = render_clean(head, clean_profile(profile, reference), channels=channels,
                                    fine_mm=fine_mm)
    return image, affine
