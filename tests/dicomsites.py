"""DICOM test data written by real tools: SimpleITK (GDCM) series from NIfTI, highdicom SEGs."""

from __future__ import annotations

import locale
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

STORAGE = {"MR": "1.2.840.10008.5.1.4.1.1.4", "CT": "1.2.840.10008.5.1.4.1.1.2"}


def write_series(nifti: Path, folder: Path, *, modality: str = "MR",
                 series_uid: str | None = None, study_uid: str | None = None,
                 rescale_slope: float | None = None, extra: dict[str, str] | None = None
                 ) -> list[Path]:
    """Write a 3D NIfTI as a DICOM series, one file per slice, with SimpleITK's GDCM writer.

    ITK reads the NIfTI (its own RAS -> LPS handling); each slice gets the
    ImagePositionPatient of its first voxel, the volume's ImageOrientationPatient, and the
    slice spacing as SliceThickness, as scanners write them. Float images are stored as int16
    with ``rescale_slope`` (GDCM applies the inverse rescale).

    Returns:
        The files, in the NIfTI's slice order.
    """
    image = sitk.ReadImage(str(nifti))
    if rescale_slope is not None:
        image = sitk.Cast(image, sitk.sitkFloat64)
    folder.mkdir(parents=True, exist_ok=True)
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.10g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    tags = {
        "0010|0010": "Doe^Jane", "0010|0020": "PID-0042", "0008|0020": "20240102",
        "0008|0030": "101500", "0020|000d": study_uid, "0020|000e": series_uid,
        "0020|0052": frame_uid, "0008|0060": modality, "0008|0016": STORAGE[modality],
        "0020|0011": "3", "0008|103e": "test series", "0020|0037": orientation,
        "0018|0050": f"{image.GetSpacing()[2]:.10g}", "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
    }
    if rescale_slope is not None:
        tags.update({"0028|1053": f"{rescale_slope:g}", "0028|1052": "0", "0028|0100": "16",
                     "0028|0101": "16", "0028|0102": "15", "0028|0103": "1"})
    tags.update(extra or {})
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # keep the UIDs set here
    files = []
    # GDCM's writer leaves the process locale at "C" (ASCII), which would break text decoding
    # of later subprocess output in the same test session: put it back afterwards.
    saved_locale = locale.setlocale(locale.LC_ALL)
    try:
        _write_planes(image, tags, folder, writer, files)
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)
    return files


def _write_planes(image: sitk.Image, tags: dict[str, str], folder: Path,
                  writer: sitk.ImageFileWriter, files: list[Path]) -> None:
    """Write each slice of ``image`` with ``tags`` plus its own position, number and UID."""
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        plane.SetMetaData("0020|0032", "\\".join(f"{v:.10g}" for v in position))
        plane.SetMetaData("0020|0013", str(k + 1))
        plane.SetMetaData("0008|0018", generate_uid())
        path = folder / f"IM{k:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(plane)
        files.append(path)


def geometry(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """(orientation, position, pixel spacing) of a single-frame dataset, classic or Enhanced
    (GDCM writes an MR image with a rescale slope as Enhanced MR, geometry in functional
    groups)."""
    if "ImageOrientationPatient" in ds:
        holder = {k: ds for k in ("orientation", "position", "spacing")}
    else:
        shared, frame = ds.SharedFunctionalGroupsSequence[0], \
            ds.PerFrameFunctionalGroupsSequence[0]
        holder = {"orientation": shared.PlaneOrientationSequence[0],
                  "position": frame.PlanePositionSequence[0],
                  "spacing": shared.PixelMeasuresSequence[0]}
    iop = np.array([float(v) for v in holder["orientation"].ImageOrientationPatient])
    ipp = np.array([float(v) for v in holder["position"].ImagePositionPatient])
    dr, dc = (float(v) for v in holder["spacing"].PixelSpacing)
    return iop, ipp, (dr, dc)


def sorted_datasets(files: list[Path]) -> list[pydicom.Dataset]:
    """The series' datasets sorted along the slice normal (the order a SEG's frames follow)."""
    datasets = [pydicom.dcmread(f) for f in files]
    iop = geometry(datasets[0])[0]
    normal = np.cross(iop[:3], iop[3:])
    return sorted(datasets, key=lambda ds: float(normal @ geometry(ds)[1]))


def label_frames(label: np.ndarray, label_affine: np.ndarray, datasets: list[pydicom.Dataset]
                 ) -> np.ndarray:
    """A NIfTI label's voxels as SEG frames ``(frame, row, column)`` of ``datasets``.

    Each frame's pixel centres are computed from the dataset's own geometry and looked up in
    the label by world position (independent of the importer's code).
    """
    inverse = np.linalg.inv(label_affine)
    frames = []
    for ds in datasets:
        iop, ipp, (dr, dc) = geometry(ds)
        rows, cols = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
        lps = ipp + cols[..., None] * dc * iop[:3] + rows[..., None] * dr * iop[3:]
        ras = lps * np.array([-1.0, -1.0, 1.0])
        ijk = np.rint(ras @ inverse[:3, :3].T + inverse[:3, 3]).astype(int)
        frames.append(label[ijk[..., 0], ijk[..., 1], ijk[..., 2]])
    return np.stack(frames)


def write_seg(datasets: list[pydicom.Dataset], frames: np.ndarray, names: dict[int, str],
              path: Path, kind: str = "BINARY") -> Path:
    """A SEG (highdicom) of ``kind`` (BINARY, FRACTIONAL or LABELMAP) of ``datasets``.

    ``frames`` holds segment numbers that ``names`` declares, ``(frame, row, column)``, or for
    FRACTIONAL one probability plane per segment in the last axis.
    """
    algorithm = hd.AlgorithmIdentificationSequence(
        name="test", version="1", family=codes.cid7162.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=label,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.AnatomicalStructure,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for n, label in sorted(names.items())]
    fractional = {"fractional_type": "PROBABILITY"} if kind == "FRACTIONAL" else {}
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=frames.astype(np.float32 if kind == "FRACTIONAL" else np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues[kind], segment_descriptions=segments,
        series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="test", manufacturer_model_name="test",
        software_versions="1", device_serial_number="1", **fractional)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def same_world_grid(image: nib.Nifti1Image, reference: nib.Nifti1Image
                    ) -> tuple[float, np.ndarray]:
    """``image`` reoriented to ``reference``'s voxel axes: (largest affine difference in mm,
    its voxels). A DICOM series is stored along its slice normal, so a NIfTI whose third axis
    points the other way comes back flipped: same world grid, other voxel order."""
    ornt = nib.orientations.ornt_transform(nib.io_orientation(image.affine),
                                           nib.io_orientation(reference.affine))
    moved = image.as_reoriented(ornt)
    assert moved.shape == reference.shape, (moved.shape, reference.shape)
    return float(np.abs(moved.affine - reference.affine).max()), np.asanyarray(moved.dataobj)
