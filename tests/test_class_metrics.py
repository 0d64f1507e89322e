"""Per-class Dice and HD95: values, names, means over cases, the console table, and
predict --label's scoring of a prediction against a reference label (real NIfTI files)."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

from fedscan.shared.checkpoint import save_model
from fedscan.shared.errors import DataError
from fedscan.shared.inference import score_prediction
from fedscan.shared.metrics import case_metrics, mean_over_cases
from fedscan.shared.report import format_class_table
from fedscan.shared.tasks.segmentation import SegmentationTask
from tests.tinysites import parse_with

NAMES = ["background", "left", "right", "core"]


def label_pair() -> tuple[np.ndarray, np.ndarray]:
    """Reference and prediction: ``left`` exact, ``right`` half overlapping, ``core`` absent
    from the prediction."""
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[1:5, 2:8, 2:8] = 1
    ref[7:11, 2:8, 2:8] = 2
    ref[5:7, 9:11, 9:11] = 3
    pred = ref.copy()
    pred[pred == 3] = 0
    pred[7:11, 2:5, 2:8] = 0  # half of right missed
    return ref, pred


def test_case_metrics_per_class():
    ref, pred = label_pair()
    m = case_metrics(pred, ref, 4, (1.0, 2.0, 1.0), class_names=NAMES)
    assert m["dice/left"] == pytest.approx(1.0)
    assert m["dice/right"] == pytest.approx(2 * 72 / (144 + 72))
    assert m["dice/core"] == 0.0
    assert m["dice"] == pytest.approx(np.mean([m["dice/left"], m["dice/right"], 0.0]))
    assert m["hd95/left"] == 0.0
    assert m["hd95/right"] == pytest.approx(3 * 2.0)  # 3 voxels along the 2 mm axis
    assert math.isnan(m["hd95/core"])  # undefined: absent from the prediction
    assert m["hd95"] == pytest.approx(np.mean([m["hd95/left"], m["hd95/right"]]))
    # Without names: class_1, class_2, ...; a class absent from both scores Dice 1.
    plain = case_metrics(ref, ref, 5, (1.0, 1.0, 1.0), hd95=False)
    assert plain == {"dice": 1.0, "dice/class_1": 1.0, "dice/class_2": 1.0,
                     "dice/class_3": 1.0, "dice/class_4": 1.0}


def test_mean_over_cases_skips_undefined_values():
    cases = [{"dice": 0.5, "hd95/a": float("nan")}, {"dice": 1.0, "hd95/a": 4.0}]
    assert mean_over_cases(cases) == {"dice": 0.75, "hd95/a": 4.0}
    assert math.isnan(mean_over_cases([{"hd95": float("nan")}])["hd95"])


def test_evaluate_reports_every_class_with_configured_names(tmp_path):
    """Aggregates carry a key per class (the same at every site), per-case values stay in
    ``per_case``, and the headline is the mean over foreground classes."""
    cfg = parse_with({"sites": [{"name": "a", "data": "/x"}],
                      "data": {"spacing": [2.0, 2.0, 2.0], "num_classes": 4, "labels": NAMES},
                      "model": {"channels": [4, 8], "strides": [2]},
                      "train": {"patch_size": [16, 16, 16]}}, {})
    ref, _ = label_pair()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    cases = []
    for i in range(2):
        case = {"case": f"c{i}", "image": str(tmp_path / f"i{i}.nii.gz"),
                "label": str(tmp_path / f"l{i}.nii.gz")}
        nib.save(nib.Nifti1Image((ref * 50.0 + i).astype(np.float32), affine), case["image"])
        nib.save(nib.Nifti1Image(ref, affine), case["label"])
        cases.append(case)
    task = SegmentationTask(cfg)
    result = task.evaluate(task.build_model(), cases)
    keys = {f"{m}/{c}" for m in ("dice", "hd95") for c in NAMES[1:]}
    assert keys | {"dice", "hd95"} == set(result.metrics)
    assert set(result.per_case) == {"c0", "c1"}
    for name in NAMES[1:]:
        assert result.metrics[f"dice/{name}"] == pytest.approx(
            np.mean([m[f"dice/{name}"] for m in result.per_case.values()]))
    assert result.metrics["dice"] == pytest.approx(
        np.mean([result.metrics[f"dice/{c}"] for c in NAMES[1:]]))


def test_class_table_lists_each_class_and_the_mean():
    ref, pred = label_pair()
    m = case_metrics(pred, ref, 4, (1.0, 1.0, 1.0), class_names=NAMES)
    lines = format_class_table(m, NAMES[1:]).splitlines()
    assert lines[0].split() == ["class", "dice", "hd95", "(mm)"]
    assert [line.split()[0] for line in lines[1:]] == ["left", "right", "core", "mean"]
    assert lines[3].split()[1:] == ["0.0000", "—"]
    assert format_class_table({"dice": 0.9}) == ""


@pytest.fixture
def model_file(tmp_path):
    cfg = parse_with({"sites": [{"name": "a", "data": "/x"}],
                      "data": {"num_classes": 4, "labels": NAMES},
                      "model": {"channels": [4, 8], "strides": [2]}}, {})
    model = SegmentationTask(cfg).build_model()
    return save_model(tmp_path / "m.pt", config=cfg,
                      state_dict={k: v.clone() for k, v in model.state_dict().items()})


def test_score_prediction_against_reference(tmp_path, model_file):
    ref, pred = label_pair()
    affine = np.diag([1.0, 2.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(ref, affine), tmp_path / "ref.nii.gz")
    nib.save(nib.Nifti1Image(pred, affine), tmp_path / "pred.nii.gz")
    metrics, names = score_prediction(model_file, tmp_path / "pred.nii.gz",
                                      tmp_path / "ref.nii.gz")
    assert names == NAMES
    assert metrics == case_metrics(pred, ref, 4, (1.0, 2.0, 1.0), class_names=NAMES) | {
        k: metrics[k] for k in metrics if k.startswith("hd95") and math.isnan(metrics[k])}
    # A reference on another grid, or with a class the model does not have, names the file.
    nib.save(nib.Nifti1Image(ref, np.diag([1.0, 1.0, 1.0, 1.0])), tmp_path / "moved.nii.gz")
    with pytest.raises(DataError, match="moved.nii.gz: its affine differs"):
        score_prediction(model_file, tmp_path / "pred.nii.gz", tmp_path / "moved.nii.gz")
    nib.save(nib.Nifti1Image((ref * 20).astype(np.uint16), affine), tmp_path / "big.nii.gz")
    with pytest.raises(DataError, match=r"big.nii.gz: label values must be integers in \[0, 4\)"):
        score_prediction(model_file, tmp_path / "pred.nii.gz", tmp_path / "big.nii.gz")
