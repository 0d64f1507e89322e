"""``fedscan import-dicom``: DICOM series under a folder -> a site folder in the data contract.

Every image series becomes one case, written as NIfTI on the series' own grid. Its label comes
from a DICOM SEG that references the series, else from ``label.nii.gz`` (or ``label.nii``) in
the folder holding the series' files. Labelled cases go to ``imagesTr``/``labelsTr`` and the
``training`` list; series without a label go to ``imagesTs`` and the MSD ``test`` list (for
prediction only), with a warning. Case ids are a hash of the SeriesInstanceUID, so no patient
name or ID ends up in a file name; ``dicom_import.csv`` beside dataset.json maps each id back
to its series for the hospital. The site is written to a temporary sibling folder and renamed
into place at the end, so a failed import leaves nothing half-written.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from fedscan.shared.data import AFFINE_ATOL, DATASET_JSON, load_nifti, read_dataset
from fedscan.shared.dicom_io import DicomScan, ImageSeries, SeriesVolume, read_series, scan_dicom
from fedscan.shared.dicom_seg import read_seg_labels, referenced_series, segment_names
from fedscan.shared.errors import DataError

#: File names of a NIfTI label in the folder of a series' files.
LABEL_NAMES = ("label.nii.gz", "label.nii")
#: The mapping from case ids to DICOM series, kept by the hospital.
MAPPING_FILE = "dicom_import.csv"
MAPPING_COLUMNS = ("case_id", "split", "label_source", "dicom_folder", "series_instance_uid",
                   "study_instance_uid", "series_number", "series_description", "modality",
                   "slices")


@dataclass
class ImportReport:
    """What an import wrote.

    Attributes:
        site: the site folder.
        mapping: the case-id mapping file.
        labelled: case ids with a label, by label source (``"seg"`` or ``"nifti"``).
        image_only: case ids imported for prediction only (no label found).
        class_names: foreground class names, class 1 first.
        skipped: ``(folder, reason)`` of series left out with ``skip_bad``.
        ignored: what the scan skipped, by reason.
    """

    site: Path
    mapping: Path
    labelled: dict[str, list[str]] = field(default_factory=dict)
    image_only: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)


def case_id_for(series_uid: str) -> str:
    """A case id that names no patient: ``dcm-`` and 12 hex digits of SHA-256(series UID).

    The same series always gets the same id, so re-importing keeps the train/validation split.
    """
    return "dcm-" + hashlib.sha256(series_uid.encode()).hexdigest()[:12]


def _segs_by_series(scan: DicomScan) -> dict[str, Path]:
    """The SEG file of each referenced series; a SEG must reference a series under the root."""
    known = {s.uid for s in scan.series}
    out: dict[str, Path] = {}
    for path, header in scan.segs:
        uid = referenced_series(path, header)
        if uid not in known:
            raise DataError(f"{path}: SEG references series {uid}, which is not under "
                            f"{scan.root}")
        if uid in out:
            raise DataError(f"{path}: a second SEG for the series of {out[uid]}; keep one SEG "
                            "per series")
        out[uid] = path
    return out


def _nifti_label(series: ImageSeries, scan: DicomScan) -> Path | None:
    """The ``label.nii[.gz]`` beside a series, when its folder holds only that series."""
    found = [series.folder / name for name in LABEL_NAMES if (series.folder / name).is_file()]
    if not found:
        return None
    if len(found) > 1:
        raise DataError(f"{series.folder}: both {LABEL_NAMES[0]} and {LABEL_NAMES[1]}; keep one")
    sharing = [s for s in scan.series if s.folder == series.folder]
    if len(sharing) > 1:
        raise DataError(f"{found[0]}: its folder holds {len(sharing)} image series, so the "
                        "label's series is ambiguous; put each series in its own folder")
    return found[0]


def _class_map(scan: DicomScan, segs: dict[str, Path], labels: list[str] | None
               ) -> tuple[list[str], dict[Path, dict[int, int]]]:
    """Foreground class names and, per SEG, the class of each segment number.

    With ``labels`` (the consortium's class names, class 1 first) segments are matched by
    label, case-insensitively. Without, classes are the segment labels found in all SEGs,
    ordered by the smallest segment number each carries (ties by name): SEGs that number the
    same labels alike keep their numbers as classes.
    """
    names = {path: segment_names(path, header) for path, header in scan.segs
             if path in segs.values()}
    if labels is None:
        first_number: dict[str, tuple[int, str]] = {}
        for by_number in names.values():
            for number, name in by_number.items():
                key = name.lower()
                first_number[key] = min(first_number.get(key, (number, name)), (number, name))
        labels = [name for _, name in sorted(first_number.values())]
    index = {name.lower(): i for i, name in enumerate(labels, start=1)}
    maps: dict[Path, dict[int, int]] = {}
    for path, by_number in names.items():
        unknown = [name for name in by_number.values() if name.lower() not in index]
        if unknown:
            raise DataError(f"{path}: segment {unknown[0]!r} is not among --labels "
                            f"({', '.join(labels)})")
        maps[path] = {number: index[name.lower()] for number, name in by_number.items()}
    return list(labels), maps


def _aligned_label(path: Path, volume: SeriesVolume) -> np.ndarray:
    """A NIfTI label's voxels in the series' voxel order; its grid must be the series' grid.

    A label written by another tool may store the same grid with axes flipped or permuted
    (dcm2niix, for example); it is reoriented. Any other difference is an error.
    """
    label = load_nifti(path)
    image = volume.image
    if label.ndim == 4 and label.shape[3] == 1:
        label = label.slicer[..., 0]
    if label.ndim != 3:
        raise DataError(f"{path}: a label must be a 3D volume, found shape {label.shape}")
    ornt = nib.orientations.ornt_transform(nib.io_orientation(label.affine),
                                           nib.io_orientation(image.affine))
    reoriented = label.as_reoriented(ornt)
    if reoriented.shape != image.shape:
        raise DataError(f"{path}: label shape {label.shape} does not match series "
                        f"{volume.series.folder} {image.shape}")
    diff = float(np.abs(reoriented.affine - image.affine).max())
    if diff > AFFINE_ATOL:
        raise DataError(f"{path}: label grid does not match series {volume.series.folder} "
                        f"(largest affine difference {diff:.4g} mm)")
    return np.asanyarray(reoriented.dataobj)


def _save(image: nib.Nifti1Image, array: np.ndarray, path: Path) -> None:
    """Write ``array`` on ``image``'s grid (qform and sform as read from DICOM)."""
    out = nib.Nifti1Image(array, image.affine, image.header)
    out.set_data_dtype(array.dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.to_filename(path)


def _label_array(values: np.ndarray, path: Path) -> np.ndarray:
    """Label voxels as the smallest unsigned integer type (checked later by the contract)."""
    if values.dtype.kind == "f" and (
            not np.isfinite(values).all() or (values != np.round(values)).any()):
        raise DataError(f"{path}: label values must be integers")
    if values.size and values.min() < 0:
        raise DataError(f"{path}: label values must be non-negative, found {values.min()}")
    top = int(values.max()) if values.size else 0
    return values.astype(np.uint8 if top < 256 else np.uint16)


def _prepare_target(out: Path) -> Path:
    """The temporary sibling folder the site is written to; ``out`` must be new or empty."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not empty; import into a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent / f".{out.name}.import-{uuid.uuid4().hex[:8]}"


def import_dicom(dicom_dir: str | Path, out_dir: str | Path, *, labels: list[str] | None = None,
                 skip_bad: bool = False, mapping: str | Path | None = None,
                 warn=print) -> ImportReport:
    """Import every DICOM image series under ``dicom_dir`` as a site folder at ``out_dir``.

    Args:
        dicom_dir: folder searched recursively (any structure, one or many series).
        out_dir: the site folder to create (must not exist, or be empty).
        labels: foreground class names in class order (class 1 first); SEG segments are
            matched to them by label. ``None`` derives them from the SEGs (see
            :func:`_class_map`) or, for NIfTI labels only, names classes ``class N``.
        skip_bad: leave out series that are not one regular volume, with a warning, instead
            of stopping at the first.
        mapping: where the case-id mapping CSV goes (default ``out_dir/dicom_import.csv``).
        warn: prints a warning line (to stderr from the CLI).

    Returns:
        What was written.

    Raises:
        DataError: one line naming the folder or file at fault; nothing is left at ``out_dir``.
    """
    out = Path(os.path.abspath(os.path.expanduser(out_dir)))
    if labels is not None:
        lowered = [n.strip().lower() for n in labels]
        if not all(lowered) or len(set(lowered)) != len(lowered):
            raise DataError(f"--labels {','.join(labels)}: class names must be non-empty and "
                            "distinct")
    scan = scan_dicom(dicom_dir)
    if not scan.series:
        raise DataError(f"{scan.root}: only SEG objects, no image series to import")
    modalities = sorted({s.attribute("Modality", "OT").upper() for s in scan.series})
    if len(modalities) > 1:
        raise DataError(f"{scan.root}: series of several modalities ({', '.join(modalities)}); "
                        "import each modality into its own site")
    segs = _segs_by_series(scan)
    class_names, segment_classes = _class_map(scan, segs, labels)
    map_path = Path(mapping) if mapping else out / MAPPING_FILE
    report = ImportReport(site=out, mapping=map_path, class_names=class_names,
                          ignored=dict(scan.ignored))
    tmp = _prepare_target(out)
    rows: list[dict[str, object]] = []
    training: list[dict[str, str]] = []
    test: list[str] = []
    top_class = len(class_names)
    try:
        # A bar on a terminal only (disable=None), cleared at the end (leave=False), so
        # errors and logs stay one line each.
        for series in tqdm(scan.series, desc="importing series", unit="series", leave=False,
                           disable=None if len(scan.series) > 1 else True, file=sys.stderr):
            seg = segs.get(series.uid)
            nifti = _nifti_label(series, scan)
            if seg and nifti:
                raise DataError(f"{series.folder}: both a SEG ({seg.name}) and {nifti.name}; "
                                "keep one label per series")
            try:
                volume = read_series(series)
            except DataError as exc:
                if not skip_bad or seg or nifti:
                    raise
                report.skipped.append((series.folder, str(exc)))
                warn(f"fedscan: warning: skipped {exc}")
                continue
            cid = case_id_for(series.uid)
            if seg:
                label = read_seg_labels(seg, volume, segment_classes[seg])
                source = f"seg:{seg.relative_to(scan.root)}"
            elif nifti:
                label = _label_array(_aligned_label(nifti, volume), nifti)
                top_class = max(top_class, int(label.max()))
                source = f"nifti:{nifti.relative_to(scan.root)}"
            else:
                label, source = None, "none"
            image_path = tmp / ("imagesTr" if label is not None else "imagesTs") / f"{cid}.nii.gz"
            _save(volume.image, np.asanyarray(volume.image.dataobj), image_path)
            if label is not None:
                _save(volume.image, label, tmp / "labelsTr" / f"{cid}.nii.gz")
                training.append({"image": f"./imagesTr/{cid}.nii.gz",
                                 "label": f"./labelsTr/{cid}.nii.gz"})
                report.labelled.setdefault(source.split(":")[0], []).append(cid)
            else:
                test.append(f"./imagesTs/{cid}.nii.gz")
                report.image_only.append(cid)
            folder = series.folder
            rows.append({
                "case_id": cid, "split": "training" if label is not None else "test",
                "label_source": source,
                "dicom_folder": str(folder.relative_to(scan.root)) if folder != scan.root else ".",
                "series_instance_uid": series.uid,
                "study_instance_uid": series.attribute("StudyInstanceUID"),
                "series_number": series.attribute("SeriesNumber"),
                "series_description": series.attribute("SeriesDescription"),
                "modality": series.attribute("Modality"), "slices": len(volume.planes)})
        if not rows:
            raise DataError(f"{scan.root}: no series could be imported "
                            f"({len(report.skipped)} skipped)")
        class_names += [f"class {i}" for i in range(len(class_names) + 1, top_class + 1)]
        modality = modalities[0]
        spec = {
            "name": out.name,
            "description": "imported from DICOM by fedscan import-dicom",
            "tensorImageSize": "3D",
            "modality": {"0": modality}, "channel_names": {"0": modality},
            "labels": {"0": "background", **{str(i): n for i, n in
                                             enumerate(class_names, start=1)}},
            "numTraining": len(training), "numTest": len(test),
            "training": training, "test": test,
        }
        (tmp / DATASET_JSON).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
        if training:  # the contract's own checks, before anything is published
            read_dataset(tmp, num_classes=len(class_names) + 1, check=True)
        map_target = tmp / MAPPING_FILE if not mapping else map_path
        map_target.parent.mkdir(parents=True, exist_ok=True)
        with open(map_target, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=MAPPING_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.class_names = class_names
    return report


def format_report(report: ImportReport) -> list[str]:
    """The lines the CLI prints after an import."""
    n_labelled = sum(len(v) for v in report.labelled.values())
    sources = ", ".join(f"{k.upper() if k == 'seg' else 'NIfTI'} {len(v)}"
                        for k, v in sorted(report.labelled.items()))
    lines = [f"{report.site}: {n_labelled} labelled case(s)"
             + (f" ({sources})" if sources else "") + " in imagesTr/labelsTr"]
    if report.image_only:
        lines.append(f"{len(report.image_only)} series without a label in imagesTs "
                     "(prediction only; add a SEG or label.nii.gz beside the series to train)")
    if report.class_names:
        lines.append("classes: " + ", ".join(f"{i} {n}" for i, n in
                                              enumerate(report.class_names, start=1)))
    if report.skipped:
        lines.append(f"skipped {len(report.skipped)} series (see the warnings above)")
    if report.ignored:
        lines.append("ignored: " + ", ".join(f"{n} {reason}" for reason, n in
                                             sorted(report.ignored.items())))
    lines.append(f"case ids -> DICOM series: {report.mapping} (keep it at the hospital)")
    if not report.labelled:
        lines.append("no labelled series: this site cannot train until labels are added")
    return lines

