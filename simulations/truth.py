"""Paired truth of the harmonisation study: a site's ``truth:`` folder, the head mask, the
round-trip ceiling.

A site's ``truth:`` (simulation only) is an MSD folder with the site's case ids whose images
are each case's anatomy through the reference scanner on the case's own grid (what
:func:`~fedscan.simulations.realanatomy.write_federation` writes to ``truth/<site>/``). The
study scores raw and harmonised images against it on the native grid, over the whole volume
and inside the head, beside the identity round-trip ceiling: the truth itself sent to the
model's grid and back, which is the best any harmoniser on that grid can score.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from fedscan.shared.config import Config, DataConfig, SiteConfig
from fedscan.shared.data import AFFINE_ATOL, load_nifti, read_dataset, read_site
from fedscan.shared.errors import ConfigError, DataError

#: Head mask threshold: this fraction of the 99th percentile of the non-background voxels.
HEAD_FRACTION = 0.1


def read_truth(site: SiteConfig, index: int, data: DataConfig) -> dict[str, str]:
    """The truth image of every case of a site with ``truth:``, checked against the case.

    Reads headers only: every case id of the site must have a truth image of the same shape
    (channels included) and affine (within the data contract's tolerance).

    Args:
        site: the site (``site.truth`` set).
        index: its position in ``sites`` (for the key in messages).
        data: the run's data config (the site's split and channels).

    Returns:
        Case id -> truth image file.

    Raises:
        ConfigError: one line naming ``sites[<index>].truth`` and the folder or file at fault.
    """
    key = f"config key 'sites[{index}].truth'"
    try:
        truth = read_dataset(site.truth, name=f"{site.name} truth", check=False, labelled=False,
                             in_channels=data.in_channels)
    except DataError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    paths = {c["case"]: c["image"] for c in truth.cases}
    cases = read_site(site, data, check=False).cases
    missing = [c["case"] for c in cases if c["case"] not in paths]
    if missing:
        raise ConfigError(f"{key}: {truth.root} has no truth for case '{missing[0]}' of site "
                          f"'{site.name}' ({len(missing)} of {len(cases)} cases missing)")
    for case in cases:
        image = load_nifti(case["image"], header_only=True)
        try:
            found = load_nifti(paths[case["case"]], "truth image", header_only=True)
        except DataError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        if (tuple(found.shape) != tuple(image.shape)
                or not np.allclose(found.affine, image.affine, rtol=0.0, atol=AFFINE_ATOL)):
            raise ConfigError(f"{key}: {paths[case['case']]} is not on the grid of its case "
                              f"{case['image']} (shape {tuple(found.shape)} vs "
                              f"{tuple(image.shape)}, or another affine)")
    return {c["case"]: paths[c["case"]] for c in cases}


def check_truth(cfg: Config) -> None:
    """Check every ``sites[].truth`` of ``cfg`` before any training (:func:`read_truth`)."""
    for i, site in enumerate(cfg.sites):
        if site.truth is not None:
            read_truth(site, i, cfg.data)


def load_truth(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A truth image file as ``(float32 array as stored, affine)``."""
    img = load_nifti(path, "truth image")
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


def channels_first(array: np.ndarray) -> np.ndarray:
    """A nibabel-ordered image (3D, or 4D with channels last) as ``(C, X, Y, Z)``."""
    array = np.asarray(array)
    return array[None] if array.ndim == 3 else np.moveaxis(array, -1, 0)


def head_mask(truth: np.ndarray) -> np.ndarray:
    """The head in a truth image: everything but the air around it.

    A voxel is head where any channel exceeds :data:`HEAD_FRACTION` of that channel's 99th
    percentile over its non-background voxels; the largest connected component is kept
    (specks of noise in the air go) and its holes are filled, in 3D and then slice by slice
    along each axis (a hole left open where the field of view cuts the neck is closed in
    the slices across it). Dark tissue inside the head (skull, CSF) is below the threshold
    and comes back with the holes; only the air floor must stay below it, which a fixed
    fraction guarantees whatever the share of air in the field of view (Otsu's threshold
    moves with that share and lands between dark and bright tissue).

    Args:
        truth: ``(C, X, Y, Z)`` or 3D.

    Returns:
        Boolean mask of the spatial shape.
    """
    truth = np.asarray(truth, dtype=np.float32)
    channels = truth if truth.ndim == 4 else truth[None]
    mask = np.zeros(channels.shape[1:], dtype=bool)
    for channel in channels:
        above = channel[channel > channel.min()]
        if above.size:
            mask |= channel > HEAD_FRACTION * np.percentile(above, 99)
    components, count = ndimage.label(mask)
    if count > 1:
        sizes = ndimage.sum_labels(mask, components, index=np.arange(1, count + 1))
        mask = components == 1 + int(np.argmax(sizes))
    mask = ndimage.binary_fill_holes(mask)
    for axis in range(mask.ndim):
        slices = [ndimage.binary_fill_holes(s) for s in np.moveaxis(mask, axis, 0)]
        mask |= np.moveaxis(np.stack(slices), 0, axis)
    return mask
