"""DICOM in: series written by SimpleITK and pydicom's bundled files read back exactly, SEG
labels, import-dicom into the data contract, predict on a series, and bad input."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate

from fedscan.cli import main
from fedscan.shared.checkpoint import save_model
from fedscan.shared.data import read_dataset
from fedscan.shared.dicom_io import one_series, read_series
from fedscan.shared.dicom_seg import read_seg_labels
from fedscan.shared.dicom_seg import write_seg as write_prediction_seg
from fedscan.shared.errors import DataError
from fedscan.shared.inference import predict_file
from fedscan.shared.tasks import build_task
from fedscan.shared.tasks.loop import train_steps
from tests.dicomsites import (
    label_frames,
    same_world_grid,
    sorted_datasets,
    write_seg,
    write_series,
)
from tests.test_predict_geometry import grid_affine
from tests.tinysites import make_sites, parse_with

#: Geometry must survive NIfTI -> DICOM -> NIfTI to this many mm (the issue's bound).
GEOMETRY_TOL_MM = 1e-3


def two_blob_case(folder: Path, axcodes: str, zooms, shape, oblique=0.0, dtype=np.int16,
                  seed=0) -> tuple[Path, Path]:
    """Image and label NIfTI: a left (class 1) and a right (class 2) ellipsoid in world mm."""
    affine = grid_affine(axcodes, zooms, shape, oblique)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    label = np.zeros(shape, np.uint8)
    for cls, x in ((1, -12.0), (2, 12.0)):  # RAS x < 0 is the patient's left... as drawn here
        label[(((xyz - [x, 2.0, 0.0]) / [9.0, 12.0, 10.0]) ** 2).sum(-1) < 1.0] = cls
    rng = np.random.default_rng(seed)
    image = 100 + 300 * (label > 0) + 80 * (label == 2) + rng.normal(0, 15, shape)
    if dtype == np.float32:
        image = image / 7.0  # values that need a rescale slope
    folder.mkdir(parents=True, exist_ok=True)
    paths = (folder / "image.nii.gz", folder / "label.nii.gz")
    nib.save(nib.Nifti1Image(image.astype(dtype), affine), paths[0])
    nib.save(nib.Nifti1Image(label, affine), paths[1])
    return paths


def read_folder(folder: Path) -> nib.Nifti1Image:
    return read_series(one_series(folder)).image


# --- (1) series written by a real tool from a known NIfTI --------------------------------------

GRIDS = [
    # axes, zooms (anisotropic), shape, oblique degrees: PIL's slice axis runs against the
    # DICOM slice normal, so the series comes back in the other voxel order.
    ("PIL", (2.0, 5.0, 3.0), (20, 12, 18), 15.0),
    ("LPS", (0.9, 1.1, 3.3), (30, 26, 9), 0.0),
    ("ASR", (1.2, 0.8, 2.5), (16, 28, 10), -30.0),
]


@pytest.mark.parametrize(("axcodes", "zooms", "shape", "oblique"), GRIDS)
def test_simpleitk_series_round_trip_keeps_geometry_and_values(tmp_path, axcodes, zooms, shape,
                                                                oblique):
    image_path, _ = two_blob_case(tmp_path / "nifti", axcodes, zooms, shape, oblique)
    files = write_series(image_path, tmp_path / "dicom")
    assert len(files) == shape[2]
    got = read_folder(tmp_path / "dicom")
    source = nib.load(image_path)
    error_mm, voxels = same_world_grid(got, source)
    assert error_mm < GEOMETRY_TOL_MM
    assert voxels.dtype == np.int16
    assert np.array_equal(voxels, np.asanyarray(source.dataobj))
    assert got.header.get_qform(coded=True)[1] == 1 and got.header.get_sform(coded=True)[1] == 1


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_float_image_round_trip_within_rescale_precision(tmp_path, modality):
    # Classic files, or for MR Enhanced single-frame files when no DICOM was read in this
    # process yet (a GDCM process-wide setting; the next test pins that case down).
    image_path, _ = two_blob_case(tmp_path / "nifti", "LAS", (1.5, 1.5, 4.0), (24, 20, 8),
                                  oblique=10.0, dtype=np.float32)
    slope = 0.01
    write_series(image_path, tmp_path / "dicom", rescale_slope=slope, modality=modality)
    header = pydicom.dcmread(next((tmp_path / "dicom").iterdir()))
    rescale = header if "RescaleSlope" in header else \
        header.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    assert float(rescale.RescaleSlope) == slope and header.PixelRepresentation == 1
    error_mm, voxels = same_world_grid(read_folder(tmp_path / "dicom"), nib.load(image_path))
    assert error_mm < GEOMETRY_TOL_MM
    diff = np.abs(voxels - np.asanyarray(nib.load(image_path).dataobj))
    assert diff.max() <= slope / 2 + 1e-4  # rounding to the stored integer, no more
    assert diff.max() > 0  # the data really needed the slope


def test_enhanced_single_frame_files_round_trip(tmp_path):
    # In a fresh process (no DICOM read yet) GDCM writes a rescaled MR image as Enhanced MR
    # single-frame files: geometry, pixel spacing and rescale live in functional groups.
    image_path, _ = two_blob_case(tmp_path / "nifti", "PIL", (2.0, 5.0, 3.0), (20, 12, 10),
                                  oblique=15.0, dtype=np.float32)
    script = ("import sys; from pathlib import Path; from tests.dicomsites import write_series; "
              "write_series(Path(sys.argv[1]), Path(sys.argv[2]), rescale_slope=0.01)")
    subprocess.run([sys.executable, "-c", script, str(image_path), str(tmp_path / "dicom")],
                   check=True, timeout=120, cwd=Path(__file__).parent.parent)
    header = pydicom.dcmread(next((tmp_path / "dicom").iterdir()))
    assert header.SOPClassUID.name == "Enhanced MR Image Storage"
    assert "ImageOrientationPatient" not in header and int(header.NumberOfFrames) == 1
    error_mm, voxels = same_world_grid(read_folder(tmp_path / "dicom"), nib.load(image_path))
    assert error_mm < GEOMETRY_TOL_MM
    assert np.abs(voxels - np.asanyarray(nib.load(image_path).dataobj)).max() <= 0.005 + 1e-4


# --- (2) a DICOM file shipped inside pydicom's wheel ---------------------------------------------

def bundled(name: str) -> Path:
    """A test file inside the installed pydicom package (never downloaded)."""
    path = Path(get_testdata_file(name, download=False))
    assert path.is_file() and Path(pydicom.__file__).parent in path.parents
    return path


def expected_affine(ds: pydicom.Dataset) -> np.ndarray:
    """Voxel (column, row, slice) -> RAS mm, written out from the DICOM standard's C.7.6.2."""
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * col_spacing
    lps[:3, 1] = iop[3:] * row_spacing
    lps[:3, 2] = np.cross(iop[:3], iop[3:]) * float(ds.SliceThickness)
    lps[:3, 3] = [float(v) for v in ds.ImagePositionPatient]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


