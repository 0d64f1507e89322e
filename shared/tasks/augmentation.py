"""Augmentation that never corrupts labels: lateral flips and background artefacts.

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

:func:`background_artefacts` puts into the background of a training patch what scanners the
federation never saw put around a head (a Rician noise floor, bright coil hot spots), so the
network learns that signal outside the anatomy is not anatomy, without post-processing.
The artefacts are MONAI's (``RandRicianNoise``, ``RandCoarseDropout``);
:class:`RandBackgroundd` confines them to voxels labelled background.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import (
    Compose,
    Flipd,
    Identityd,
    MapLabelValued,
    MapTransform,
    OneOf,
    RandCoarseDropout,
    Randomizable,
    RandRicianNoise,
)
from monai.utils import convert_to_tensor

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


class RandBackgroundd(Randomizable, MapTransform):
    """Apply a random intensity transform to an image only where the label is background.

    The label is read, never written; image voxels of any foreground class keep their value.

    Args:
        keys: image keys (channel-first; every channel gets the same mask).
        label_key: the label map (``(1, *spatial)``) whose zeros are the background.
        transform: an array-level MONAI transform (its random state is set through this
            one's, so ``Compose.set_random_state`` seeds it).
    """

    def __init__(self, keys: Sequence[str], label_key: str, transform: Compose) -> None:
        MapTransform.__init__(self, keys)
        self.label_key = label_key
        self.transform = transform

    def set_random_state(self, seed: int | None = None,
                         state: np.random.RandomState | None = None) -> RandBackgroundd:
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed=int(self.R.randint(2**31)))
        return self

    def randomize(self, data: Any = None) -> None:  # the wrapped transforms draw their own
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        background = convert_to_tensor(d[self.label_key], track_meta=False) == 0
        for key in self.key_iterator(d):
            image = convert_to_tensor(d[key], track_meta=False)
            changed = convert_to_tensor(self.transform(image.clone()), track_meta=False)
            d[key] = torch.where(background, changed.to(image.dtype), image)
        return d


def background_artefacts(keys: Sequence[str], label_key: str, patch: Sequence[int],
                         prob: float = 0.3) -> RandBackgroundd:
    """Signal in the background as unseen scanners show it, on images scaled to about [0, 1].

    A Rician noise floor (std drawn up to 0.15, several times the training sites') and up
    to four bright boxes (coil hot spots, other bright structures), each with probability
    ``prob``, only where the label is background (:class:`RandBackgroundd`).

    Args:
        keys: image keys.
        label_key: the label key.
        patch: the training patch size (the boxes are up to a quarter of it).
        prob: probability of each artefact.
    """
    box = [max(1, p // 8) for p in patch]
    return RandBackgroundd(keys, label_key, Compose([
        RandRicianNoise(prob=prob, std=0.15, relative=False, sample_std=True),
        RandCoarseDropout(holes=1, max_holes=4, spatial_size=box,
                          max_spatial_size=[max(1, p // 4) for p in patch], fill_value=(0.2, 1.0),
                          prob=prob),
    ]))
