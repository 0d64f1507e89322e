"""DICOM Segmentation (SEG) objects: read one onto its series' grid, write one for a prediction.

highdicom does the DICOM work both ways. A SEG is placed on its series through the source
images each frame references (Derivation/Source Image Sequence, which SEG writers such as
highdicom, dcmqi and 3D Slicer fill), never by guessing from positions. Segments become
integer classes: fedscan trains on one class per voxel, so overlapping segments are refused,
and fractional segments count where their value is at least 0.5.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from fedscan import __version__
from fedscan.shared.dicom_io import SeriesVolume
from fedscan.shared.errors import DataError


def _why(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:140]}" if lines else type(exc).__name__


def referenced_series(path: Path, header: Dataset) -> str:
    """The SeriesInstanceUID a SEG segments (its ReferencedSeriesSequence).

    Raises:
        DataError: the SEG names no series, or several.
    """
    refs = header.get("ReferencedSeriesSequence") or []
    uids = {str(item.get("SeriesInstanceUID", "")) for item in refs} - {""}
    if len(uids) != 1:
        raise DataError(f"{path}: SEG must reference exactly one image series "
                        f"(ReferencedSeriesSequence names {len(uids)})")
    return uids.pop()


def segment_names(path: Path, header: Dataset) -> dict[int, str]:
    """Segment number -> label (SegmentLabel, stripped) of a SEG.

    Raises:
        DataError: the SEG has no segments or two segments share a label.
    """
    names: dict[int, str] = {}
    for item in header.get("SegmentSequence") or []:
        names[int(item.SegmentNumber)] = str(item.get("SegmentLabel", "")).strip() \
            or f"segment {int(item.SegmentNumber)}"
    if not names:
        raise DataError(f"{path}: SEG has no segments (empty SegmentSequence)")
    lowered = [n.lower() for n in names.values()]
    if len(set(lowered)) != len(lowered):
        dup = next(n for n in names.values() if lowered.count(n.lower()) > 1)
        raise DataError(f"{path}: two segments share the label {dup!r}; labels name classes")
    return names


def _single_multiframe(volume: SeriesVolume, path: Path) -> None:
    """SEGs of multi-frame images are supported when the series is one such file."""
    if len({p.file for p in volume.planes}) > 1:
        raise DataError(f"{path}: SEGs of a series made of several multi-frame files are not "
                        "supported")


def read_seg_labels(path: Path, volume: SeriesVolume, class_of_segment: dict[int, int]
                    ) -> np.ndarray:
    """A SEG's segments as a class map on the series' voxel grid.

    Args:
        path: the SEG file.
        volume: the series it references, as read by
            :func:`fedscan.shared.dicom_io.read_series`.
        class_of_segment: the class index each segment number becomes (every segment of the
            SEG must be present).

    Returns:
        ``uint8`` (or wider) class indices with the shape of ``volume.image`` (column, row,
        slice).

    Raises:
        DataError: one line naming the SEG: unreadable, references instances outside the
            series, a frame size that differs from the images', or overlapping segments.
    """
    multiframe = any(p.frame is not None for p in volume.planes)
    if multiframe:
        _single_multiframe(volume, path)
    try:
        seg = hd.seg.segread(str(path))
        numbers = list(seg.get_segment_numbers())
        if not multiframe:
            per_segment = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=[p.sop_uid for p in volume.planes],
                segment_numbers=numbers, combine_segments=False)
        else:  # frames of one multi-frame image, referenced by (1-based) frame number
            per_segment = seg.get_pixels_by_source_frame(
                source_sop_instance_uid=volume.planes[0].sop_uid,
                source_frame_numbers=[p.frame + 1 for p in volume.planes],
                segment_numbers=numbers, combine_segments=False)
    except Exception as exc:  # highdicom raises many types for SEGs it cannot place
        raise DataError(f"{path}: SEG cannot be placed on series {volume.series.folder} "
                        f"({_why(exc)})") from None
    rows, cols = int(volume.series.headers[0].Rows), int(volume.series.headers[0].Columns)
    if per_segment.shape[1:3] != (rows, cols):
        raise DataError(f"{path}: SEG frames are {per_segment.shape[1]}x{per_segment.shape[2]}, "
                        f"the series' images {rows}x{cols}")
    masks = per_segment >= 0.5 if per_segment.dtype.kind == "f" else per_segment > 0
    overlap = masks.sum(-1) > 1
    if overlap.any():
        pair = [n for n, m in zip(numbers, masks[overlap][0], strict=True) if m][:2]
        raise DataError(f"{path}: segments {pair[0]} and {pair[1]} overlap in "
                        f"{int(overlap.sum())} voxels; fedscan needs one class per voxel")
    classes = max(class_of_segment.values(), default=0)
    labels = np.zeros(masks.shape[:3], dtype=np.uint8 if classes < 256 else np.uint16)
    for index, number in enumerate(numbers):
        labels[masks[..., index]] = class_of_segment[number]
    return np.ascontiguousarray(labels.transpose(2, 1, 0))


def write_seg(labels: np.ndarray, volume: SeriesVolume, out_path: Path,
              class_names: Sequence[str]) -> Path:
    """Write a class map on a series' grid as a binary DICOM SEG referencing that series.

    Args:
        labels: integer classes with the shape of ``volume.image`` (column, row, slice).
        volume: the series the labels were predicted on.
        out_path: the ``.dcm`` file to write.
        class_names: a name per foreground class (class ``i`` is ``class_names[i - 1]``);
            each becomes a segment with that number and label.

    Returns:
        ``out_path``.
    """
    by_file = {str(f): ds for f, ds in
               zip(volume.series.files, volume.series.headers, strict=True)}
    frames = np.ascontiguousarray(labels.transpose(2, 1, 0))  # (slice, row, column)
    if all(p.frame is None for p in volume.planes):
        source_images = [by_file[str(p.file)] for p in volume.planes]
        pixel_array = frames
    else:  # one multi-frame file: frames go back to their stored order
        _single_multiframe(volume, out_path)
        source_images = [by_file[str(volume.planes[0].file)]]
        pixel_array = np.zeros_like(frames)
        pixel_array[[p.frame for p in volume.planes]] = frames
    algorithm = hd.AlgorithmIdentificationSequence(
        name="fedscan", version=__version__, family=codes.cid7162.ArtificialIntelligence)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.AnatomicalStructure,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm)
        for number, name in enumerate(class_names, start=1)]
    # highdicom logs a notice for an all-background mask (it then stores every frame); the
    # console keeps to our own lines.
    logger = logging.getLogger("highdicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:  # highdicom refuses some sources (e.g. several Enhanced files): one line, not a trace
        seg = hd.seg.Segmentation(
            source_images=source_images, pixel_array=pixel_array.astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
            series_instance_uid=hd.UID(), series_number=9000, sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer="fedscan", manufacturer_model_name="fedscan predict",
            software_versions=__version__, device_serial_number="none",
            series_description="fedscan segmentation")
    except Exception as exc:
        raise DataError(f"{out_path}: DICOM SEG could not be written for series "
                        f"{volume.series.folder} ({_why(exc)})") from None
    finally:
        logger.setLevel(level)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.partial")
    seg.save_as(partial)
    os.replace(partial, out_path)  # never a half-written SEG under the final name
    return out_path