@pytest.mark.parametrize("name", ["MR_small.dcm", "CT_small.dcm", "MR_small_RLE.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"])
def test_pydicom_bundled_file_reads_with_its_values_and_geometry(tmp_path, name):
    folder = tmp_path / "series"
    folder.mkdir()
    shutil.copy(bundled(name), folder / name)
    got = read_folder(folder)
    # Reference values: the uncompressed twin decoded by pydicom (no plugin needed for it).
    plain = pydicom.dcmread(bundled("CT_small.dcm" if name == "CT_small.dcm" else "MR_small.dcm"))
    expected = plain.pixel_array * float(plain.get("RescaleSlope", 1)) \
        + float(plain.get("RescaleIntercept", 0))
    assert got.shape == (plain.Columns, plain.Rows, 1)
    assert np.array_equal(np.asanyarray(got.dataobj)[:, :, 0], expected.T)
    assert np.allclose(got.affine, expected_affine(plain), atol=1e-6)


def test_ct_rescale_intercept_is_applied():
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    assert float(ds.RescaleIntercept) != 0  # the file really exercises the modality rescale


def test_enhanced_multiframe_reads_like_its_single_frame_series(tmp_path):
    # highdicom's legacy converter writes the series as one Enhanced MR multi-frame file.
    image_path, label_path = two_blob_case(tmp_path / "nifti", "PIL", (2.0, 5.0, 3.0),
                                           (20, 12, 14), 15.0)
    files = write_series(image_path, tmp_path / "single")
    datasets = [pydicom.dcmread(f) for f in files]
    for ds in datasets:  # MR attributes the converter requires and SimpleITK does not write
        for keyword, value in dict(ScanningSequence="GR", SequenceVariant="NONE", ScanOptions="",
                                   MRAcquisitionType="3D", EchoTime=1, RepetitionTime=2,
                                   EchoTrainLength=1, ImagingFrequency=1,
                                   MagneticFieldStrength=3, ContentDate="20240102",
                                   ContentTime="101500", AcquisitionNumber=1).items():
            setattr(ds, keyword, value)
    multiframe = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=datasets, series_instance_uid=hd.UID(), series_number=4,
        sop_instance_uid=hd.UID(), instance_number=1)
    (tmp_path / "multi").mkdir()
    multiframe.save_as(tmp_path / "multi" / "enhanced.dcm")
    assert int(pydicom.dcmread(tmp_path / "multi" / "enhanced.dcm").NumberOfFrames) == 14
    volume = read_series(one_series(tmp_path / "multi"))
    error_mm, voxels = same_world_grid(volume.image, nib.load(image_path))
    assert error_mm < GEOMETRY_TOL_MM
    assert np.array_equal(voxels, np.asanyarray(nib.load(image_path).dataobj))
    # A SEG of the multi-frame image references its frames; it reads back onto the grid.
    labels = np.asanyarray(nib.load(label_path).dataobj)
    _, labels = same_world_grid(nib.Nifti1Image(labels, nib.load(label_path).affine),
                                volume.image)
    seg = write_prediction_seg(labels, volume, tmp_path / "seg.dcm", ["left", "right"])
    assert np.array_equal(read_seg_labels(seg, volume, {1: 1, 2: 2}), labels)


