"""Deterministic preprocessing shared by training, evaluation and prediction.

Every pipeline (train, evaluate, predict, harmonise) starts with the same
:func:`preprocess_transforms`, so all sites and the server feed the model one grid
(orientation and spacing from :class:`~fedscan.shared.config.DataConfig`) and one
intensity scale. The spatial steps are traced on MetaTensors, so ``monai.transforms.Invertd``
maps any output on that grid back to the input's native voxel grid.

:func:`preprocess_case` runs it on one case's files with the checks and one-line errors of the
data contract; :func:`cached_case` adds a process-wide cache for training, where a site
preprocesses the same cases every round.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import DtypeLike, KeysCollection, NdarrayOrTensor
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)
from monai.transforms.utils_pytorch_numpy_unification import percentile
from monai.utils import convert_to_tensor

from fedscan.shared.config import DataConfig
from fedscan.shared.data import check_label_values, load_nifti
from fedscan.shared.errors import DataError, root_cause

#: Below this fraction of voxels above the image minimum, percentiles use every voxel.
MIN_FOREGROUND_FRACTION = 0.01

#: Axis-code pairs of nibabel's RAS+ world (``Orientationd`` labels).
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))

#: dtype of preprocessed label maps (class indices; values are checked below ``num_classes``,
#: at most 256, before the cast).
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

    ``ranges`` holds the ``(a_min, a_max)`` of the last call, one pair per channel scaled, so
    the same map can be applied to the image on another grid (``fedscan harmonize`` applies
    its intensity curve to the scan's own grid).
    """

    ranges: list[tuple[float, float]]

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        self.ranges = []
        return super().__call__(img)

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
        self.ranges.append((a_min, a_max))
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


class CheckLabelValuesd(MapTransform):
    """Label values as read must be integer classes in ``[0, num_classes)``.

    Runs right after loading, before resampling (which could drop a stray bad voxel) and
    before the ``uint8`` cast (which would wrap 256 to 0 and -1 to 255). Raises the data
    contract's one-line :class:`DataError` naming the file.
    """

    def __init__(self, keys: KeysCollection, num_classes: int) -> None:
        super().__init__(keys)
        self.num_classes = num_classes

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            path = getattr(value, "meta", {}).get("filename_or_obj", key)
            check_label_values(path, convert_to_tensor(value, track_meta=False).numpy(),
                               self.num_classes)
        return d


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
        *([CheckLabelValuesd(labels, data.num_classes)] if labels else []),
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


# -- one case's files in, checked tensors out ----------------------------------------------------


def preprocess_case(case: Mapping[str, str], data: DataConfig,
                    keys: Sequence[str] = ("image", "label")) -> tuple[dict[str, Any], Compose]:
    """Preprocess the files of one case, with one-line errors naming the file at fault.

    Each file's header is read first; label values must be classes below
    ``data.num_classes`` as read (:func:`~fedscan.shared.data.check_label_values`, before
    resampling and the ``uint8`` cast); after preprocessing every image must have
    ``data.in_channels`` channels, and every label one channel on its image's grid.

    Args:
        case: file paths by key (``image``, ``label``, ...).
        data: the run's data config.
        keys: the keys to load; see :func:`preprocess_transforms` for label keys.

    Returns:
        ``(outputs, transform)``: MetaTensors by key, and the transform (to invert outputs).

    Raises:
        DataError: a file is missing, unreadable or cannot be preprocessed, or a check fails.
    """
    keys = tuple(keys)
    for k in keys:
        load_nifti(case[k], _what(k), header_only=True)
    pre = preprocess_transforms(data, keys)
    try:
        out = pre({k: str(case[k]) for k in keys})
    except Exception as exc:  # MONAI wraps reader errors in RuntimeError chains
        if isinstance(root_cause(exc), DataError):  # a label check: already one line
            raise DataError(str(root_cause(exc))) from None
        raise DataError(_failure(case, keys, exc)) from None
    images = [k for k in keys if not is_label_key(k)]
    for k in images:
        if out[k].shape[0] != data.in_channels:
            raise DataError(f"{case[k]}: has {out[k].shape[0]} channel(s), data.in_channels is "
                            f"{data.in_channels}")
    grid = tuple(out[images[0]].shape[1:]) if images else None
    for k in keys:
        if not is_label_key(k):
            continue
        if out[k].shape[0] != 1 or (grid is not None and tuple(out[k].shape[1:]) != grid):
            raise DataError(f"{case[k]}: grid {tuple(out[k].shape[1:])} does not match its "
                            f"image's {grid} after resampling")
    return out, pre


def _what(key: str) -> str:
    return "label" if is_label_key(key) else "image"


def _failure(case: Mapping[str, str], keys: Sequence[str], exc: Exception) -> str:
    """One line naming the file that broke preprocessing (a full read finds corrupt data)."""
    for k in keys:
        try:
            load_nifti(case[k], _what(k))
        except DataError as read_error:  # truncated or corrupt data only fails when read
            return str(read_error)
    root = root_cause(exc)
    why = str(root).strip().splitlines()
    return (f"{' / '.join(str(case[k]) for k in keys)}: could not be preprocessed "
            f"({type(root).__name__}{': ' + why[0] if why else ''})")


#: Bytes of preprocessed volumes a process keeps between rounds.
CACHE_BYTES = 2 * 1024**3


class VolumeCache:
    """Process-wide LRU of preprocessed training volumes, bounded in bytes.

    A site trains every round in the same process; reloading and resampling its cases each
    round would dominate short rounds. Keys hold the file paths, their size and mtime, and
    the data config, so a changed file or preprocessing never hits a stale entry.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> dict[str, torch.Tensor] | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key: tuple, value: dict[str, torch.Tensor]) -> None:
        size = sum(v.numel() * v.element_size() for v in value.values())
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= sum(v.numel() * v.element_size() for v in old.values())

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


VOLUME_CACHE = VolumeCache(CACHE_BYTES)


def _file_key(path: str, what: str) -> tuple:
    """Cache key part of a file: its resolved path, size and mtime (a changed file misses)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} file not found: {p}")
    st = p.stat()
    return str(p.resolve()), st.st_size, st.st_mtime_ns


def cached_case(case: Mapping[str, str], data: DataConfig,
                keys: Sequence[str] = ("image", "label")) -> dict[str, torch.Tensor]:
    """:func:`preprocess_case`'s outputs as plain contiguous tensors, from the cache if there.

    Callers must not modify the tensors (transforms work on copies).
    """
    keys = tuple(keys)
    key = (keys, *(_file_key(case[k], _what(k)) for k in keys),
           json.dumps(asdict(data), sort_keys=True))
    hit = VOLUME_CACHE.get(key)
    if hit is not None:
        return hit
    out, _ = preprocess_case(case, data, keys)
    value = {k: out[k].as_tensor().contiguous() for k in keys}
    VOLUME_CACHE.put(key, value)
    return value
