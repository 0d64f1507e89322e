"""DICOM image series in: find series under a folder, check their geometry, read them as NIfTI.

Headers are read with pydicom (fast, no pixels) to group files by SeriesInstanceUID and to
check that a series is one regular volume: same size, pixel spacing and orientation on every
slice, slices stacked along their normal at one spacing (no gaps, no gantry tilt, no repeated
positions). Pixels are decoded by SimpleITK's GDCM reader, which handles the compressed
transfer syntaxes hospitals export (JPEG lossless, JPEG-LS, JPEG 2000, RLE) without plugins
and applies each slice's rescale slope and intercept. The affine is built here from the
headers (DICOM's LPS world turned into nibabel's RAS), so the voxel grid written to NIfTI is
exactly the one the checks accepted. Nothing here writes outside the caller's folders.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from fedscan.shared.errors import DataError

#: SOP class of DICOM Segmentation objects.
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: Transfer syntaxes GDCM decodes: uncompressed, deflate, JPEG (baseline, extended, lossless),
#: JPEG-LS, JPEG 2000 and RLE. Others (JPEG XL, HTJ2K, video) are refused up front.
DECODABLE_SYNTAXES = frozenset({
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5",
})
#: Modalities whose objects are not image volumes (reports, structures, plans, dose grids).
NON_IMAGE_MODALITIES = frozenset({"SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD",
                                  "REG", "DOC", "RWV", "PLAN"})
#: Positions, spacings and direction cosines agreeing within these tolerances are equal:
#: exporters print positions with a few decimals, real gaps and tilts are far larger.
POSITION_TOL_MM = 0.01
SPACING_REL_TOL = 0.01
ORIENTATION_TOL = 1e-4
#: nibabel's RAS+ world from DICOM's LPS+ patient coordinates.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Plane:
    """One 2D image of a series: a single-frame file, or one frame of a multi-frame file.

    Attributes:
        file: the file holding it.
        frame: index of the frame in a multi-frame file, ``None`` for a single-frame file.
        position: ImagePositionPatient (LPS mm) of its first pixel.
        orientation: ImageOrientationPatient (row then column direction cosines).
        sop_uid: the SOPInstanceUID of its file.
    """

    file: Path
    frame: int | None
    position: np.ndarray
    orientation: np.ndarray
    sop_uid: str


@dataclass
class ImageSeries:
    """The files of one image series (one SeriesInstanceUID) found under a folder.

    Attributes:
        uid: SeriesInstanceUID.
        headers: each file's header (no pixel data), in the order found.
        files: the files, in the same order as ``headers``.
    """

    uid: str
    headers: list[Dataset] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        """The deepest folder holding every file of the series (names it in messages)."""
        if len(self.files) == 1:
            return self.files[0].parent
        return Path(os.path.commonpath([str(f) for f in self.files]))

    def attribute(self, keyword: str, default: str = "") -> str:
        """A header value of the first file, as text (``default`` when absent)."""
        value = self.headers[0].get(keyword, None)
        return default if value in (None, "") else str(value)


@dataclass
class DicomScan:
    """What :func:`scan_dicom` found under a folder.

    Attributes:
        root: the folder scanned.
        series: image series, sorted by folder then SeriesInstanceUID.
        segs: DICOM SEG files with their headers (no pixel data).
        ignored: counts of what was skipped, by reason (``"not DICOM"``, ``"localizer"``...).
    """

    root: Path
    series: list[ImageSeries]
    segs: list[tuple[Path, Dataset]]
    ignored: Counter


@dataclass
class SeriesVolume:
    """A series read as one volume.

    Attributes:
        series: the series it came from.
        planes: its planes sorted along the slice normal (volume slice ``k`` is ``planes[k]``).
        image: the NIfTI image: voxel ``(i, j, k)`` is column ``i``, row ``j`` of ``planes[k]``.
    """

    series: ImageSeries
    planes: list[Plane]
    image: nib.Nifti1Image


def _files_under(root: Path) -> Iterable[Path]:
    """Every regular, non-hidden file under ``root`` (or ``root`` itself), in a stable order."""
    if root.is_file():
        yield root
        return
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and not name.endswith((".nii", ".nii.gz")):
                yield Path(folder) / name


def scan_dicom(root: str | Path) -> DicomScan:
    """Find the DICOM image series and SEG objects under ``root`` (any folder structure).

    Files that are not DICOM (no ``DICM`` preamble), DICOMDIR indexes, non-image objects
    (reports, RT structures, presentation states) and localizer series are counted in
    ``ignored`` and otherwise skipped.

    Args:
        root: a folder (searched recursively) or a single DICOM file.

    Returns:
        The series and SEG files found.

    Raises:
        DataError: ``root`` does not exist, or holds no DICOM image at all.
    """
    root = Path(os.path.abspath(os.path.expanduser(root)))
    if not root.exists():
        raise DataError(f"{root}: DICOM folder not found")
    by_uid: dict[str, ImageSeries] = {}
    segs: list[tuple[Path, Dataset]] = []
    ignored: Counter = Counter()
    for path in _files_under(root):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError):
            ignored["not DICOM"] += 1
            continue
        sop_class = str(header.get("SOPClassUID", ""))
        modality = str(header.get("Modality", "")).upper()
        if sop_class == SEG_SOP_CLASS or modality == "SEG":
            segs.append((path, header))
        elif "DirectoryRecordSequence" in header:
            ignored["DICOMDIR"] += 1
        elif modality in NON_IMAGE_MODALITIES or "Rows" not in header:
            ignored[f"non-image ({modality or 'no modality'})"] += 1
        elif "LOCALIZER" in [str(v).upper() for v in (header.get("ImageType") or [])]:
            ignored["localizer"] += 1
        else:
            uid = str(header.get("SeriesInstanceUID", "")) or f"no-series-uid:{path.parent}"
            series = by_uid.setdefault(uid, ImageSeries(uid))
            series.headers.append(header)
            series.files.append(path)
    if not by_uid and not segs:
        what = ", ".join(f"{n} {reason}" for reason, n in sorted(ignored.items()))
        raise DataError(f"{root}: no DICOM images found" + (f" ({what})" if what else ""))
    series = sorted(by_uid.values(), key=lambda s: (str(s.folder), s.uid))
    return DicomScan(root=root, series=series, segs=segs, ignored=ignored)


def one_series(root: str | Path) -> ImageSeries:
    """The single image series under ``root`` (for predict), or a one-line error.

    Raises:
        DataError: no image series, or several (listing where they are).
    """
    scan = scan_dicom(root)
    if not scan.series:
        raise DataError(f"{scan.root}: no DICOM image series found (only SEG objects)")
    if len(scan.series) > 1:
        where = ", ".join(f"{s.folder} ({s.attribute('SeriesDescription', 'no description')}, "
                          f"{len(s.files)} files)" for s in scan.series[:3])
        more = "..." if len(scan.series) > 3 else ""
        raise DataError(f"{scan.root}: holds {len(scan.series)} image series, one is expected; "
                        f"give the folder of one of them: {where}{more}")
    return scan.series[0]


def _floats(value: object, n: int, where: str, keyword: str) -> np.ndarray:
    try:
        out = np.array([float(v) for v in value], dtype=float)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        out = np.array([])
    if out.shape != (n,) or not np.isfinite(out).all():
        raise DataError(f"{where}: {keyword} missing or malformed; not a cross-sectional "
                        "image (CT, MR, PET) with patient geometry")
    return out


def _attribute(header: Dataset, frame: int, sequence: str, keyword: str) -> object:
    """An attribute of one frame: from its per-frame functional group, else the shared group
    (Enhanced objects), else the top level (classic single-frame objects); ``None`` if absent.
    """
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame),
                          ("SharedFunctionalGroupsSequence", 0)):
        items = header.get(groups)
        if items is not None and len(items) > index:
            inner = items[index].get(sequence)
            if inner and keyword in inner[0]:
                return inner[0].get(keyword)
    return header.get(keyword)


def _planes(series: ImageSeries) -> tuple[list[Plane], np.ndarray]:
    """Every plane of the series (unsorted) and the pixel spacing (row, column) in mm.

    Works for classic single-frame files, Enhanced single-frame files (geometry in functional
    groups) and multi-frame files alike.
    """
    planes: list[Plane] = []
    sizes, spacings = set(), set()
    for header, path in zip(series.headers, series.files, strict=True):
        sizes.add((int(header.get("Rows", 0)), int(header.get("Columns", 0))))
        frames = int(header.get("NumberOfFrames", 1) or 1)
        for k in range(frames):
            where = f"{path} frame {k + 1}" if frames > 1 else str(path)
            spacings.add(tuple(_floats(_attribute(header, k, "PixelMeasuresSequence",
                                                  "PixelSpacing"), 2, where, "PixelSpacing")))
            position = _attribute(header, k, "PlanePositionSequence", "ImagePositionPatient")
            orient = _attribute(header, k, "PlaneOrientationSequence", "ImageOrientationPatient")
            planes.append(Plane(path, k if frames > 1 else None,
                                _floats(position, 3, where, "ImagePositionPatient"),
                                _floats(orient, 6, where, "ImageOrientationPatient"),
                                str(header.get("SOPInstanceUID", ""))))
    if len(sizes) > 1:
        shown = " and ".join(f"{r}x{c}" for r, c in sorted(sizes)[:2])
        raise DataError(f"{series.folder}: images of different sizes in one series ({shown})")
    if len(spacings) > 1:
        raise DataError(f"{series.folder}: inconsistent pixel spacing in one series "
                        f"({' and '.join(str(list(s)) for s in sorted(spacings)[:2])} mm)")
    return planes, np.array(spacings.pop())


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def check_geometry(series: ImageSeries) -> tuple[list[Plane], np.ndarray]:
    """Check that a series is one regular volume; return its sorted planes and LPS affine.

    Args:
        series: the series' files and headers.

    Returns:
        ``(planes, affine)``: planes sorted by position along the slice normal (row x column
        direction), and the 4x4 LPS affine of voxel ``(column, row, slice)``.

    Raises:
        DataError: one line naming the series folder: colour images, missing geometry,
            different sizes or spacings, inconsistent orientation, several volumes in one
            series (repeated positions), missing slices, uneven spacing or gantry tilt.
    """
    header = series.headers[0]
    if int(header.get("SamplesPerPixel", 1) or 1) != 1:
        raise DataError(f"{series.folder}: colour images ({header.get('PhotometricInterpretation')}"
                        "); only greyscale series are supported")
    planes, pixel_spacing = _planes(series)
    orientation = planes[0].orientation
    for plane in planes[1:]:
        if np.abs(plane.orientation - orientation).max() > ORIENTATION_TOL:
            raise DataError(f"{series.folder}: inconsistent ImageOrientationPatient within the "
                            f"series ({plane.file.name}); not one volume")
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-3 or abs(row_dir @ col_dir) > 1e-3:
        raise DataError(f"{series.folder}: ImageOrientationPatient is not two orthogonal unit "
                        "vectors")
    planes = sorted(planes, key=lambda p: float(p.position @ normal))
    depth = np.array([float(p.position @ normal) for p in planes])
    if len(planes) > 1:
        gaps = np.diff(depth)
        if (gaps < POSITION_TOL_MM).any():
            positions = len(set(np.round(depth / POSITION_TOL_MM).astype(np.int64)))
            raise DataError(f"{series.folder}: {len(planes)} images at {positions} slice "
                            "positions: several volumes in one series (4D, multi-echo, "
                            "diffusion or repeated acquisition) are not supported")
        step = float(np.min(gaps))
        uneven = np.abs(gaps - step) > max(POSITION_TOL_MM, SPACING_REL_TOL * step)
        if uneven.any():
            multiples = gaps / step
            if np.allclose(multiples, np.round(multiples), atol=SPACING_REL_TOL * 10):
                missing = int(np.round(multiples).sum() - len(gaps))
                first = int(np.argmax(uneven))
                raise DataError(f"{series.folder}: missing slices ({missing} missing; gap of "
                                f"{_fmt(gaps[first])} mm after {planes[first].file.name}, "
                                f"slice spacing {_fmt(step)} mm)")
            raise DataError(f"{series.folder}: inconsistent slice spacing ({_fmt(gaps.min())} "
                            f"to {_fmt(gaps.max())} mm); not one regular volume")
        offsets = np.array([p.position - planes[0].position for p in planes])
        in_plane = offsets - np.outer(depth - depth[0], normal)
        drift = float(np.linalg.norm(in_plane, axis=1).max())
        if drift > POSITION_TOL_MM + SPACING_REL_TOL * float(depth[-1] - depth[0]):
            angle = np.degrees(np.arctan2(drift, float(depth[-1] - depth[0])))
            raise DataError(f"{series.folder}: slices are not stacked along their normal "
                            f"(gantry tilt or shear of {angle:.1f} deg); resample it first "
                            "(e.g. dcm2niix corrects gantry tilt)")
        slice_vector = (planes[-1].position - planes[0].position) / (len(planes) - 1)
    else:
        thickness = header.get("SpacingBetweenSlices") or header.get("SliceThickness") or 1.0
        slice_vector = normal * float(thickness)
    affine = np.eye(4)
    # PixelSpacing is (between rows, between columns): columns advance along the row direction.
    affine[:3, 0] = row_dir * pixel_spacing[1]
    affine[:3, 1] = col_dir * pixel_spacing[0]
    affine[:3, 2] = slice_vector
    affine[:3, 3] = planes[0].position
    return planes, affine


def _check_syntax(series: ImageSeries) -> None:
    for header, path in zip(series.headers, series.files, strict=True):
        meta = getattr(header, "file_meta", None)
        uid = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
        if uid and uid not in DECODABLE_SYNTAXES:
            name = pydicom.uid.UID(uid).name
            raise DataError(f"{path}: transfer syntax {name} ({uid}) has no decoder here; "
                            "export the series uncompressed or with JPEG/JPEG-LS/JPEG 2000/RLE")


def _decode(series: ImageSeries, planes: list[Plane]) -> np.ndarray:
    """Pixel values after rescale, ``(slices, rows, columns)`` in the order of ``planes``."""
    _check_syntax(series)
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM's notes would bypass our one line
    try:
        if all(p.frame is None for p in planes):  # one file per slice, already sorted
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames([str(p.file) for p in planes])
            array = sitk.GetArrayFromImage(reader.Execute())
        else:  # multi-frame files: each read once, frames picked in sorted order
            stored: dict[Path, np.ndarray] = {}
            for p in planes:
                if p.file not in stored:
                    stored[p.file] = sitk.GetArrayFromImage(sitk.ReadImage(str(p.file)))
            rows, cols = int(series.headers[0].Rows), int(series.headers[0].Columns)
            array = np.stack([stored[p.file].reshape(-1, rows, cols)[p.frame or 0]
                              for p in planes])
    except RuntimeError as exc:
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise DataError(f"{series.folder}: pixel data could not be decoded "
                        f"({reason[-120:]})") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    rows, cols = int(series.headers[0].Rows), int(series.headers[0].Columns)
    if array.shape != (len(planes), rows, cols):
        raise DataError(f"{series.folder}: decoded pixel data has shape {array.shape}, "
                        f"expected {(len(planes), rows, cols)}")
    return array.astype(np.float32) if array.dtype == np.float64 else array


def nifti_image(array: np.ndarray, lps_affine: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI image of ``array`` (column, row, slice) with qform and sform in RAS mm."""
    ras = LPS_TO_RAS @ lps_affine
    image = nib.Nifti1Image(array, ras)
    image.set_qform(ras, code=1)  # 1 = scanner coordinates
    image.set_sform(ras, code=1)
    image.header.set_xyzt_units("mm")
    return image


def read_series(series: ImageSeries) -> SeriesVolume:
    """Check and read one series as a NIfTI image on the series' own voxel grid.

    Voxel values are the stored values after each slice's rescale slope and intercept
    (integer types stay integer; other values become float32).

    Args:
        series: the series (from :func:`scan_dicom` or :func:`one_series`).

    Returns:
        The volume: sorted planes and the NIfTI image (in memory).

    Raises:
        DataError: the series is not one regular volume or its pixels cannot be decoded.
    """
    planes, affine = check_geometry(series)
    array = _decode(series, planes)
    return SeriesVolume(series=series, planes=planes,
                        image=nifti_image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine))


def is_dicom_input(path: str | Path) -> bool:
    """Whether a predict input is DICOM: a folder, or a file that is not NIfTI."""
    path = Path(path)
    return path.is_dir() or (path.is_file() and not path.name.endswith((".nii", ".nii.gz")))