# --- (3) SEG round trip ------------------------------------------------------------------------

def seg_case(tmp_path: Path, names: dict[int, str], *, swap=False) -> tuple[Path, Path, Path]:
    """A series (PIL, oblique) with a highdicom SEG of the two-blob label beside it."""
    image_path, label_path = two_blob_case(tmp_path / "nifti", "PIL", (2.0, 4.0, 3.0),
                                           (22, 12, 20), 20.0)
    files = write_series(image_path, tmp_path / "dicom" / "study" / "series")
    datasets = sorted_datasets(files)
    label = np.asanyarray(nib.load(label_path).dataobj)
    frames = label_frames(label, nib.load(label_path).affine, datasets)
    if swap:  # segment 1 holds class 2 and vice versa
        frames = np.where(frames > 0, 3 - frames, 0)
    write_seg(datasets, frames, names, tmp_path / "dicom" / "seg" / "seg.dcm")
    return image_path, label_path, tmp_path / "dicom"


def test_seg_round_trip_into_the_data_contract(tmp_path, capsys):
    image_path, label_path, dicom = seg_case(tmp_path, {1: "left blob", 2: "right blob"})
    assert main(["import-dicom", "--dicom", str(dicom), "--out", str(tmp_path / "site")]) == 0
    spec = json.loads((tmp_path / "site" / "dataset.json").read_text())
    assert spec["labels"] == {"0": "background", "1": "left blob", "2": "right blob"}
    assert spec["modality"] == {"0": "MR"} and spec["numTraining"] == 1
    site = read_dataset(tmp_path / "site", num_classes=3)
    case = site.cases[0]
    error_mm, label = same_world_grid(nib.load(case["label"]), nib.load(label_path))
    assert error_mm < GEOMETRY_TOL_MM
    assert np.array_equal(label, np.asanyarray(nib.load(label_path).dataobj))
    assert set(np.unique(label)) == {0, 1, 2}
    assert "classes: 1 left blob, 2 right blob" in capsys.readouterr().out


