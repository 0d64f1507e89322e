"""Synthetic multi-hospital dataset of 3D head phantoms (fedscan's embedded default data).

A :class:`ScannerProfile` says how a hospital's scanner sees a head: voxel grid (orientation,
spacing, field of view), contrast, bias field, Rician noise and stored intensity range.
Keeping anatomy and scanner apart lets the same head be rendered under every profile, which
gives paired ground truth for scanner harmonisation.

The default federation's heads are the folded-cortex phantoms of
:mod:`fedscan.simulations.anatomy` (cortical ribbon, sulci, grey/white matter and CSF with
partial volume: what harmonisation must preserve). This module keeps the original smooth
ellipsoid head (:class:`Anatomy`, :func:`render`), which the artefact and bad-site datasets
still use. Label 1 is the brain (everything inside the brain's outline, sulcal CSF and
ventricles included), from the same geometry as the image, so it agrees in world space on
any grid.

The federation is written in the Medical Segmentation Decathlon layout (``dataset.json``,
``imagesTr/``, ``labelsTr/``), one folder per site, deterministically for a seed.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt

from fedscan.shared.errors import DataError
from fedscan.simulations import anatomy as folded
from fedscan.simulations.scanners import (
    CSF,
    DEEP_GM,
    GM,
    REFERENCE_PROFILE,
    SCALP,
    SKULL,
    SOFT,
    WM,
    ScannerProfile,
    bias_field,
    profile_grid,
    store_intensity,
)
from fedscan.simulations.shapes import cylinder_sdf, ellipsoid_sdf, rotation_matrix

#: Bump when the generator's output changes: it names the cache folder and the marker file.
#: 3: folded-cortex heads (2: smooth ellipsoids).
PHANTOM_FORMAT = 3
PHANTOM_VERSION = f"fedscan-phantoms-{PHANTOM_FORMAT}"
#: Marker written last into a generated federation; its presence means "complete".
COMPLETE_MARKER = ".complete"


# --------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------


# eq=False: numpy fields make generated __eq__/__hash__ fail; identity semantics suffice.
@dataclass(frozen=True, eq=False)
class Waves:
    """A sum of sinusoids ``sum_k amp_k * sin(freq_k . x + phase_k)``.

    Attributes:
        freq: (K, 3) angular frequencies (per unit of the argument ``x``).
        amp: (K,) amplitudes.
        phase: (K,) phases in radians.
    """

    freq: np.ndarray
    amp: np.ndarray
    phase: np.ndarray

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Evaluate at broadcastable coordinate arrays ``x, y, z``."""
        out = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape))
        for (fx, fy, fz), a, p in zip(self.freq, self.amp, self.phase, strict=True):
            out += a * np.sin(fx * x + fy * y + fz * z + p)
        return out


