"""Deterministic preprocessing shared by training, evaluation and prediction.

Every pipeline (train, evaluate, predict, later harmonisation) starts with the same
:func:`preprocess_transforms`, so all sites and the server feed the model one grid
(orientation and spacing from :class:`~fedscan.shared.config.DataConfig`) and one
intensity scale. The spatial steps are traced on MetaTensors, so ``monai.transforms.Invertd``
maps any output on that grid back to the input's native voxel grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.config import DtypeLike, KeysCollection
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)
from monai.transforms.utils_pytorch_numpy_unification import percentile
from monai.utils import convert_to_tensor

from fedscan.shared.config import DataConfig

#: Below this fraction of voxels above the image minimum, percentiles use every voxel.
MIN_FOREGROUND_FRACTION = 0.01

#: Axis-code pairs of nibabel's RAS+ world (``Orientationd`` labels).
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))

#: dtype of preprocessed label maps (class indices; ``num_classes`` is far below 256).
LABEL_DTYPE = torch.uint8


def is_label_key(key: str) -> bool:
    """Whether ``key`` holds a label map (nearest resampling, integer classes)."""
    return "label" in key


class ForegroundPercentileScale(ScaleIntensityRangePercentiles):
    """``ScaleIntensityRangePercentiles`` with the percentiles taken over non-background voxels.

    Real scans carry large constant backgrounds (zero-filled MR, -1024/-3024 HU padding
    outside a CT field of view) whose share of the volume depends on the scanner's field of
    view. Percentiles over all voxels would then map the same tissue to different values at
    different sites, so voxels equal to the image minimum are left out, unless nearly every
    voxel is. Non-finite values, which some exporters write outside the body, become that
    minimum first.
    """

    def _normalize(self, img: torch.Tensor) -> torch.Tensor:
        img = convert_to_tensor(img, track_meta=False)
        finite = torch.isfinite(img)
        low = float(img[finite].min()) if bool(finite.any()) else 0.0
        if not bool(finite.all()):
            img = torch.where(finite, img, torch.full_like(img, low))
        above = img[img > low]
        sample = above if above.numel() >= MIN_FOREGROUND_FRACTION * img.numel() else img
        a_min = float(percentile(sample, self.lower))
        a_max = float(percentile(sample, self.upper))
        scale = ScaleIntensityRange(
            a_min=a_min, a_max=a_max, b_min=self.b_min, b_max=self.b_max, clip=self.clip,
            dtype=self.dtype,
        )
        # Plain tensor out, so the parent re-attaches the input's meta and trace.
        return convert_to_tensor(scale(img), track_meta=False)


class ForegroundPercentileScaled(ScaleIntensityRangePercentilesd):
    """Dictionary wrapper of :class:`ForegroundPercentileScale` (same arguments as the parent)."""

    def __init__(self, keys: KeysCollection, lower: float, upper: float, b_min: float,
                 b_max: float, clip: bool = False, channel_wise: bool = False,
                 dtype: DtypeLike = np.float32, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, lower, upper, b_min, b_max, clip=clip, channel_wise=channel_wise,
                         dtype=dtype, allow_missing_keys=allow_missing_keys)
        self.scaler = ForegroundPercentileScale(lower, upper, b_min, b_max, clip=clip,
                                                channel_wise=channel_wise, dtype=dtype)


def preprocess_transforms(data: DataConfig, keys: Sequence[str] = ("image", "label")) -> Compose:
    """The deterministic, invertible preprocessing every pipeline starts with.

    Load (NIfTI, any orientation, spacing and dtype), channel first, reorient to
    ``data.orientation``, resample to ``data.spacing`` mm, and map image intensities from
    the ``data.intensity_percentiles`` of the non-background voxels to ``[0, 1]`` (clipped).

    Args:
        data: the run's data config.
        keys: dictionary keys holding file paths. Keys containing ``"label"`` are label
            maps (nearest resampling, rounded to integer classes, ``uint8``); the others are
            images (bilinear resampling, intensity scaling, ``float32``).

    Returns:
        A ``Compose`` whose outputs are MetaTensors carrying the applied spatial operations,
        so ``Invertd(transform=<this>, orig_keys=<image key>)`` returns to the input grid.
    """
    keys = tuple(keys)
    images = tuple(k for k in keys if not is_label_key(k))
    labels = tuple(k for k in keys if is_label_key(k))
    lower, upper = data.intensity_percentiles
    steps = [
        LoadImaged(keys, reader="NibabelReader", image_only=True, dtype=np.float32),
        EnsureChannelFirstd(keys),
        # nibabel affines are RAS+ world coordinates: say so rather than rely on a default.
        Orientationd(keys, axcodes=data.orientation, labels=RAS_LABELS),
        # float32 resampling halves the memory of float64 on large native grids.
        Spacingd(keys, pixdim=data.spacing,
                 mode=["nearest" if is_label_key(k) else "bilinear" for k in keys],
                 dtype=np.float32),
    ]
    if images:
        steps.append(ForegroundPercentileScaled(images, lower=lower, upper=upper, b_min=0.0,
                                                b_max=1.0, clip=True, channel_wise=True))
        steps.append(EnsureTyped(images, dtype=torch.float32, track_meta=True))
    if labels:
        # Labels stored as floats (or with scl_slope) may read as 0.99999: round, then cast.
        steps.append(AsDiscreted(labels, rounding="torchrounding"))
        steps.append(EnsureTyped(labels, dtype=LABEL_DTYPE, track_meta=True))
    return Compose(steps)
