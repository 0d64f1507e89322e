"""Tests for the data contract (shared/data.py) on real NIfTI files written with nibabel."""

from __future__ import annotations

import gzip
import json
import random
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from fedscan.shared.data import (
    SiteData,
    case_id,
    check_case,
    load_nifti,
    read_dataset,
    read_label,
    read_test_set,
)
from fedscan.shared.errors import DataError

SHAPE = (8, 9, 7)
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    """Write ``data`` as a NIfTI file, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def write_case(
    root: Path,
    cid: str,
    *,
    image: np.ndarray | None = None,
    label: np.ndarray | None = None,
    image_affine: np.ndarray = AFFINE,
    label_affine: np.ndarray = AFFINE,
    folder: str = "Tr",
) -> dict[str, str]:
    """Write one image/label pair; returns its dataset.json entry (relative paths)."""
    rng = np.random.default_rng(zlib.crc32(cid.encode()))
    if image is None:
        image = rng.normal(size=SHAPE).astype(np.float32)
    if label is None:
        label = (rng.random(SHAPE) > 0.7).astype(np.uint8)
    write_nifti(root / f"images{folder}" / f"{cid}.nii.gz", image, image_affine)
    write_nifti(root / f"labels{folder}" / f"{cid}.nii.gz", label, label_affine)
    return {"image": f"./images{folder}/{cid}.nii.gz", "label": f"./labels{folder}/{cid}.nii.gz"}


def write_json(root: Path, spec: Any) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "dataset.json"
    path.write_text(json.dumps(spec))
    return path


def make_site(root: Path, n: int = 5, validation: int = 0) -> Path:
    """A valid site with ``n`` training cases and ``validation`` listed validation cases."""
    spec: dict[str, Any] = {
        "name": "test",
        "training": [write_case(root, f"case_{i:03d}") for i in range(n)],
    }
    if validation:
        spec["validation"] = [write_case(root, f"val_{i:03d}", folder="Val")
                              for i in range(validation)]
    write_json(root, spec)
    return root


def expect_error(match: str, fn: Any, *args: Any, **kwargs: Any) -> str:
    """Call ``fn``; assert it raises a one-line DataError containing ``match``."""
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    assert match in message, message
    return message


# --- valid sites -------------------------------------------------------------------------


def test_site_without_validation_list_is_split(tmp_path: Path) -> None:
    root = make_site(tmp_path / "site-a", n=10)
    site = read_dataset(root, num_classes=2)
    assert isinstance(site, SiteData)
    assert site.name == "site-a"
    assert site.root == root.absolute()
    assert len(site.validation) == 2 and len(site.train) == 8
    for case in site.cases:
        assert set(case) == {"image", "label", "case"}
        assert Path(case["image"]).is_absolute() and Path(case["image"]).is_file()
        assert Path(case["label"]).is_absolute() and Path(case["label"]).is_file()
        assert case["image"].endswith(f"imagesTr/{case['case']}.nii.gz")
    ids = [c["case"] for c in site.cases]
    assert sorted(ids) == [f"case_{i:03d}" for i in range(10)]
    assert [c["case"] for c in site.train] == sorted(c["case"] for c in site.train)


def test_site_with_validation_list(tmp_path: Path) -> None:
    root = make_site(tmp_path / "site-b", n=4, validation=2)
    site = read_dataset(root, name="hospital-b", num_classes=2)
    assert site.name == "hospital-b"
    assert [c["case"] for c in site.train] == [f"case_{i:03d}" for i in range(4)]
    assert [c["case"] for c in site.validation] == ["val_000", "val_001"]
    assert "imagesVal" in site.validation[0]["image"]
    assert site.cases == site.train + site.validation


def test_empty_validation_list_means_split(tmp_path: Path) -> None:
    root = make_site(tmp_path / "s", n=5)
    spec = json.loads((root / "dataset.json").read_text())
    spec["validation"] = []
    write_json(root, spec)
    site = read_dataset(root)
    assert len(site.validation) == 1 and len(site.train) == 4


def test_single_case_site_has_no_validation(tmp_path: Path) -> None:
    site = read_dataset(make_site(tmp_path / "s", n=1))
    assert len(site.train) == 1 and site.validation == []


def test_two_case_site_keeps_a_training_case(tmp_path: Path) -> None:
    site = read_dataset(make_site(tmp_path / "s", n=2), val_fraction=0.9)
    assert len(site.train) == 1 and len(site.validation) == 1


def test_read_test_set_returns_all_cases(tmp_path: Path) -> None:
    root = make_site(tmp_path / "test", n=3, validation=1)
    cases = read_test_set(root, num_classes=2)
    assert [c["case"] for c in cases] == ["case_000", "case_001", "case_002", "val_000"]


def test_check_false_skips_content_reads(tmp_path: Path) -> None:
    root = make_site(tmp_path / "s", n=3)
    (root / "labelsTr" / "case_001.nii.gz").write_bytes(b"not a nifti")
    assert len(read_dataset(root, check=False).cases) == 3
    expect_error("case_001.nii.gz", read_dataset, root)


# --- split -------------------------------------------------------------------------------


def ids(cases: list[dict[str, str]]) -> set[str]:
    return {c["case"] for c in cases}


def test_split_is_deterministic_disjoint_and_complete(tmp_path: Path) -> None:
    root = make_site(tmp_path / "s", n=12)
    a = read_dataset(root, split_seed=3, check=False)
    b = read_dataset(root, split_seed=3, check=False)
    assert a == b
    assert not ids(a.train) & ids(a.validation)
    assert ids(a.train) | ids(a.validation) == {f"case_{i:03d}" for i in range(12)}
    assert len(a.validation) == round(0.2 * 12)


def test_split_ignores_training_list_order(tmp_path: Path) -> None:
    root = make_site(tmp_path / "s", n=12)
    before = read_dataset(root, check=False)
    spec = json.loads((root / "dataset.json").read_text())
    random.Random(1).shuffle(spec["training"])
    spec["training"].reverse()
    write_json(root, spec)
    after = read_dataset(root, check=False)
    assert after == before


def test_split_depends_on_seed_and_fraction(tmp_path: Path) -> None:
    root = make_site(tmp_path / "s", n=20)
    vals = {frozenset(ids(read_dataset(root, split_seed=s, check=False).validation))
            for s in range(5)}
    assert len(vals) > 1
    assert len(read_dataset(root, val_fraction=0.5, check=False).validation) == 10


def test_bad_val_fraction_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        read_dataset(make_site(tmp_path / "s", n=2), val_fraction=1.0)


# --- accepted variants -------------------------------------------------------------------


def test_float_labels_with_integral_values_are_accepted(tmp_path: Path) -> None:
    label = np.zeros(SHAPE, np.float32)
    label[2:4, 2:4, 2:4] = 1.0
    write_json(tmp_path, {"training": [write_case(tmp_path, "f", label=label)]})
    read_dataset(tmp_path, num_classes=2)


def test_4d_image_with_two_channels(tmp_path: Path) -> None:
    image = np.random.default_rng(0).normal(size=(*SHAPE, 2)).astype(np.float32)
    write_json(tmp_path, {"training": [write_case(tmp_path, "mm", image=image)]})
    site = read_dataset(tmp_path, num_classes=2, in_channels=2)
    assert site.train[0]["case"] == "mm"
    expect_error("mm.nii.gz", read_dataset, tmp_path, in_channels=1)


def test_label_with_trailing_singleton_axis_and_int_dtypes(tmp_path: Path) -> None:
    label = np.zeros((*SHAPE, 1), np.int16)
    label[1, 1, 1, 0] = 2
    image = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    write_json(tmp_path, {"training": [write_case(tmp_path, "x", image=image, label=label)]})
    read_dataset(tmp_path, num_classes=3)


def test_small_affine_rounding_is_accepted(tmp_path: Path) -> None:
    nudged = AFFINE.copy()
    nudged[0, 3] += 1e-4
    write_json(tmp_path, {"training": [write_case(tmp_path, "x", label_affine=nudged)]})
    read_dataset(tmp_path)


def test_uncompressed_nii_and_case_id(tmp_path: Path) -> None:
    write_nifti(tmp_path / "imagesTr" / "a.b.nii", np.ones(SHAPE, np.float32))
    write_nifti(tmp_path / "labelsTr" / "a.b.nii", np.zeros(SHAPE, np.uint8))
    write_json(tmp_path, {"training": [{"image": "imagesTr/a.b.nii", "label": "labelsTr/a.b.nii"}]})
    assert read_dataset(tmp_path).train[0]["case"] == "a.b"


def test_load_nifti_returns_in_memory_image(tmp_path: Path) -> None:
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    path = write_nifti(tmp_path / "x.nii.gz", data)
    img = load_nifti(path)
    assert isinstance(img, nib.Nifti1Image)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, AFFINE)


# --- errors: folder and dataset.json -----------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    expect_error("nowhere", read_dataset, tmp_path / "nowhere")


def test_folder_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    expect_error(str(tmp_path / "f"), read_dataset, tmp_path / "f")


def test_missing_dataset_json(tmp_path: Path) -> None:
    msg = expect_error("dataset.json", read_dataset, tmp_path)
    assert msg == f"{tmp_path / 'dataset.json'}: missing"


def test_invalid_json(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text('{"training": [\n  {"image": ,}\n]')
    expect_error("dataset.json: not valid JSON", read_dataset, tmp_path)


def test_json_top_level_not_object(tmp_path: Path) -> None:
    write_json(tmp_path, [1, 2])
    expect_error("dataset.json: top level", read_dataset, tmp_path)


@pytest.mark.parametrize("spec", [{}, {"training": []}, {"training": "x"}, {"training": None}])
def test_missing_or_empty_training(tmp_path: Path, spec: dict[str, Any]) -> None:
    write_json(tmp_path, spec)
    msg = expect_error("'training' must be a non-empty list", read_dataset, tmp_path)
    assert msg.startswith(str(tmp_path / "dataset.json"))


def test_validation_not_a_list(tmp_path: Path) -> None:
    make_site(tmp_path, n=2)
    spec = json.loads((tmp_path / "dataset.json").read_text())
    spec["validation"] = "imagesVal"
    write_json(tmp_path, spec)
    expect_error("'validation' must be a non-empty list", read_dataset, tmp_path)


@pytest.mark.parametrize("entry", [
    "imagesTr/a.nii.gz",
    {"image": "imagesTr/a.nii.gz"},
    {"label": "labelsTr/a.nii.gz"},
    {"image": 3, "label": "labelsTr/a.nii.gz"},
    {"image": "", "label": "labelsTr/a.nii.gz"},
])
def test_bad_entry(tmp_path: Path, entry: Any) -> None:
    ok = write_case(tmp_path, "ok")
    write_json(tmp_path, {"training": [ok, entry]})
    expect_error("dataset.json: 'training'[1] must be an object", read_dataset, tmp_path)


def test_non_nifti_extension(tmp_path: Path) -> None:
    write_json(tmp_path, {"training": [{"image": "imagesTr/a.mha", "label": "labelsTr/a.nii"}]})
    expect_error("'training'[0].image: expected a .nii or .nii.gz file", read_dataset, tmp_path)


@pytest.mark.parametrize("which", ["image", "label"])
def test_referenced_file_missing(tmp_path: Path, which: str) -> None:
    make_site(tmp_path, n=3)
    (tmp_path / f"{which}sTr" / "case_002.nii.gz").unlink()
    msg = expect_error(f"{which}sTr/case_002.nii.gz: missing", read_dataset, tmp_path,
                       check=False)
    assert str(tmp_path) in msg and f"'training'[2].{which}" in msg


def test_duplicate_case_ids(tmp_path: Path) -> None:
    a = write_case(tmp_path, "dup")
    b = write_case(tmp_path, "dup", folder="Val")
    write_json(tmp_path, {"training": [a], "validation": [b]})
    msg = expect_error("duplicate case id 'dup'", read_dataset, tmp_path)
    assert "dataset.json" in msg and "imagesVal/dup.nii.gz" in msg


def test_duplicate_ids_across_nii_and_nii_gz(tmp_path: Path) -> None:
    a = write_case(tmp_path, "dup")
    write_nifti(tmp_path / "imagesTr" / "dup.nii", np.ones(SHAPE, np.float32))
    b = {"image": "imagesTr/dup.nii", "label": a["label"]}
    write_json(tmp_path, {"training": [a, b]})
    expect_error("duplicate case id 'dup'", read_dataset, tmp_path, check=False)


# --- errors: file contents ---------------------------------------------------------------


def test_truncated_gzip(tmp_path: Path) -> None:
    make_site(tmp_path, n=2)
    path = tmp_path / "imagesTr" / "case_001.nii.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])
    expect_error(f"{path}: not a readable NIfTI", read_dataset, tmp_path)


def test_truncated_uncompressed(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "x.nii", np.ones(SHAPE, np.float32))
    path.write_bytes(path.read_bytes()[:-100])
    expect_error(f"{path}: not a readable NIfTI", load_nifti, path)


@pytest.mark.parametrize("content", [b"", b"hello, not a nifti", gzip.compress(b"junk" * 100)])
def test_garbage_file(tmp_path: Path, content: bytes) -> None:
    make_site(tmp_path, n=2)
    path = tmp_path / "labelsTr" / "case_000.nii.gz"
    path.write_bytes(content)
    expect_error(f"{path}: not a readable NIfTI", read_dataset, tmp_path)


def test_load_nifti_missing(tmp_path: Path) -> None:
    expect_error(f"image file not found: {tmp_path / 'gone.nii.gz'}", load_nifti,
                 tmp_path / "gone.nii.gz")


def test_shape_mismatch(tmp_path: Path) -> None:
    label = np.zeros((8, 9, 5), np.uint8)
    write_json(tmp_path, {"training": [write_case(tmp_path, "s", label=label)]})
    msg = expect_error("image/label shape mismatch", read_dataset, tmp_path)
    assert "imagesTr/s.nii.gz (8, 9, 7)" in msg and "labelsTr/s.nii.gz (8, 9, 5)" in msg


def test_affine_mismatch(tmp_path: Path) -> None:
    shifted = AFFINE.copy()
    shifted[2, 3] = 5.0
    write_json(tmp_path, {"training": [write_case(tmp_path, "a", label_affine=shifted)]})
    msg = expect_error("image/label affine mismatch", read_dataset, tmp_path)
    assert "imagesTr/a.nii.gz" in msg and "labelsTr/a.nii.gz" in msg


def test_label_value_out_of_range(tmp_path: Path) -> None:
    label = np.zeros(SHAPE, np.uint8)
    label[0, 0, 0] = 3
    write_json(tmp_path, {"training": [write_case(tmp_path, "l", label=label)]})
    msg = expect_error("labelsTr/l.nii.gz: label values must be integers in [0, 2), found 3",
                       read_dataset, tmp_path, num_classes=2)
    assert msg.startswith(str(tmp_path))
    read_dataset(tmp_path, num_classes=4)  # fine with more classes
    read_dataset(tmp_path)  # and without an upper bound


def test_negative_label(tmp_path: Path) -> None:
    label = np.zeros(SHAPE, np.int8)
    label[0, 0, 0] = -1
    write_json(tmp_path, {"training": [write_case(tmp_path, "n", label=label)]})
    expect_error("n.nii.gz: label values must be non-negative integers, found -1",
                 read_dataset, tmp_path)


@pytest.mark.parametrize(("value", "shown"), [(0.5, "0.5"), (np.nan, "nan")])
def test_non_integer_label(tmp_path: Path, value: float, shown: str) -> None:
    label = np.zeros(SHAPE, np.float32)
    label[1, 2, 3] = value
    write_json(tmp_path, {"training": [write_case(tmp_path, "f", label=label)]})
    expect_error(f"labelsTr/f.nii.gz: label values must be integers in [0, 2), found {shown}",
                 read_dataset, tmp_path, num_classes=2)


@pytest.mark.parametrize(("value", "shown"), [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_non_finite_image(tmp_path: Path, value: float, shown: str) -> None:
    image = np.zeros(SHAPE, np.float32)
    image[4, 4, 4] = value
    write_json(tmp_path, {"training": [write_case(tmp_path, "nan", image=image)]})
    expect_error(f"imagesTr/nan.nii.gz: image contains {shown}", read_dataset, tmp_path)


def test_wrong_channel_count(tmp_path: Path) -> None:
    write_json(tmp_path, {"training": [write_case(tmp_path, "c")]})
    expect_error("imagesTr/c.nii.gz: expected 2 image channel(s)", read_dataset, tmp_path,
                 in_channels=2)


def test_label_with_channels_is_rejected(tmp_path: Path) -> None:
    label = np.zeros((*SHAPE, 2), np.uint8)
    write_json(tmp_path, {"training": [write_case(tmp_path, "m", label=label)]})
    expect_error("labelsTr/m.nii.gz: a label must be a single-channel", read_dataset, tmp_path)


def test_check_case_directly(tmp_path: Path) -> None:
    entry = write_case(tmp_path, "d")
    case = {"image": str(tmp_path / entry["image"]), "label": str(tmp_path / entry["label"]),
            "case": "d"}
    check_case(case, num_classes=2)
    expect_error("d.nii.gz: label values must be integers in [0, 1)", check_case, case,
                 num_classes=1)


# -- dataset.json metadata and labels read for evaluation ----------------------------------------


@pytest.mark.parametrize("labels, channels", [
    ({"0": "background", "1": "brain", "2": "csf"}, {"modality": {"0": "T1"}}),   # MSD
    ({"background": 0, "csf": 2, "brain": 1}, {"channel_names": {"0": "T1"}}),    # nnU-Net v2
], ids=["msd", "nnunet"])
def test_class_and_channel_names_are_read(tmp_path: Path, labels, channels) -> None:
    make_site(tmp_path)
    spec = json.loads((tmp_path / "dataset.json").read_text())
    write_json(tmp_path, {**spec, "labels": labels, **channels, "description": "phantoms"})
    site = read_dataset(tmp_path, num_classes=3, check=False)
    assert site.class_names == ("background", "brain", "csf")
    assert site.channel_names == ("T1",) and site.description == "phantoms"


@pytest.mark.parametrize("extra, match", [
    ({"labels": {"0": "background", "1": "brain"}},
     "'labels' names 2 classes (background, brain), data.num_classes is 3"),
    ({"labels": {"0": "background", "2": "brain", "3": "csf"}}, "0..2 without gaps"),
    ({"labels": {"background": 0, "tumour": [1, 2], "x": 3}}, "region-based labels"),
    ({"modality": {"0": "T1", "1": "T2"}}, "'modality' names 2 image channel(s), "
                                          "data.in_channels is 1"),
], ids=["count", "gap", "regions", "channels"])
def test_metadata_that_disagrees_with_the_config_is_named(tmp_path: Path, extra, match) -> None:
    make_site(tmp_path)
    spec = json.loads((tmp_path / "dataset.json").read_text())
    write_json(tmp_path, {**spec, **extra})
    message = expect_error(match, read_dataset, tmp_path, num_classes=3, check=False)
    assert str(tmp_path / "dataset.json") in message


def test_read_label_checks_shape_and_values(tmp_path: Path) -> None:
    label = np.zeros((*SHAPE, 1), dtype=np.float32)  # trailing channel axis, float storage
    label[2:4, 2:4, 2:4, 0] = 1.0
    path = write_nifti(tmp_path / "l.nii.gz", label)
    out = read_label(path, 2, SHAPE)
    assert out.shape == SHAPE and out.dtype == np.int64 and int(out.sum()) == 8
    expect_error("differs from its image's", read_label, path, 2, (8, 9, 6))
    expect_error("label values must be integers in [0, 1), found 1", read_label, path, 1)


def test_case_id_of_cases_and_paths() -> None:
    assert case_id({"image": "/a/imagesTr/x_001.nii.gz", "label": "/a/l.nii.gz"}) == "x_001"
    assert case_id({"image": "/a/y.nii", "case": "own-id"}) == "own-id"
    assert case_id(Path("/b/z.nii.gz")) == "z"