def test_seg_segments_map_to_declared_labels(tmp_path):
    # The SEG numbers the structures the other way round; --labels fixes the classes by name.
    _, label_path, dicom = seg_case(tmp_path, {1: "Right blob", 2: "Left blob"}, swap=True)
    assert main(["import-dicom", "--dicom", str(dicom), "--out", str(tmp_path / "site"),
                 "--labels", "left blob,right blob"]) == 0
    spec = json.loads((tmp_path / "site" / "dataset.json").read_text())
    assert spec["labels"] == {"0": "background", "1": "left blob", "2": "right blob"}
    case = read_dataset(tmp_path / "site", num_classes=3).cases[0]
    _, label = same_world_grid(nib.load(case["label"]), nib.load(label_path))
    assert np.array_equal(label, np.asanyarray(nib.load(label_path).dataobj))


@pytest.fixture
def blob_series(tmp_path):
    """A PIL oblique series, its volume as read, its sorted datasets and label frames."""
    image_path, label_path = two_blob_case(tmp_path / "nifti", "PIL", (2.0, 4.0, 3.0),
                                           (22, 12, 20), 20.0)
    datasets = sorted_datasets(write_series(image_path, tmp_path / "series"))
    label = nib.load(label_path)
    frames = label_frames(np.asanyarray(label.dataobj), label.affine, datasets)
    return read_series(one_series(tmp_path / "series")), datasets, frames


@pytest.mark.parametrize("kind", ["BINARY", "FRACTIONAL", "LABELMAP"])
def test_seg_types_read_onto_the_series_grid(blob_series, tmp_path, kind):
    volume, datasets, frames = blob_series
    pixels = frames
    if kind == "FRACTIONAL":  # probabilities: >= 0.5 is in the segment
        pixels = np.stack([(frames == 1) * 0.8, (frames == 2) * 0.6 + (frames == 1) * 0.3], -1)
    seg = write_seg(datasets, pixels, {1: "a", 2: "b"}, tmp_path / f"{kind}.dcm", kind)
    labels = read_seg_labels(seg, volume, {1: 2, 2: 1})  # classes swapped on purpose
    expected = np.where(frames > 0, 3 - frames, 0).transpose(2, 1, 0)
    assert labels.shape == volume.image.shape
    assert np.array_equal(labels, expected)


def test_seg_with_overlapping_segments_or_no_source_references(blob_series, tmp_path):
    volume, datasets, frames = blob_series
    both = np.stack([frames == 1, (frames == 1) | (frames == 2)], -1).astype(np.float32)
    seg = write_seg(datasets, both, {1: "a", 2: "b"}, tmp_path / "overlap.dcm", "FRACTIONAL")
    with pytest.raises(DataError, match=r"overlap.dcm: segments 1 and 2 overlap in \d+ voxels"):
        read_seg_labels(seg, volume, {1: 1, 2: 2})
    seg = write_seg(datasets, frames, {1: "a", 2: "b"}, tmp_path / "noref.dcm")
    ds = pydicom.dcmread(seg)
    for item in ds.PerFrameFunctionalGroupsSequence:  # placed by position only
        del item.DerivationImageSequence
    ds.save_as(seg)
    with pytest.raises(DataError, match="noref.dcm: SEG cannot be placed on series"):
        read_seg_labels(seg, volume, {1: 1, 2: 2})


# --- import-dicom: folder structures, ids, mapping, image-only series -------------------------

