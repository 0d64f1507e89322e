"""Spatial augmentation that never corrupts labels.

A left-right flip turns a left structure into a right one. For a label set with lateralised
classes (left and right hemisphere, left and right hippocampus) a plain flip teaches the
network that a left structure seen on the right is still "left". :func:`lateral_flip`
therefore swaps the declared pairs (``data.mirror_pairs`` or dataset.json ``mirror_pairs``)
with every flip. With nothing declared and the label set not declared symmetric
(``data.symmetric_labels``) there is no left-right flip at all (:func:`lateral_swap`): a user
who declares nothing loses an augmentation, never label correctness.

The flip and the relabelling are MONAI's (``Flipd``, ``MapLabelValued``, chosen together or
not at all by ``OneOf``). The flipped axis is the one that runs left-right in the
preprocessed image: preprocessing reorients every image to ``data.orientation``
(``Orientationd``), so that is where ``L`` or ``R`` stands in that code (axis 0 in ``RAS``,
``LPS``; axis 2 in ``PIL``), whatever the orientation the files were stored in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import nibabel as nib
import numpy as np
from monai.transforms import Compose, Flipd, Identityd, MapLabelValued, OneOf

from fedscan.shared.config import DataConfig
from fedscan.shared.preprocessing import LABEL_DTYPE


def lateral_axis(orientation: str) -> int:
    """The spatial axis (0-based) running left-right in an orientation code.

    Args:
        orientation: three axis codes such as ``RAS``, ``LPS`` or ``PIL``.

    Returns:
        The index of ``L`` or ``R`` in the code.

    Raises:
        ValueError: the code has no ``L``/``R`` axis.
    """
    for axis, code in enumerate(orientation.upper()):
        if code in "LR":
            return axis
    raise ValueError(f"orientation {orientation!r} has no left-right axis (L or R)")


def lateral_axis_of(affine: np.ndarray) -> int:
    """The voxel axis closest to the world's left-right axis, from a voxel-to-RAS affine."""
    return lateral_axis("".join(nib.aff2axcodes(np.asarray(affine))))


def lateral_swap(data: DataConfig) -> dict[int, int] | None:
    """How a left-right flip must relabel, or None when the label set allows no flip.

    Returns:
        ``{1: 2, 2: 1, ...}`` for declared mirror pairs (flip and swap); ``{}`` for a label
        set declared symmetric (flip, no swap); None when neither is declared (no flip).
    """
    if data.mirror_pairs:
        swap = {}
        for a, b in data.mirror_pairs:
            swap[a], swap[b] = b, a
        return swap
    return {} if data.symmetric_labels else None


def lateral_flip(keys: Sequence[str], label_key: str, spatial_axis: int,
                 swap: Mapping[int, int], prob: float = 0.5) -> OneOf:
    """With probability ``prob``, flip every key along ``spatial_axis`` and relabel the
    mirror-paired classes of ``label_key``; otherwise leave the item unchanged.

    Args:
        keys: image and label keys (channel-first arrays or tensors).
        label_key: the key whose classes ``swap`` relabels.
        spatial_axis: the left-right spatial axis (:func:`lateral_axis`).
        swap: class to class (:func:`lateral_swap`; empty: flip only).
        prob: flip probability.

    Returns:
        A randomizable MONAI transform (its random state is set through ``Compose``).
    """
    flip: list = [Flipd(list(keys), spatial_axis=spatial_axis)]
    if swap:
        # MapLabelValue masks on the input, so a -> b and b -> a swap rather than merge.
        flip.append(MapLabelValued(label_key, orig_labels=list(swap),
                                   target_labels=list(swap.values()), dtype=LABEL_DTYPE))
    return OneOf([Compose(flip), Identityd(list(keys))], weights=[prob, 1.0 - prob])