def _sample_waves(
    rng: np.random.Generator, k: int, freq: tuple[float, float], amp: tuple[float, float]
) -> Waves:
    """``k`` sinusoids with random directions, |frequency| in ``freq`` and amplitude in ``amp``."""
    direction = rng.normal(size=(k, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    return Waves(
        freq=direction * rng.uniform(*freq, size=(k, 1)),
        amp=rng.uniform(*amp, size=k),
        phase=rng.uniform(0.0, 2 * np.pi, size=k),
    )


@dataclass(frozen=True, eq=False)
class Anatomy:
    """One synthetic patient's head; every length is in mm, in the head's own frame.

    The head frame maps to world (RAS+) as ``world = rotation @ local + translation``.

    Attributes:
        head_radii: head ellipsoid radii (x, y, z).
        rotation: (3, 3) rotation matrix, local to world.
        translation: (3,) head centre in world coordinates.
        scalp_mm: scalp thickness (bright, fat-like).
        skull_mm: skull thickness (dark).
        csf_mm: mean CSF gap between skull and brain.
        brain_waves: brain surface perturbation (mm) as a function of the direction.
        gm_mm: mean cortical grey-matter thickness.
        gyri_waves: cortical thickness perturbation (mm), higher frequency than the surface.
        skull_base_z: height of the skull base (brain floor) at y = 0.
        skull_base_tilt: dz/dy of the skull base (posterior fossa lies lower).
        neck_radii: neck elliptic cylinder radii (x, y).
        neck_y: neck centre in y (the neck sits posterior to the head centre).
        neck_top: height where the neck starts.
        ventricle_centres: (2, 3) lateral ventricle centres.
        ventricle_radii: (2, 3) lateral ventricle radii.
        deep_gm_centres: (2, 3) basal ganglia centres.
        deep_gm_radii: (2, 3) basal ganglia radii.
        fissure_half_width: half width of the CSF-filled interhemispheric fissure.
        fissure_floor: height below which the hemispheres are joined (corpus callosum).
        texture: smooth multiplicative intensity texture (relative), world coordinates.
    """

    head_radii: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray
    scalp_mm: float
    skull_mm: float
    csf_mm: float
    brain_waves: Waves
    gm_mm: float
    gyri_waves: Waves
    skull_base_z: float
    skull_base_tilt: float
    neck_radii: np.ndarray
    neck_y: float
    neck_top: float
    ventricle_centres: np.ndarray
    ventricle_radii: np.ndarray
    deep_gm_centres: np.ndarray
    deep_gm_radii: np.ndarray
    fissure_half_width: float
    fissure_floor: float
    texture: Waves


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one random head.

    Args:
        rng: source of randomness; the same generator state gives the same head.

    Returns:
        The sampled anatomy.
    """
    head = np.array([rng.uniform(72, 82), rng.uniform(88, 102), rng.uniform(78, 92)])
    rotation = rotation_matrix(np.deg2rad(rng.uniform(-8, 8, size=3)))
    translation = rng.uniform(-8, 8, size=3)
    scalp, skull, csf = rng.uniform(4, 6), rng.uniform(5, 7), rng.uniform(2.5, 3.5)
    brain_z = head[2] - scalp - skull - csf

    # Ventricles: size varies a lot between patients (age, pathology), so scale them jointly.
    v_scale = rng.uniform(0.7, 1.4)
    v_x = rng.uniform(4.5, 7.5) * max(v_scale, 1.0)
    v_y, v_z = rng.uniform(-6, 4), rng.uniform(6, 13)
    v_r = np.array([rng.uniform(3.5, 5), rng.uniform(15, 20), rng.uniform(6, 9)]) * v_scale
    ventricle_centres = np.array([[-v_x, v_y, v_z], [v_x, v_y, v_z]])
    ventricle_radii = np.stack([v_r, v_r])

    d_x = v_x + v_r[0] + rng.uniform(8, 12)
    d_y, d_z = rng.uniform(-2, 6), rng.uniform(-6, 2)
    d_r = np.array([7.0, 12.0, 9.0]) * rng.uniform(0.85, 1.15)
    deep_gm_centres = np.array([[-d_x, d_y, d_z], [d_x, d_y, d_z]])

    return Anatomy(
        head_radii=head,
        rotation=rotation,
        translation=translation,
        scalp_mm=scalp,
        skull_mm=skull,
        csf_mm=csf,
        # Low angular frequencies (on the unit sphere of directions): lobes, not wrinkles.
        brain_waves=_sample_waves(rng, 4, freq=(1.0, 3.0), amp=(0.6, 1.4)),
        # Cortex is ~3 mm thick but folded; at 3.5-5 mm voxels gyri and sulci blur into a
        # grey band about twice that thick, which is what a low-resolution T1 shows.
        gm_mm=rng.uniform(6.0, 8.5),
        gyri_waves=_sample_waves(rng, 6, freq=(5.0, 10.0), amp=(0.5, 1.2)),
        skull_base_z=-rng.uniform(0.6, 0.72) * brain_z,
        skull_base_tilt=rng.uniform(0.1, 0.25),
        neck_radii=np.array([rng.uniform(48, 58), rng.uniform(50, 60)]),
        neck_y=-rng.uniform(10, 20),
        neck_top=-rng.uniform(30, 45),
        ventricle_centres=ventricle_centres,
        ventricle_radii=ventricle_radii,
        deep_gm_centres=deep_gm_centres,
        deep_gm_radii=np.stack([d_r, d_r]),
        fissure_half_width=rng.uniform(0.8, 1.6),
        fissure_floor=v_z + v_r[2] + rng.uniform(3, 6),
        # Wavelengths of 12-40 mm, a few percent each: tissue is not perfectly flat.
        texture=_sample_waves(rng, 5, freq=(2 * np.pi / 40, 2 * np.pi / 12), amp=(0.006, 0.014)),
    )


def _ramp(d: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Partial-volume fraction inside a boundary at signed distance ``d`` for a voxel whose
    extent across the boundary is ``width`` (box filter of a plane: a linear ramp)."""
    return np.clip(0.5 - d / width, 0.0, 1.0)


def _evaluate(
    anatomy: Anatomy, world: list[np.ndarray], spacing_world: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Intensity with partial volume and brain signed distance at voxel centres.

    Args:
        anatomy: the head.
        world: three broadcastable arrays of world x, y, z (mm) at voxel centres.
        spacing_world: voxel size along world x, y, z (mm).

    Returns:
        (intensity in [0, ~1], brain signed distance in mm, negative inside).
    """
    rot, t = anatomy.rotation, anatomy.translation
    # local = R^T (world - t), written per component so broadcasting builds the full grid.
    x, y, z = (sum(rot[j, k] * (world[j] - t[j]) for j in range(3)) for k in range(3))

    head_r = anatomy.head_radii
    d_ellipsoid = ellipsoid_sdf(x, y, z, head_r)
    d_neck = np.maximum(cylinder_sdf(x, y - anatomy.neck_y, anatomy.neck_radii),
                        z - anatomy.neck_top)
    d_head = np.minimum(d_ellipsoid, d_neck)

    # Partial-volume width: the voxel's extent along the boundary normal, |A^T n|. The head
    # ellipsoid's normal stands in for every nested shell (they are near-parallel).
    n_local = np.stack(np.broadcast_arrays(x / head_r[0] ** 2, y / head_r[1] ** 2,
                                           z / head_r[2] ** 2))
    n_world = np.tensordot(rot, n_local, axes=1)
    extent = np.sqrt(sum((spacing_world[j] * n_world[j]) ** 2 for j in range(3)))
    norm = np.sqrt(sum(n_world[j] ** 2 for j in range(3)))
    width = np.where(norm > 1e-12, extent / np.maximum(norm, 1e-12), spacing_world.mean())

    # Directions on the unit sphere (in ellipsoid-normalised coordinates) for the surface
    # perturbations: smooth everywhere, no seam or pole as with (theta, phi) angles.
    ux, uy, uz = x / head_r[0], y / head_r[1], z / head_r[2]
    un = np.maximum(np.sqrt(ux**2 + uy**2 + uz**2), 1e-9)
    ux, uy, uz = ux / un, uy / un, uz / un

    # Skull base: a tilted plane the brain sits on; below it are face and neck soft tissue.
    tilt = anatomy.skull_base_tilt
    zb = anatomy.skull_base_z + tilt * y
    plane = (zb - z) / math.sqrt(1.0 + tilt**2)  # negative above the skull base

    csf_gap = np.maximum(anatomy.csf_mm + anatomy.brain_waves(ux, uy, uz), 1.0)
    outer = anatomy.scalp_mm + anatomy.skull_mm
    # Below the brain floor: 3 mm of CSF, then a skull-base plate, then soft tissue.
    d_skull = np.maximum(d_head + anatomy.scalp_mm, plane - 3.0 - anatomy.skull_mm)
    d_cavity = np.maximum(d_head + outer, plane - 3.0)
    d_brain = np.maximum(d_head + outer + csf_gap, plane)
    gm = np.maximum(anatomy.gm_mm + anatomy.gyri_waves(ux, uy, uz), 1.5)
    d_wm = d_brain + gm

    def union(centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
        return np.minimum(*(ellipsoid_sdf(x - c[0], y - c[1], z - c[2], r)
                            for c, r in zip(centres, radii, strict=True)))

    d_vent = union(anatomy.ventricle_centres, anatomy.ventricle_radii)
    d_deep = union(anatomy.deep_gm_centres, anatomy.deep_gm_radii)

    # Memberships are nested (each distance >= the enclosing one), so differences are >= 0.
    h = _ramp(d_head, width)
    under_scalp = _ramp(d_head + anatomy.scalp_mm, width)
    skull = _ramp(d_skull, width)
    cavity = _ramp(d_cavity, width)
    brain = _ramp(d_brain, width)
    white = _ramp(d_wm, width)
    vent = _ramp(d_vent, width)
    deep = _ramp(d_deep, width)
    fissure = (_ramp(np.abs(x) - anatomy.fissure_half_width, width)
               * _ramp(anatomy.fissure_floor - z, width))

    core = WM * (1 - vent) * (1 - deep) + DEEP_GM * (1 - vent) * deep + CSF * vent
    parenchyma = GM * (brain - white) + core * white
    # The fissure is CSF inside the brain outline; the label keeps it (as skull-stripping
    # masks do), so it only changes the image.
    parenchyma = parenchyma * (1 - fissure) + CSF * brain * fissure
    image = (SCALP * (h - under_scalp) + SOFT * (under_scalp - skull) + SKULL * (skull - cavity)
             + CSF * (cavity - brain) + parenchyma)
    image = image * (1.0 + anatomy.texture(*world))
    return image, d_brain


# --------------------------------------------------------------------------------------------
# Scanner
# --------------------------------------------------------------------------------------------


#: The default federation's scanners (and the held-out one's).
SITE_PROFILES: dict[str, ScannerProfile] = {
    "site-a": ScannerProfile("site-a", "RAS", (4.0, 4.0, 4.0), gamma=1.0, bias_strength=0.15,
                             noise_std=0.02, dtype="float32"),
    "site-b": ScannerProfile("site-b", "LPS", (3.5, 3.5, 5.0), gamma=0.6, bias_strength=0.35,
                             noise_std=0.04, scale=1000.0, offset=0.0, dtype="int16"),
    "site-c": ScannerProfile("site-c", "PIL", (5.0, 3.5, 4.0), gamma=1.6, bias_strength=0.25,
                             noise_std=0.06, scale=3000.0, offset=100.0, dtype="uint16"),
}
HELDOUT_PROFILE = ScannerProfile("heldout", "LAS", (4.5, 4.5, 4.5), gamma=1.2,
                                 bias_strength=0.2, noise_std=0.03, dtype="float32")


def _grid_world(
    profile: ScannerProfile,
) -> tuple[tuple[int, int, int], np.ndarray, list[np.ndarray], np.ndarray]:
    """Shape, affine, broadcastable world x/y/z at voxel centres, spacing per world axis."""
    shape, affine = profile_grid(profile)
    ornt = axcodes2ornt(tuple(profile.orientation))
    world: list[np.ndarray] = [np.zeros(1)] * 3
    spacing_world = np.zeros(3)
    for i, (axis, _) in enumerate(ornt):
        axis = int(axis)
        along = [1, 1, 1]
        along[i] = shape[i]
        # Each world coordinate varies along one voxel axis only (no oblique grids).
        world[axis] = (affine[axis, i] * np.arange(shape[i]) + affine[axis, 3]).reshape(along)
        spacing_world[axis] = profile.spacing[i]
    return shape, affine, world, spacing_world


def render_clean(
    anatomy: Anatomy, profile: ScannerProfile
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render on the profile's grid with its contrast and storage, but no bias or noise.

    This is the harmonisation ground truth: the same grid and label as :func:`render`.

    Args:
        anatomy: the head.
        profile: the scanner profile.

    Returns:
        (image in the profile's dtype, label uint8 with 1 = brain, 4x4 affine).
    """
    shape, affine, world, spacing_world = _grid_world(profile)
    intensity, d_brain = _evaluate(anatomy, world, spacing_world)
    label = (d_brain < 0).astype(np.uint8)
    return store_intensity(intensity**profile.gamma, profile), label, affine


def render(
    anatomy: Anatomy, profile: ScannerProfile, rng: np.random.Generator | None = None,
    artefacts: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render a head as the profile's scanner acquires it: contrast, bias field, Rician noise.

    Args:
        anatomy: the head.
        profile: the scanner profile.
        rng: drives the bias field and the noise. ``None`` draws fresh OS entropy (numpy's
            convention), so pass a seeded generator for reproducible output.
        artefacts: optional acquisition artefacts (ghosts, coil hot spots), applied to the
            signal before the noise (``simulations/background.py``); the label is unchanged.

    Returns:
        (image in the profile's dtype, label uint8 with 1 = brain, 4x4 affine).
    """
    rng = np.random.default_rng() if rng is None else rng
    shape, affine, world, spacing_world = _grid_world(profile)
    intensity, d_brain = _evaluate(anatomy, world, spacing_world)
    label = (d_brain < 0).astype(np.uint8)
    # Order follows the physics: tissue contrast, coil sensitivity, then complex noise.
    signal = intensity**profile.gamma * bias_field(world, profile.bias_strength, rng)
    if artefacts is not None:
        signal = artefacts(signal, rng)
    if profile.noise_std > 0:
        real = signal + rng.normal(0.0, profile.noise_std, size=shape)
        imag = rng.normal(0.0, profile.noise_std, size=shape)
        signal = np.sqrt(real**2 + imag**2)
    return store_intensity(signal, profile), label, affine


# --------------------------------------------------------------------------------------------
# Dataset files
# --------------------------------------------------------------------------------------------


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    # Code 1 (scanner anatomical) in both, so every reader agrees on the same affine.
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def write_dataset(
    folder: Path,
    cases: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    validation_ids: list[str] | None,
    description: str,
) -> None:
    """Write cases as an MSD dataset: ``imagesTr/``, ``labelsTr/`` and ``dataset.json``.

    Args:
        folder: dataset folder (created if missing).
        cases: (case id, image, label, affine) per case; the image keeps its dtype
            (float64 is stored as float32), the label is stored as uint8.
        validation_ids: cases listed under ``validation`` instead of ``training``; ``None``
            writes no ``validation`` key.
        description: the ``description`` entry.

    Returns:
        None.
    """
    ids = [case_id for case_id, *_ in cases]
    if len(set(ids)) != len(ids):
        raise ValueError("write_dataset: case ids must be unique")
    unknown = sorted(set(validation_ids or []) - set(ids))
    if unknown:
        raise ValueError(f"write_dataset: validation ids not among the cases: {unknown}")
    folder = Path(folder)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)

    for case_id, image, label, affine in cases:
        if image.shape != label.shape:
            raise ValueError(f"write_dataset: {case_id}: image {image.shape} and label "
                             f"{label.shape} differ in shape")
        image = image.astype(np.float32) if image.dtype == np.float64 else image
        _save_nifti(image, affine, folder / "imagesTr" / f"{case_id}.nii.gz")
        _save_nifti(label.astype(np.uint8), affine, folder / "labelsTr" / f"{case_id}.nii.gz")

    def entry(case_id: str) -> dict[str, str]:
        return {"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"}

    held = set(validation_ids or [])
    training = [entry(i) for i in ids if i not in held]
    meta: dict[str, object] = {
        "name": folder.name,
        "description": description,
        "tensorImageSize": "3D",
        "licence": "CC0 (synthetic)",
        "release": PHANTOM_VERSION,
        "modality": {"0": "T1-phantom"},
        "labels": {"0": "background", "1": "brain"},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }
    if validation_ids is not None:
        meta["validation"] = [entry(i) for i in ids if i in held]
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# The default federation
# --------------------------------------------------------------------------------------------

#: (folder name, profile, number of cases, number of validation cases or None for no list).
#: Hundreds of training cases per site so that DP-SGD at ε=8 keeps ≥0.95x of non-private Dice
#: (noise per case shrinks with the cases: with 6-9 per site it kept 0.79x; see
#: ``fedscan bench dp-utility``); validation stays small, as it is evaluated every round.
FEDERATION_LAYOUT: tuple[tuple[str, ScannerProfile, int, int | None], ...] = (
    ("site-a", SITE_PROFILES["site-a"], 410, 10),
    ("site-b", SITE_PROFILES["site-b"], 380, 8),
    # No validation list: the consumer's deterministic val_fraction split must kick in
    # (0.2 of 50: 10 validation cases).
    ("site-c", SITE_PROFILES["site-c"], 50, None),
    ("heldout", HELDOUT_PROFILE, 4, None),
)


def case_rngs(seed: int, site: str, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for one case's anatomy and its scanner effects.

    Keyed by (seed, site name, case index), so adding a site or a case leaves the others
    unchanged, and the same anatomy can be re-rendered under another profile.

    Args:
        seed: federation seed.
        site: site folder name.
        index: case index within the site.

    Returns:
        (anatomy rng, scanner rng).
    """
    key = [seed, zlib.crc32(site.encode()), index]
    return np.random.default_rng([*key, 0]), np.random.default_rng([*key, 1])


def _marker_text(seed: int) -> str:
    return f"{PHANTOM_VERSION} seed={seed}\n"


def _is_marked(root: Path, marker: str) -> bool:
    try:
        return (root / COMPLETE_MARKER).read_text() == marker
    except OSError:
        return False


def _publish(root: Path, marker: str, what: str, write: Callable[[Path], None]) -> None:
    """Make ``root`` hold what ``write(folder)`` writes, unless it already carries ``marker``.

    Everything is written to a temporary sibling folder, marked complete and then renamed
    into place, so an interrupted run never leaves a half dataset at ``root``; a stale folder
    of ours (another version or seed) is replaced, anything else is refused.

    Raises:
        DataError: ``root`` exists and is not ours (``what`` names what we expected).
    """
    if _is_marked(root, marker):
        return
    ours = (root / COMPLETE_MARKER).is_file()
    if root.exists() and not ours and (not root.is_dir() or any(root.iterdir())):
        # Never delete a folder we did not write.
        raise DataError(f"{root}: exists and is not a fedscan {what}; remove it or choose "
                        "another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        (tmp / COMPLETE_MARKER).write_text(marker)
        if _is_marked(root, marker):
            return  # another process finished while we worked
        if (root / COMPLETE_MARKER).is_file():
            stale = root.parent / f".{root.name}.stale-{uuid.uuid4().hex[:8]}"
            os.replace(root, stale)
            shutil.rmtree(stale, ignore_errors=True)
        elif root.exists():
            root.rmdir()  # found empty above; fails loudly if someone has filled it since
        try:
            os.replace(tmp, root)
        except OSError:
            # Another process finished first; its result is as good as ours.
            if not _is_marked(root, marker):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: Partial-volume sub-grid of the default phantoms (mm): 3 samples across a 4 mm voxel. Against
#: 1 mm it renders ~2.5x faster and differs by ~0.002 RMS (noise is 0.02-0.06).
PHANTOM_FINE_MM = 1.34
#: Cases per site above which a site is rendered by a pool of processes (one per core).
PARALLEL_CASES = 16


def render_case(seed: int, site: str, index: int, profile: ScannerProfile
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Case ``index`` of ``site``: its folded-cortex head through the site's scanner.

    Returns:
        (image in the profile's dtype, brain mask uint8, 4x4 affine).
    """
    anatomy_rng, scanner_rng = case_rngs(seed, site, index)
    return folded.render(folded.sample_anatomy(anatomy_rng), profile, scanner_rng,
                         fine_mm=PHANTOM_FINE_MM)


def _workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def write_phantom_site(folder: Path, site: str, profile: ScannerProfile, n_cases: int,
                       n_val: int | None, seed: int) -> None:
    """Write one phantom hospital: cases ``<site>_000..`` rendered under ``profile``.

    Case i's head and scanner effects depend only on ``(seed, site, i)`` (:func:`case_rngs`),
    so its paired truth can be re-rendered (:func:`reference_truth`) and the files are the
    same whether the cases are rendered in one process or a pool.

    Args:
        folder: the site's dataset folder.
        site: the site name (keys the random streams).
        profile: the scanner.
        n_cases: number of cases.
        n_val: the last ``n_val`` cases are listed as validation; None writes no list.
        seed: the federation's seed.
    """
    args = [(seed, site, index, profile) for index in range(n_cases)]
    workers = min(_workers(), n_cases)
    if n_cases > PARALLEL_CASES and workers > 1:
        # spawn: the caller may hold torch's threads, which a fork would copy mid-state.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            rendered = list(pool.map(render_case, *zip(*args, strict=True), chunksize=8))
    else:
        rendered = [render_case(*a) for a in args]
    cases = [(f"{site}_{index:03d}", *case) for index, case in enumerate(rendered)]
    val_ids = None if n_val is None else [c[0] for c in cases[n_cases - n_val:]]
    description = (f"Synthetic T1-like folded-cortex head phantoms, scanner profile "
                   f"{profile.name} ({profile.orientation}, spacing {profile.spacing} mm), "
                   f"seed {seed}")
    write_dataset(folder, cases, val_ids, description)


def generate_federation(root: Path, seed: int = 0,
                        progress: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Generate the phantom federation under ``root`` unless it is already there.

    Writes ``site-a`` (410 cases, 10 validation), ``site-b`` (380, 8), ``site-c`` (50, no
    validation list) and ``heldout`` (4, all training): about 850 cases, ~0.5 s of CPU each
    (rendered on every core) and 300 MB, atomically (a temporary sibling renamed into place).

    Args:
        root: destination folder; must be missing, empty or a previous phantom federation.
        seed: seed for anatomies, bias fields and noise (same seed, identical files).
        progress: called with one line per site written (only when generating).

    Returns:
        Folder name (``site-a``, ``site-b``, ``site-c``, ``heldout``) to its dataset folder.
    """
    root = Path(root).expanduser()
    say = progress or (lambda line: None)

    def write(folder: Path) -> None:
        total = sum(n for _, _, n, _ in FEDERATION_LAYOUT)
        say(f"phantoms: generating the default hospitals once ({total} cases, ~0.5 s of CPU "
            f"each on {_workers()} core(s)) -> {root}")
        for site, profile, n_cases, n_val in FEDERATION_LAYOUT:
            write_phantom_site(folder / site, site, profile, n_cases, n_val, seed)
            say(f"phantoms: {site} written ({n_cases} cases)")

    _publish(root, _marker_text(seed), "phantom dataset", write)
    return {name: root / name for name, *_ in FEDERATION_LAYOUT}


def generate_site(root: Path, site: str, profile: ScannerProfile, n_cases: int,
                  n_val: int | None, seed: int = 0) -> Path:
    """Generate one more phantom hospital under ``root`` unless it is already there.

    Same anatomy and scanner model as :func:`generate_federation` (cases keyed by ``(seed,
    site, index)``), written atomically; e.g. a fourth site for a benchmark.

    Returns:
        ``root``.
    """
    root = Path(root).expanduser()
    marker = (f"{_marker_text(seed).strip()} site={site} cases={n_cases} val={n_val} "
              f"profile={profile!r}\n")
    _publish(root, marker, "phantom site",
             lambda folder: write_phantom_site(folder, site, profile, n_cases, n_val, seed))
    return root


def default_federation_root() -> Path:
    """Cache folder of the default federation (seed 0).

    Returns:
        ``$FEDSCAN_CACHE_DIR/phantoms-v3-seed0``, or ``~/.cache/fedscan/phantoms-v3-seed0``.
    """
    base = os.environ.get("FEDSCAN_CACHE_DIR")
    cache = Path(base).expanduser() if base else Path.home() / ".cache" / "fedscan"
    return cache / f"phantoms-v{PHANTOM_FORMAT}-seed0"


def ensure_default_federation(progress: Callable[[str], None] | None = None
                              ) -> dict[str, Path]:
    """Generate the default federation in the cache folder unless it is already there.

    Args:
        progress: as :func:`generate_federation`.

    Returns:
        Folder name to dataset folder, as :func:`generate_federation`.
    """
    return generate_federation(default_federation_root(), seed=0, progress=progress)


# --------------------------------------------------------------------------------------------
# Harmonisation: the public reference domain and paired ground truth
# --------------------------------------------------------------------------------------------

#: Cases in the default public reference-domain dataset.
REFERENCE_CASES = 16


def _reference_marker(seed: int, n_cases: int) -> str:
    return f"{PHANTOM_VERSION} reference seed={seed} cases={n_cases}\n"


def generate_reference_set(root: Path, seed: int = 0, n_cases: int = REFERENCE_CASES) -> Path:
    """Generate the public reference-domain dataset under ``root`` unless it is already there.

    Clean heads (:data:`REFERENCE_PROFILE`: RAS 4 mm, linear contrast, no bias or noise) of
    anatomies drawn under the site name ``"reference"``, so no site's patient appears in it.
    Written as one MSD folder (all cases under ``training``; labels are the brain masks,
    unused by harmonisation) to a temporary sibling, marked complete, then renamed into
    place, like :func:`generate_federation`.

    Args:
        root: destination folder; must be missing, empty or a previous reference set.
        seed: seed of the anatomies (same seed, identical files).
        n_cases: number of cases.

    Returns:
        ``root``.

    Raises:
        DataError: ``root`` holds something else.
    """
    root = Path(root).expanduser()

    def write(folder: Path) -> None:
        cases = []
        for index in range(n_cases):
            anatomy_rng, _ = case_rngs(seed, "reference", index)
            image, label, affine = folded.render_clean(folded.sample_anatomy(anatomy_rng),
                                                       REFERENCE_PROFILE, fine_mm=PHANTOM_FINE_MM)
            cases.append((f"reference_{index:03d}", image, label, affine))
        write_dataset(folder, cases, None,
                      f"Synthetic T1-like folded-cortex head phantoms in the harmonisation "
                      f"reference domain "
                      f"({REFERENCE_PROFILE.orientation}, {REFERENCE_PROFILE.spacing} mm, "
                      f"linear contrast, no bias or noise), seed {seed}")

    _publish(root, _reference_marker(seed, n_cases), "reference dataset", write)
    return root


def default_reference_root() -> Path:
    """Cache folder of the default reference set, next to the default federation."""
    return default_federation_root().parent / f"reference-v{PHANTOM_FORMAT}-seed0"


def ensure_reference_set() -> Path:
    """Generate the default reference set (seed 0) in the cache folder unless it is there."""
    return generate_reference_set(default_reference_root(), seed=0)


def reference_truth(
    seed: int, site: str, index: int, profile: ScannerProfile
) -> tuple[np.ndarray, np.ndarray]:
    """Paired ground truth for harmonisation (evaluation only, never for training).

    The same head as case ``index`` of ``site`` in a federation generated with ``seed``,
    rendered as the reference domain sees tissue (linear contrast, no bias or noise, stored
    as plain ``float32``) but on the site's own grid (orientation, spacing, field of view of
    ``profile``), so it compares voxel by voxel with the site's image and with a harmonised
    output, which stays in the input's grid.

    Args:
        seed: the federation's seed.
        site: the site's folder name (as in :data:`FEDERATION_LAYOUT`).
        index: the case index within the site.
        profile: the site's scanner profile (only its grid is used).

    Returns:
        (image ``float32``, 4x4 affine), the affine equal to the site image's.
    """
    anatomy_rng, _ = case_rngs(seed, site, index)
    return folded.render_truth(folded.sample_anatomy(anatomy_rng), profile, REFERENCE_PROFILE,
                               fine_mm=PHANTOM_FINE_MM)