def test_import_many_series_with_nifti_labels_and_image_only(tmp_path, capsys):
    dicom = tmp_path / "export"
    cases = {}
    for i, (axcodes, oblique) in enumerate((("RAS", 0.0), ("PIL", 25.0), ("LPI", 5.0))):
        image_path, label_path = two_blob_case(tmp_path / f"n{i}", axcodes, (2.0, 2.5, 3.0),
                                               (18, 16, 12), oblique, seed=i)
        folder = dicom / f"patient{i}" / "20240102" / f"series{i}"
        write_series(image_path, folder)
        if i < 2:  # a label beside the series, in the NIfTI's own (other) voxel order
            shutil.copy(label_path, folder / "label.nii.gz")
        cases[i] = (image_path, label_path, folder)
    (dicom / "README.txt").write_text("not dicom")
    (dicom / "patient0" / "DICOMDIR").write_bytes(b"\0" * 10)
    assert main(["import-dicom", "--dicom", str(dicom), "--out", str(tmp_path / "site")]) == 0
    out = capsys.readouterr().out
    assert "2 labelled case(s) (NIfTI 2)" in out and "1 series without a label" in out
    spec = json.loads((tmp_path / "site" / "dataset.json").read_text())
    assert spec["numTraining"] == 2 and spec["numTest"] == 1
    assert spec["labels"] == {"0": "background", "1": "class 1", "2": "class 2"}
    site = read_dataset(tmp_path / "site", num_classes=3)
    with open(tmp_path / "site" / "dicom_import.csv", newline="") as handle:
        rows = {row["case_id"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {c["case"] for c in site.cases} | {
        Path(p).name.removesuffix(".nii.gz") for p in spec["test"]}
    for case in site.cases:
        row = rows[case["case"]]
        i = int(row["dicom_folder"].split("/")[0].removeprefix("patient"))
        image_path, label_path, _ = cases[i]
        assert row["label_source"] == f"nifti:{row['dicom_folder']}/label.nii.gz"
        error_mm, voxels = same_world_grid(nib.load(case["image"]), nib.load(image_path))
        assert error_mm < GEOMETRY_TOL_MM
        assert np.array_equal(voxels, np.asanyarray(nib.load(image_path).dataobj))
        _, label = same_world_grid(nib.load(case["label"]), nib.load(label_path))
        assert np.array_equal(label, np.asanyarray(nib.load(label_path).dataobj))
    # No patient name or ID in any file name or the mapping; ids are stable hashes.
    names = " ".join(str(p) for p in (tmp_path / "site").rglob("*"))
    text = (tmp_path / "site" / "dicom_import.csv").read_text()
    for secret in ("Doe", "PID-0042", "patient"):
        assert secret not in names
    assert "Doe" not in text and "PID-0042" not in text
    assert all(cid.startswith("dcm-") and len(cid) == 16 for cid in rows)


# --- (4) an imported case trains and predicts like its NIfTI original ---------------------------

TINY = {"sites": [{"name": "a", "data": "/x"}], "data": {"spacing": [8.0, 8.0, 8.0]},
        "model": {"channels": [4, 8], "strides": [2]},
        "train": {"patch_size": [16, 16, 16], "batch_size": 2, "lr": 1e-2},
        "evaluate": {"hd95": False}}


@pytest.fixture(scope="module")
def phantom_import(tmp_path_factory):
    """Tiny phantom site-b (LPS, 7x8x9 mm, int16) as DICOM: two cases with a SEG, one with a
    label.nii.gz, imported with the CLI. Returns (NIfTI cases, imported cases paired with
    them, DICOM folder of each, site folder)."""
    root = tmp_path_factory.mktemp("phantom-dicom")
    nifti_site = make_sites(root / "nifti", n_cases=3)["site-b"]
    originals = read_dataset(nifti_site, num_classes=2).cases
    folders = {}
    for i, case in enumerate(originals):
        folder = root / "dicom" / f"subject{i}" / "t1"
        files = write_series(Path(case["image"]), folder)
        if i < 2:
            datasets = sorted_datasets(files)
            label = nib.load(case["label"])
            frames = label_frames(np.asanyarray(label.dataobj), label.affine, datasets)
            write_seg(datasets, frames, {1: "brain"}, root / "dicom" / f"subject{i}" / "seg.dcm")
        else:
            shutil.copy(case["label"], folder / "label.nii.gz")
        folders[case["case"]] = folder
    assert main(["import-dicom", "--dicom", str(root / "dicom"), "--out",
                 str(root / "site")]) == 0
    with open(root / "site" / "dicom_import.csv", newline="") as handle:
        by_folder = {row["dicom_folder"]: row["case_id"] for row in csv.DictReader(handle)}
    imported = {c["case"]: c for c in read_dataset(root / "site", num_classes=2).cases}
    paired = [imported[by_folder[str(folders[c["case"]].relative_to(root / "dicom"))]]
              for c in originals]
    return originals, paired, folders, root / "site"


def test_phantom_site_imports_voxel_for_voxel(phantom_import):
    originals, paired, _, _ = phantom_import
    for original, imported in zip(originals, paired, strict=True):
        for key in ("image", "label"):
            error_mm, voxels = same_world_grid(nib.load(imported[key]), nib.load(original[key]))
            assert error_mm < GEOMETRY_TOL_MM
            assert np.array_equal(voxels, np.asanyarray(nib.load(original[key]).dataobj)), key


def test_imported_site_trains_and_predicts_like_the_original(phantom_import, tmp_path):
    originals, paired, folders, site = phantom_import
    torch.set_num_threads(2)
    cfg = parse_with(TINY, {})
    losses, models = [], []
    for cases in (originals, paired):
        task = build_task(cfg)
        model = task.build_model()  # seeded: identical start
        loader = task.make_train_loader(cases, seed=0)
        result = train_steps(task, model, task.make_optimizer(model.parameters()), loader, 6)
        losses.append(result.loss)
        models.append(model)
    assert abs(losses[0] - losses[1]) < 1e-4, losses
    # The imported site on its own, through the data contract's split: trains and evaluates.
    imported_site = read_dataset(site, num_classes=2)
    assert len(imported_site.train) == 2 and len(imported_site.validation) == 1
    task = build_task(cfg)
    evaluation = task.evaluate(models[1], imported_site.validation)
    assert 0.0 <= evaluation.metrics["dice"] <= 1.0

    model_path = save_model(tmp_path / "model.pt", config=cfg,
                            state_dict=models[1].state_dict())
    original, imported = originals[2], paired[2]
    from_nifti = nib.load(predict_file(model_path, original["image"], tmp_path / "a.nii.gz",
                                       device="cpu"))
    from_import = nib.load(predict_file(model_path, imported["image"], tmp_path / "b.nii.gz",
                                        device="cpu"))
    seg_out = tmp_path / "pred_seg.dcm"
    assert main(["predict", "--model", str(model_path), "--image", str(folders[original["case"]]),
                 "--out", str(tmp_path / "c.nii.gz"), "--seg-out", str(seg_out),
                 "--device", "cpu"]) == 0
    from_dicom = nib.load(tmp_path / "c.nii.gz")
    reference = np.asanyarray(from_nifti.dataobj)
    assert reference.any()  # the trained model finds brain: a real comparison
    for other in (from_import, from_dicom):
        error_mm, voxels = same_world_grid(other, from_nifti)
        assert error_mm < GEOMETRY_TOL_MM
        assert np.array_equal(voxels, reference)
    # The SEG, read back with highdicom (not our reader), holds the same voxels.
    datasets = sorted_datasets(sorted(folders[original["case"]].glob("*.dcm")))
    seg = hd.seg.segread(str(seg_out))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == datasets[0].SeriesInstanceUID
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in datasets], combine_segments=True)
    expected = label_frames(reference, from_nifti.affine, datasets)
    assert np.array_equal(frames, expected)

