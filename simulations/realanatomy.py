"""A test federation of real MRI anatomy: the MNI ICBM152 template, deformed per patient.

Anatomy comes from the MNI ICBM 2009a symmetric template (1 mm, skull-stripped T1 with grey and
white matter probability maps, cerebellum and brainstem included) that ships inside the
``nilearn`` wheel; it is read from the installed package, nothing is downloaded. Per patient a
random affine (scale, rotation, shear, shift within anatomical ranges), a smooth nonlinear
displacement and an optional ventricle enlargement deform the template, and a synthetic head
(CSF layer, skull, scalp, air) is grown around the brain. Scanners (:mod:`scanners`) differ in
tissue contrast, contrast curve, bias field, PSF, Rician noise, voxel size, axis order and
storage; every case also gets its paired truth (the same anatomy through the reference scanner,
on the site's grid), written to a separate folder.

Label sets (``dataset.json`` ``labels``):

- ``brain``: 0 background, 1 brain (the template's brain mask: parenchyma, ventricles, sulcal
  CSF, cerebellum, brainstem);
- ``parcellation``: 0 background, 1 ``left_gm``, 2 ``right_gm`` (grey matter, cerebral and
  cerebellar, split at the template's midsagittal plane x = 0, so the side follows the anatomy
  through any deformation and reorientation), 3 ``white_matter``, 4 ``ventricles`` (the lateral
  and third ventricles). Sulcal and cisternal CSF are background.
- ``hemispheres``: 0 background, 1 ``left_hemisphere``, 2 ``right_hemisphere`` (the brain mask
  less the ventricles on each side of the midsagittal plane: cerebral and cerebellar
  hemisphere, half the brainstem, sulcal CSF), 3 ``left_ventricle``, 4 ``right_ventricle`` (the
  ventricles split at the same plane: each lateral ventricle with half the third). Two
  left/right pairs of large structures with visible boundaries: a set a small 3D UNet on a
  2 mm grid learns on a CPU (the thin cortical ribbon of ``parcellation`` needs finer grids).

The template's licence (MNI notice, kept in every copy): Copyright (C) 1993-2004 Louis Collins,
McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University. Permission
to use, copy, modify, and distribute this software and its documentation for any purpose and
without fee is hereby granted, provided that the above copyright notice appear in all copies.
The authors and McGill University make no representations about the suitability of this
software for any purpose. It is provided "as is" without express or implied warranty.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from fedscan.shared.errors import DataError
from fedscan.simulations.phantoms import (
    _publish,
    _save_nifti,
    case_rngs,
)
from fedscan.simulations.scanners import (
    T1,
    T2,
    FineGrid,
    MRProfile,
    PlaneWaves,
    ScannerProfile,
    TissueContrast,
    acquire,
    clean_profile,
    contrasts_of,
    fine_grid,
    ramp,
    sample_waves,
    tissue_signal,
)
from fedscan.simulations.shapes import rotation_matrix

#: Bump when the output changes: it names the cache folder and the completion marker.
REAL_FORMAT = 1
REAL_VERSION = f"fedscan-realanatomy-{REAL_FORMAT}"
TEMPLATE_FILES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz"
                  for k in ("t1", "gm", "wm")}
LICENCE = (
    "Derived from the MNI ICBM 2009a symmetric template. Copyright (C) 1993-2004 Louis Collins, "
    "McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University. "
    "Permission to use, copy, modify, and distribute this software and its documentation for "
    "any purpose and without fee is hereby granted, provided that the above copyright notice "
    "appear in all copies. The authors and McGill University make no representations about "
    "the suitability of this software for any purpose. It is provided \"as is\" without "
    "express or implied warranty."
)
CITATION = ("Fonov et al., NeuroImage 47 (2009) S102 and 54 (2011) 313-327; Collins et al., "
            "Proc. 3rd Int. Conf. Functional Mapping of the Human Brain (1999)")

LABEL_SETS: dict[str, dict[str, str]] = {
    "brain": {"0": "background", "1": "brain"},
    "parcellation": {"0": "background", "1": "left_gm", "2": "right_gm",
                     "3": "white_matter", "4": "ventricles"},
    "hemispheres": {"0": "background", "1": "left_hemisphere", "2": "right_hemisphere",
                    "3": "left_ventricle", "4": "right_ventricle"},
}
#: Label pairs that are the left and right of one structure (for flips that swap them).
MIRROR_PAIRS: dict[str, list[list[int]]] = {"brain": [], "parcellation": [[1, 2]],
                                            "hemispheres": [[1, 2], [3, 4]]}
CHANNEL_NAMES = ("T1", "T2")
#: Sub-grid spacing. The template is 1 mm but an average of 152 brains, smooth on that
#: scale; 1.5 mm sub-samples read trilinearly from it cost 3-4x less than 1 mm (measured:
#: ~1.5-2 s against ~5 s per 2-channel case on one core).
FINE_MM = 1.5
#: Head field of view (mm, x y z): the largest deformed head with room to spare.
HEAD_FOV = (192.0, 232.0, 216.0)


# --------------------------------------------------------------------------------------------
# The template
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Template:
    """The template's maps, stacked for sampling, in template voxel order (RAS, 1 mm).

    Attributes:
        volume: (1, C, X, Y, Z) float32 tensor of :attr:`CHANNELS`.
        affine: template voxel-to-mm affine.
        hull: (1, 1, X, Y, Z) signed distance (mm, negative inside) to a smooth hull around
            the brain, on a 2 mm grid (it is smooth, and its distance transform costs).
        hull_affine: the hull grid's voxel-to-mm affine.
        centre: brain mask centroid (template mm).
        ventricle_centre: ventricles' centroid (template mm).
        t1_fit: T1 of (gm, wm, csf) fitted to the template's T1 (0-1 scale).
        brain_box: (min, max) template mm of the brain mask.
        head_box: (min, max) template mm within 24 mm of the hull (the head's shells).
    """

    CHANNELS = ("brain", "gm", "wm", "ventricles", "t1_residual")

    volume: torch.Tensor
    affine: np.ndarray
    hull: torch.Tensor
    hull_affine: np.ndarray
    centre: np.ndarray
    ventricle_centre: np.ndarray
    t1_fit: np.ndarray
    brain_box: tuple[np.ndarray, np.ndarray]
    head_box: tuple[np.ndarray, np.ndarray]


def _template_path(name: str) -> Path:
    """Path of a template file inside the installed nilearn package (not imported)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("nilearn is not installed: the real-anatomy federation reads the MNI "
                        "ICBM152 template from its package (pip install 'nilearn==0.13.1')")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / name
    if not path.is_file():
        raise DataError(f"{path}: missing from the installed nilearn package")
    return path


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Read the template once per process and derive what sampling needs (~2 s).

    Derived maps: the brain mask (T1 > 0), CSF (mask less GM and WM), the ventricles (the
    largest CSF-dominant component above the brainstem near the midline), the T1 that tissue
    fractions do not explain (deep nuclei, myelination: kept as texture) and the signed
    distance to a smooth hull around the brain (the head is grown from it).

    Returns:
        The template.
    """
    maps = {}
    affine = None
    for key, name in TEMPLATE_FILES.items():
        img = nib.load(_template_path(name))
        maps[key] = np.asanyarray(img.dataobj).astype(np.float32) / 255.0
        affine = img.affine
    assert affine is not None
    if "".join(nib.aff2axcodes(affine)) != "RAS":
        raise DataError(f"{_template_path(TEMPLATE_FILES['t1'])}: expected a RAS template")
    brain = (maps["t1"] > 0).astype(np.float32)
    gm, wm = maps["gm"] * brain, maps["wm"] * brain
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    mm = [affine[a, a] * np.arange(n) + affine[a, 3] for a, n in enumerate(brain.shape)]
    x, y, z = np.meshgrid(*mm, indexing="ij", sparse=True)

    central = (np.abs(x) < 36) & (y > -60) & (y < 40) & (z > 0) & (z < 40)
    parts, _ = ndimage.label((csf > 0.5) & central)
    sizes = np.bincount(parts.ravel())
    sizes[0] = 0
    ventricles = (parts == int(np.argmax(sizes))).astype(np.float32)

    inside = brain > 0
    design = np.stack([gm[inside], wm[inside], csf[inside]], axis=1)
    t1_fit = np.linalg.lstsq(design, maps["t1"][inside], rcond=None)[0]
    residual = np.where(inside, maps["t1"] - (gm * t1_fit[0] + wm * t1_fit[1]
                                              + csf * t1_fit[2]), 0.0)

    # Hull: the brain mask at 2 mm, smoothed (sulci and notches filled), thresholded; its
    # signed distance in mm.
    coarse = brain[::2, ::2, ::2]
    hull = ndimage.gaussian_filter(coarse, sigma=2.0) > 0.3
    hull_sdf = 2.0 * (ndimage.distance_transform_edt(~hull)
                      - ndimage.distance_transform_edt(hull)).astype(np.float32)
    hull_affine = affine.copy()
    hull_affine[:3, :3] *= 2.0

    volume = np.stack([brain, gm, wm, ventricles, residual.astype(np.float32)])
    voxels = np.argwhere(inside)
    centre = affine[:3, :3] @ voxels.mean(axis=0) + affine[:3, 3]
    vent_centre = affine[:3, :3] @ np.argwhere(ventricles > 0).mean(axis=0) + affine[:3, 3]

    def box(mask: np.ndarray, to_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = np.argwhere(mask)
        lo, hi = (to_mm[:3, :3] @ v + to_mm[:3, 3] for v in (index.min(0), index.max(0)))
        return lo, hi

    return Template(volume=torch.from_numpy(volume)[None], affine=affine,
                    hull=torch.from_numpy(hull_sdf)[None, None], hull_affine=hull_affine,
                    centre=centre, ventricle_centre=vent_centre,
                    t1_fit=t1_fit.astype(np.float32), brain_box=box(inside, affine),
                    head_box=box(hull_sdf < 24.0, hull_affine))


# --------------------------------------------------------------------------------------------
# Patients
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Patient:
    """One deformed template: maps world (RAS mm) to template mm and carries the head's shells.

    ``template = linear @ world + offset + displacement(world)``, then the ventricle
    enlargement pulls template points toward the ventricles (so they grow in the patient).

    Attributes:
        linear: (3, 3) world-to-template linear part (inverse of scale, shear, rotation).
        offset: (3,) template mm of the world origin.
        displacement: three plane-wave fields (template mm) in world coordinates.
        ventricle_growth: relative enlargement near the ventricles (0 is none).
        ventricle_sigma: (3,) extent (template mm) of the region the enlargement acts on.
        csf_mm, skull_mm, scalp_mm: head shells grown outside the brain's hull.
        shell_waves: smooth variation (mm) of the shells' thickness.
    """

    linear: np.ndarray
    offset: np.ndarray
    displacement: tuple[PlaneWaves, PlaneWaves, PlaneWaves]
    ventricle_growth: float
    ventricle_sigma: np.ndarray
    csf_mm: float
    skull_mm: float
    scalp_mm: float
    shell_waves: PlaneWaves


def sample_patient(rng: np.random.Generator, *, enlarge_ventricles: bool = True) -> Patient:
    """Draw one patient's deformation and head.

    Ranges: overall scale 0.84-1.0 (the MNI152 average brain is larger than individual
    brains: its mask holds 1.89 l, adult intracranial volumes are ~1.2-1.7 l) with 4 % per
    axis, rotation up to 10 degrees (pitch) and 6 (roll, yaw), shear up to 0.04, shift up to
    8 mm, nonlinear displacement ~2 mm RMS per axis at wavelengths of 40-110 mm, ventricles
    enlarged up to ~1.6x in volume.

    Args:
        rng: source of randomness; the same state gives the same patient.
        enlarge_ventricles: draw a ventricle enlargement (else none).

    Returns:
        The patient.
    """
    template = load_template()
    scale = np.diag(rng.uniform(0.84, 1.0) * rng.uniform(0.96, 1.04, size=3))
    shear = np.eye(3)
    shear[np.triu_indices(3, 1)] = rng.uniform(-0.04, 0.04, size=3)
    rotation = rotation_matrix(np.deg2rad(rng.uniform(-1, 1, size=3) * np.array([10.0, 6.0, 6.0])))
    forward = rotation @ shear @ scale  # template to world
    shift = rng.uniform(-8, 8, size=3)
    linear = np.linalg.inv(forward)
    # The brain's centre lands at the shift from the world origin (the field-of-view centre).
    offset = template.centre - linear @ shift
    displacement = tuple(sample_waves(rng, 8, wavelength=(40.0, 110.0), rms=2.0)
                         for _ in range(3))
    growth = rng.uniform(0.0, 0.35) if enlarge_ventricles else 0.0
    return Patient(
        linear=linear, offset=offset,
        displacement=displacement,  # type: ignore[arg-type]
        ventricle_growth=float(growth),
        ventricle_sigma=np.array([25.0, 40.0, 22.0]),
        csf_mm=rng.uniform(1.0, 2.5), skull_mm=rng.uniform(5.0, 7.5),
        scalp_mm=rng.uniform(4.0, 7.0),
        shell_waves=sample_waves(rng, 6, wavelength=(60.0, 160.0), rms=0.8),
    )


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _to_template(patient: Patient, grid: FineGrid) -> list[np.ndarray]:
    """Template mm (x, y, z) of the grid's samples under the patient's deformation."""
    template = load_template()
    w = grid.world
    u = []
    for a in range(3):
        row = patient.linear[a].astype(np.float32)
        field = patient.displacement[a].on_grid(grid, np.eye(3), np.zeros(3))
        u.append(w[0] * row[0] + w[1] * row[1] + w[2] * row[2]
                 + np.float32(patient.offset[a]) + field)
    if patient.ventricle_growth > 0:
        c = template.ventricle_centre.astype(np.float32)
        rel = [u[a] - c[a] for a in range(3)]
        weight = np.exp(-0.5 * sum((rel[a] / np.float32(patient.ventricle_sigma[a])) ** 2
                                   for a in range(3)))
        pull = 1 - np.float32(patient.ventricle_growth) * weight
        u = [c[a] + rel[a] * pull for a in range(3)]
    return u


def _sample(channels: torch.Tensor, affine: np.ndarray, u: list[np.ndarray],
            shape: tuple[int, ...]) -> np.ndarray:
    """Trilinear samples (C, *shape) of maps (1, C, X, Y, Z) with voxel-to-mm ``affine`` (RAS,
    diagonal) at template mm ``u``. Border padding: past an edge the maps continue as there.
    """
    size = channels.shape[2:]
    norm = []
    for a in (2, 1, 0):  # grid_sample's x indexes the last axis
        index = (u[a] - np.float32(affine[a, 3])) / np.float32(affine[a, a])
        norm.append(np.broadcast_to(index * np.float32(2.0 / (size[a] - 1)) - 1, shape))
    points = torch.from_numpy(np.stack(norm, axis=-1).reshape(1, -1, 1, 1, 3))
    with torch.no_grad():
        out = torch.nn.functional.grid_sample(channels, points, mode="bilinear",
                                              padding_mode="border", align_corners=True)
    return out[0, :, :, 0, 0].numpy().reshape(channels.shape[1], *shape)


def _world_box(patient: Patient, lo: np.ndarray, hi: np.ndarray, margin: float) -> np.ndarray:
    """World box (2, 3) holding the template box ``[lo, hi]`` (mm) in the patient."""
    corners = np.array([[(lo, hi)[i >> k & 1][k] for k in range(3)] for i in range(8)])
    world = (corners - patient.offset) @ np.linalg.inv(patient.linear).T
    return np.stack([world.min(axis=0) - margin, world.max(axis=0) + margin])


def render_fractions(
    patient: Patient, profile: ScannerProfile, fine_mm: float = FINE_MM
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Tissue and label-class fractions of every native voxel (partial volume).

    Inside the brain's box each native voxel is sampled at most ``fine_mm`` apart (its spacing
    divided by a whole factor), each sample is mapped into the template and the template's
    maps are read there (trilinear), and the samples are averaged per voxel. The head's smooth
    shells are read once per voxel, with a partial-volume ramp one mean voxel wide.

    Args:
        patient: the deformation and head.
        profile: the scanner's grid.
        fine_mm: sub-grid spacing.

    Returns:
        ({name: fraction}: tissues ``csf``, ``gm``, ``wm``, ``scalp``, ``skull``, ``soft``
        (neck, below the template's floor); ``brain`` (mask), ``left_brain``, ``left_gm``,
        ``right_gm``, ``ventricles``, ``left_ventricles``; ``t1_residual`` (template T1
        texture, template units)), 4x4 affine.
    """
    template = load_template()
    # Once per voxel: the hull's signed distance and the template height (for the neck).
    voxels = fine_grid(profile, _world_box(patient, *template.head_box, 12.0),
                       fine_mm=max(profile.spacing) + 1.0)
    u = _to_template(patient, voxels)
    native = voxels.fine_shape[0::2]
    hull = _sample(template.hull, template.hull_affine, u, voxels.fine_shape)[0]
    hull = hull.reshape(native)
    hull = hull + patient.shell_waves.on_grid(voxels, np.eye(3), np.zeros(3)).reshape(native)
    width = float(np.mean(profile.spacing))
    floor = np.float32(template.head_box[0][2])
    neck = ramp(u[2].reshape(u[2].shape[0::2]) - floor, width)
    neck = np.broadcast_to(1 - neck, native)  # 1 below the template's floor

    # Every ~fine_mm inside the brain's box: tissue maps and the side (template x < 0: left).
    grid = fine_grid(profile, _world_box(patient, *template.brain_box, 8.0), fine_mm)
    u = _to_template(patient, grid)
    maps = dict(zip(Template.CHANNELS, _sample(template.volume, template.affine, u,
                                               grid.fine_shape), strict=True))
    left = ramp(u[0], float(np.mean(grid.step)))
    fine = {"brain": maps["brain"], "gm": maps["gm"], "wm": maps["wm"],
            "left_gm": maps["gm"] * left, "ventricles": maps["ventricles"],
            "left_brain": maps["brain"] * left, "left_ventricles": maps["ventricles"] * left,
            "t1_residual": maps["t1_residual"]}
    out = {name: grid.integrate(value) for name, value in fine.items()}
    out["right_gm"] = np.maximum(out["gm"] - out["left_gm"], 0.0)

    def embed(values: np.ndarray) -> np.ndarray:
        full = np.zeros(grid.shape, dtype=np.float32)
        full[voxels.box] = values
        return full

    hull, neck = embed(hull), embed(np.ascontiguousarray(neck))
    outside = np.ones(grid.shape, dtype=bool)
    outside[voxels.box] = False
    hull[outside] = np.float32(1e3)  # beyond the head's box: air
    brain = out["brain"]
    cavity = np.maximum(ramp(hull - np.float32(patient.csf_mm), width) * (1 - neck), brain)
    inner = np.maximum(ramp(hull - np.float32(patient.csf_mm + patient.skull_mm), width),
                       cavity)
    head = np.maximum(ramp(hull - np.float32(patient.csf_mm + patient.skull_mm
                                             + patient.scalp_mm), width), inner)
    out.update({
        "csf": np.maximum(cavity - out["gm"] - out["wm"], 0.0),
        "skull": (inner - cavity) * (1 - neck),
        "soft": (inner - cavity) * neck,
        "scalp": head - inner,
    })
    return out, grid.affine


def labels_from(fractions: dict[str, np.ndarray], label_set: str) -> np.ndarray:
    """A label map from native fractions: the brain mask (fraction >= 0.5); or inside it the
    parcellation class with the largest fraction (background if the voxel is mostly
    sulcal/cisternal CSF), or the hemispheres class with the largest fraction.

    Raises:
        ValueError: unknown ``label_set``.
    """
    if label_set not in LABEL_SETS:
        raise ValueError(f"label_set must be one of {sorted(LABEL_SETS)}, got {label_set!r}")
    brain = fractions["brain"] >= 0.5
    if label_set == "brain":
        return brain.astype(np.uint8)
    if label_set == "hemispheres":
        vent, left_vent = fractions["ventricles"], fractions["left_ventricles"]
        left = np.maximum(fractions["left_brain"] - left_vent, 0.0)
        right = np.maximum(fractions["brain"] - fractions["left_brain"] - vent + left_vent, 0.0)
        parts = np.stack([left, right, left_vent, np.maximum(vent - left_vent, 0.0)])
        return np.where(brain, np.argmax(parts, axis=0) + 1, 0).astype(np.uint8)
    classes = [fractions[k] for k in ("left_gm", "right_gm", "wm", "ventricles")]
    other = np.maximum(1.0 - sum(classes), 0.0)
    best = np.argmax(np.stack([other, *classes]), axis=0).astype(np.uint8)
    return np.where(brain, best, 0).astype(np.uint8)


def _signal(fractions: dict[str, np.ndarray], contrast: TissueContrast,
            t1_fit: np.ndarray) -> np.ndarray:
    """One channel's tissue signal; T1-weighted channels keep the template's T1 texture,
    scaled from the template's WM-CSF range to the contrast's."""
    tissues = {k: fractions[k] for k in ("csf", "gm", "wm", "scalp", "skull", "soft")}
    signal = tissue_signal(tissues, contrast)
    if contrast.wm > contrast.csf:  # T1-like: the template's own T1 texture applies
        gain = (contrast.wm - contrast.csf) / float(t1_fit[1] - t1_fit[2])
        signal = signal + fractions["t1_residual"] * np.float32(gain)
    return signal


def image_from(fractions: dict[str, np.ndarray], profile: ScannerProfile, channels: int,
               rng: np.random.Generator | None) -> np.ndarray:
    """The stored image (channels last when more than one) for native fractions; ``rng=None``
    renders without bias, PSF or noise."""
    t1_fit = load_template().t1_fit
    images = [acquire(_signal(fractions, contrast, t1_fit), profile, rng)
              for contrast in contrasts_of(profile, channels)]
    return images[0] if channels == 1 else np.stack(images, axis=-1)


def render(
    patient: Patient,
    profile: ScannerProfile,
    rng: np.random.Generator | None = None,
    *,
    channels: int = 1,
    label_set: str = "brain",
    fine_mm: float = FINE_MM,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A patient as the profile's scanner acquires it.

    Args:
        patient: the deformed template.
        profile: the scanner.
        rng: drives bias field and noise; ``None`` draws fresh OS entropy.
        channels: 1 (T1) or 2 (T1, T2; stacked last).
        label_set: a key of :data:`LABEL_SETS`.
        fine_mm: partial-volume sub-grid spacing.

    Returns:
        (image in the profile's dtype, label uint8, 4x4 affine).
    """
    rng = np.random.default_rng() if rng is None else rng
    fractions, affine = render_fractions(patient, profile, fine_mm)
    return (image_from(fractions, profile, channels, rng), labels_from(fractions, label_set),
            affine)


def render_truth(
    patient: Patient,
    profile: ScannerProfile,
    reference: ScannerProfile,
    *,
    channels: int = 1,
    fine_mm: float = FINE_MM,
) -> tuple[np.ndarray, np.ndarray]:
    """Paired truth (evaluation only): the patient through the reference scanner's contrast and
    curve, with no bias, PSF or noise, as float32 on the site's grid.

    Returns:
        (image, 4x4 affine equal to the site image's).
    """
    fractions, affine = render_fractions(patient, profile, fine_mm)
    return image_from(fractions, clean_profile(profile, reference), channels, None), affine


# --------------------------------------------------------------------------------------------
# Scanners and the federation
# --------------------------------------------------------------------------------------------

#: Sites' scanners: three orientations, near-isotropic and thick-slice grids, three contrasts.
SITE_PROFILES: dict[str, MRProfile] = {
    "site-a": MRProfile("site-a", "RAS", (1.5, 1.5, 1.5), fov_mm=HEAD_FOV, gamma=1.0,
                        bias_strength=0.2, noise_std=0.02, dtype="float32"),
    "site-b": MRProfile("site-b", "LPS", (1.2, 1.2, 3.0), fov_mm=HEAD_FOV, gamma=0.7,
                        bias_strength=0.35, noise_std=0.035, psf_fwhm=(0.0, 0.0, 1.5),
                        scale=1000.0, dtype="int16",
                        contrasts=(TissueContrast(csf=0.25, gm=0.55, wm=0.72, deep_gm=0.6,
                                                  scalp=0.85, skull=0.1, soft=0.4), T2)),
    "site-c": MRProfile("site-c", "PIL", (0.9, 0.9, 5.0), fov_mm=HEAD_FOV, gamma=1.4,
                        bias_strength=0.25, noise_std=0.05, psf_fwhm=(1.0, 1.0, 0.0),
                        scale=3000.0, offset=100.0, dtype="uint16",
                        contrasts=(T1, TissueContrast(csf=1.0, gm=0.6, wm=0.42, deep_gm=0.5,
                                                      scalp=0.7, skull=0.05, soft=0.3))),
}
#: The held-out site: a fourth scanner (coronal thick slices, strong noise in the air).
HELDOUT_PROFILE = MRProfile("heldout", "RSP", (1.0, 1.0, 4.0), fov_mm=HEAD_FOV, gamma=1.2,
                            bias_strength=0.3, noise_std=0.06, psf_fwhm=(1.2, 1.2, 0.0),
                            dtype="float32")
#: The reference scanner: canonical grid, linear curve, no bias, PSF or noise.
REFERENCE_PROFILE = MRProfile("reference", "RAS", (1.5, 1.5, 1.5), fov_mm=HEAD_FOV)

#: (folder, profile, cases, validation cases or None for the consumer's own split).
DEFAULT_LAYOUT: tuple[tuple[str, MRProfile, int, int | None], ...] = (
    ("site-a", SITE_PROFILES["site-a"], 16, 3),
    ("site-b", SITE_PROFILES["site-b"], 16, 3),
    ("site-c", SITE_PROFILES["site-c"], 16, 3),
)
DEFAULT_HELDOUT = ("heldout", HELDOUT_PROFILE, 4)
DEFAULT_REFERENCE_CASES = 12


@dataclass(frozen=True)
class RealFederation:
    """Where a generated federation lies.

    Attributes:
        root: the federation folder.
        sites: site name to its MSD folder (training data).
        heldout: the held-out site's MSD folder (another scanner; all cases under training).
        reference: the labelled public reference set (reference scanner, other patients).
        truth: site name (held-out included) to its paired-truth MSD folder: the same case
            ids, the reference scanner's clean image on the site's grid, the same labels.
            Evaluation only; never part of a site's training data.
    """

    root: Path
    sites: dict[str, Path]
    heldout: Path
    reference: Path
    truth: dict[str, Path]


def _entry(case_id: str) -> dict[str, str]:
    return {"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"}


def save_case(folder: Path, case_id: str, image: np.ndarray, label: np.ndarray,
              affine: np.ndarray) -> None:
    """Write one case's image (4D, channels last, when it has channels) and label (uint8)."""
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    _save_nifti(image, affine, folder / "imagesTr" / f"{case_id}.nii.gz")
    _save_nifti(label.astype(np.uint8), affine, folder / "labelsTr" / f"{case_id}.nii.gz")


def write_dataset_json(
    folder: Path,
    case_ids: list[str],
    validation_ids: list[str] | None,
    *,
    description: str,
    label_set: str,
    channels: int,
) -> None:
    """Write an MSD ``dataset.json`` for cases saved with :func:`save_case`.

    Args:
        folder: the dataset folder.
        case_ids: every case, in order.
        validation_ids: cases listed under ``validation``; None writes no such list.
        description: ``description`` entry.
        label_set: key of :data:`LABEL_SETS` (``labels`` entry, ``mirror_pairs``).
        channels: image channels (``modality`` and ``channel_names`` entries).
    """
    held = set(validation_ids or [])
    training = [_entry(c) for c in case_ids if c not in held]
    names = {str(i): CHANNEL_NAMES[i] for i in range(channels)}
    meta: dict[str, object] = {
        "name": folder.name,
        "description": description,
        "reference": CITATION,
        "licence": LICENCE,
        "release": REAL_VERSION,
        "tensorImageSize": "4D" if channels > 1 else "3D",
        "modality": names,
        "channel_names": names,
        "labels": LABEL_SETS[label_set],
        # Pairs swap with a left-right flip; a set without pairs (the brain mask) is symmetric.
        **({"mirror_pairs": MIRROR_PAIRS[label_set]} if MIRROR_PAIRS[label_set]
           else {"symmetric_labels": True}),
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }
    if validation_ids is not None:
        meta["validation"] = [_entry(c) for c in case_ids if c in held]
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")


def _describe(profile: ScannerProfile, seed: int, what: str) -> str:
    return (f"{what}: MNI ICBM152 2009a anatomy deformed per patient, scanner {profile.name} "
            f"({profile.orientation}, spacing {tuple(profile.spacing)} mm), seed {seed}")


def write_federation(
    root: Path,
    seed: int = 0,
    *,
    layout: tuple[tuple[str, ScannerProfile, int, int | None], ...] = DEFAULT_LAYOUT,
    heldout: tuple[str, ScannerProfile, int] = DEFAULT_HELDOUT,
    reference: ScannerProfile = REFERENCE_PROFILE,
    reference_cases: int = DEFAULT_REFERENCE_CASES,
    channels: int = 2,
    label_set: str = "parcellation",
    fine_mm: float = FINE_MM,
    paired_truth: bool = True,
    progress: Callable[[str], None] | None = None,
) -> RealFederation:
    """Generate a real-anatomy federation under ``root`` unless that exact one is there.

    Writes ``<site>/`` per layout row, ``<heldout>/``, ``reference/`` (the labelled public
    reference set: reference scanner, patients of no site; unless ``reference_cases`` is 0)
    and ``truth/<site>/`` (paired truth per site case, held-out site included; unless
    ``paired_truth`` is False), atomically (a temporary sibling is filled,
    marked complete and renamed into place). Case i of a site depends only on (seed, site, i).

    Args:
        root: destination; must be missing, empty or a previous federation of ours.
        seed: seed of every anatomy, bias field and noise.
        layout: (site, profile, cases, validation cases or None) per site.
        heldout: (name, profile, cases) of the held-out site.
        reference: the reference scanner.
        reference_cases: cases in the public reference set.
        channels: image channels (1: T1; 2: T1 and T2).
        label_set: key of :data:`LABEL_SETS`.
        fine_mm: partial-volume sub-grid spacing.
        paired_truth: also write the paired truth (harmonisation studies; segmentation
            studies do not need it, and it doubles the rendering).
        progress: called with one line per folder written.

    Returns:
        The folders (``truth`` empty without paired truth).

    Raises:
        DataError: ``root`` holds something else, or the template is missing.
        ValueError: bad ``label_set`` or ``channels``.
    """
    if label_set not in LABEL_SETS:
        raise ValueError(f"label_set must be one of {sorted(LABEL_SETS)}, got {label_set!r}")
    for _, profile, *_ in (*layout, heldout):
        contrasts_of(profile, channels)
    root = Path(root).expanduser()
    spec = json.dumps([REAL_VERSION, seed, [(n, repr(p), c, v) for n, p, c, v in layout],
                       [heldout[0], repr(heldout[1]), heldout[2]], repr(reference),
                       reference_cases, channels, label_set, fine_mm]
                      + ([] if paired_truth else ["no-truth"]))
    marker = f"{REAL_VERSION} seed={seed} {hashlib.sha256(spec.encode()).hexdigest()[:16]}\n"
    say = progress or (lambda line: None)

    def site(folder: Path, name: str, profile: ScannerProfile, n: int, n_val: int | None,
             truth: bool) -> None:
        ids = [f"{name}_{index:03d}" for index in range(n)]
        clean = clean_profile(profile, reference)
        for index, case_id in enumerate(ids):  # one case in memory at a time
            anatomy_rng, scanner_rng = case_rngs(seed, name, index)
            fractions, affine = render_fractions(sample_patient(anatomy_rng), profile, fine_mm)
            label = labels_from(fractions, label_set)
            save_case(folder / name, case_id,
                      image_from(fractions, profile, channels, scanner_rng), label, affine)
            if truth:
                save_case(folder / "truth" / name, case_id,
                          image_from(fractions, clean, channels, None), label, affine)
        val = None if n_val is None else ids[n - n_val:]
        write_dataset_json(folder / name, ids, val, description=_describe(profile, seed, name),
                           label_set=label_set, channels=channels)
        if truth:
            write_dataset_json(folder / "truth" / name, ids, None, label_set=label_set,
                               channels=channels, description=_describe(
                                   reference, seed, f"paired truth of {name} on its grid"))
        say(f"{name}: {n} cases ({profile.orientation}, {tuple(profile.spacing)} mm)")

    def write(folder: Path) -> None:
        for name, profile, n, n_val in layout:
            site(folder, name, profile, n, n_val, truth=paired_truth)
        site(folder, heldout[0], heldout[1], heldout[2], None, truth=paired_truth)
        if reference_cases:
            site(folder, "reference", reference, reference_cases, None, truth=False)

    _publish(root, marker, "real-anatomy federation", write)
    names = [n for n, *_ in layout] + [heldout[0]] if paired_truth else []
    return RealFederation(root=root, sites={n: root / n for n, *_ in layout},
                          heldout=root / heldout[0], reference=root / "reference",
                          truth={n: root / "truth" / n for n in names})


def default_root(seed: int = 0, channels: int = 2, label_set: str = "parcellation") -> Path:
    """Cache folder of a default-layout federation.

    Returns:
        ``$FEDSCAN_CACHE_DIR`` (or ``~/.cache/fedscan``) ``/realanatomy-v<format>-<label
        set>-<channels>ch-seed<seed>``.
    """
    base = os.environ.get("FEDSCAN_CACHE_DIR")
    cache = Path(base).expanduser() if base else Path.home() / ".cache" / "fedscan"
    return cache / f"realanatomy-v{REAL_FORMAT}-{label_set}-{channels}ch-seed{seed}"


def ensure_federation(seed: int = 0, channels: int = 2, label_set: str = "parcellation",
                      progress: Callable[[str], None] | None = None) -> RealFederation:
    """The default-layout federation in the cache folder, generated unless already there."""
    return write_federation(default_root(seed, channels, label_set), seed, channels=channels,
                            label_set=label_set, progress=progress)