# --- (5) bad input -------------------------------------------------------------------------------

def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("fedscan: error:")
    return err[0]


@pytest.fixture
def series_folder(tmp_path) -> Path:
    image_path, _ = two_blob_case(tmp_path / "nifti", "LPS", (1.0, 1.0, 2.0), (12, 12, 8))
    write_series(image_path, tmp_path / "series")
    return tmp_path / "series"


def run_import(folder: Path, out: Path, *extra: str) -> int:
    return main(["import-dicom", "--dicom", str(folder), "--out", str(out), *extra])


def test_no_dicom_found(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    assert run_import(tmp_path / "empty", tmp_path / "site") == 2
    line = error_line(capsys)
    assert str(tmp_path / "empty") in line and "no DICOM images found" in line
    assert not (tmp_path / "site").exists()


@pytest.mark.parametrize(("damage", "needle"), [
    ("missing", "missing slices (1 missing"),
    ("uneven", "inconsistent slice spacing"),
    ("orientation", "inconsistent ImageOrientationPatient"),
    ("tilt", "gantry tilt"),
    ("repeated", "several volumes in one series"),
    ("syntax", "has no decoder here"),
    ("size", "images of different sizes"),
])
def test_broken_series_is_one_line_naming_it(series_folder, tmp_path, capsys, damage, needle):
    files = sorted(series_folder.iterdir())
    if damage == "missing":
        files[3].unlink()
    else:
        ds = pydicom.dcmread(files[3])
        ipp = [float(v) for v in ds.ImagePositionPatient]
        if damage == "uneven":
            ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 0.7]
        elif damage == "orientation":
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]
        elif damage == "tilt":
            for k, f in enumerate(files):
                d = pydicom.dcmread(f)
                p = [float(v) for v in d.ImagePositionPatient]
                d.ImagePositionPatient = [p[0], p[1] + 0.5 * k, p[2]]
                d.save_as(f)
            ds = pydicom.dcmread(files[3])
        elif damage == "repeated":
            ds.ImagePositionPatient = [float(v) for v in pydicom.dcmread(files[2])
                                       .ImagePositionPatient]
        elif damage == "syntax":
            # HTJ2K lossless: a syntax GDCM here cannot decode (a real codestream is not needed
            # to be refused up front).
            ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"
            ds.PixelData = encapsulate([b"\xffO\xffQ" + bytes(64)])
        elif damage == "size":
            ds.Rows = 10
        ds.save_as(files[3], enforce_file_format=False)
    assert run_import(series_folder, tmp_path / "site") == 2
    line = error_line(capsys)
    assert needle in line
    assert str(series_folder) in line or files[3].name in line
    assert not (tmp_path / "site").exists()


def test_skip_bad_imports_the_rest(series_folder, tmp_path, capsys):
    other = tmp_path / "export"
    shutil.copytree(series_folder, other / "good")
    shutil.copytree(series_folder, other / "bad")
    for f in (other / "bad").iterdir():  # a new series uid, then a gap
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = "1.2.3.4.5"
        ds.save_as(f)
    sorted((other / "bad").iterdir())[2].unlink()
    assert run_import(other, tmp_path / "site") == 2
    assert "missing slices" in error_line(capsys)
    assert run_import(other, tmp_path / "site", "--skip-bad") == 0
    captured = capsys.readouterr()
    assert "fedscan: warning: skipped" in captured.err and str(other / "bad") in captured.err
    assert "1 series without a label" in captured.out and "skipped 1 series" in captured.out


def test_seg_referencing_another_series(tmp_path, capsys):
    _, _, dicom = seg_case(tmp_path, {1: "left", 2: "right"})
    shutil.rmtree(dicom / "study")  # the SEG's series is not exported
    image_path, _ = two_blob_case(tmp_path / "n2", "RAS", (2.0, 2.0, 2.0), (10, 10, 6))
    write_series(image_path, dicom / "other")
    assert run_import(dicom, tmp_path / "site") == 2
    line = error_line(capsys)
    assert "seg.dcm" in line and "references series" in line and "not under" in line


def test_out_folder_must_be_new(series_folder, tmp_path, capsys):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "keep.txt").write_text("mine")
    assert run_import(series_folder, tmp_path / "site") == 2
    assert "exists and is not empty" in error_line(capsys)
    assert (tmp_path / "site" / "keep.txt").read_text() == "mine"


def test_predict_needs_one_series(series_folder, tmp_path, capsys):
    export = tmp_path / "export"
    shutil.copytree(series_folder, export / "a")
    shutil.copytree(series_folder, export / "b")
    for f in (export / "b").iterdir():
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = "1.2.3.4.6"
        ds.SeriesDescription = "second"
        ds.save_as(f)
    cfg = parse_with(TINY, {})
    model = save_model(tmp_path / "m.pt", config=cfg,
                       state_dict=build_task(cfg).build_model().state_dict())
    assert main(["predict", "--model", str(model), "--image", str(export),
                 "--out", str(tmp_path / "o.nii.gz")]) == 2
    line = error_line(capsys)
    assert "holds 2 image series, one is expected" in line and str(export / "b") in line
    assert main(["predict", "--model", str(model), "--image", str(export / "a"),
                 "--out", str(tmp_path / "o.nii.gz"), "--seg-out", str(tmp_path / "o.nii")]) == 2
    assert "expected a .dcm file name" in error_line(capsys)
    nifti = tmp_path / "nifti" / "image.nii.gz"
    assert main(["predict", "--model", str(model), "--image", str(nifti),
                 "--out", str(tmp_path / "o.nii.gz"), "--seg-out", str(tmp_path / "s.dcm")]) == 2
    assert "--seg-out needs a DICOM series" in error_line(capsys)
    assert not (tmp_path / "o.nii.gz").exists()


def test_cli_process_prints_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedscan", "import-dicom", "--dicom",
                           str(tmp_path / "nowhere"), "--out", str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"fedscan: error: {tmp_path / 'nowhere'}: DICOM folder not found"
