"""predict --uncertainty: maps on the input's grid, MC dropout or TTA, flips that respect
mirrored classes, and the wrong/correct summary."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from fedscan.shared.checkpoint import save_model
from fedscan.shared.tasks.segmentation import SegmentationTask
from fedscan.shared.uncertainty import (
    error_uncertainty,
    predict_with_uncertainty,
    scan_score,
    uncertainty_path,
)
from tests.tinysites import parse_with

SIDE = 16


def config(**sections):
    base = {"sites": [{"name": "a", "data": "/x"}],
            "data": {"spacing": [2.0, 2.0, 2.0], "num_classes": 3},
            "model": {"channels": [4, 8], "strides": [2]},
            "train": {"patch_size": [SIDE] * 3},
            "evaluate": {"sw_overlap": 0.0}}
    return parse_with(base, sections)


def write_scan(folder, name: str = "scan") -> tuple[str, str]:
    """A 16^3 2 mm scan stored LPS: a bright block left (class 1), a darker one right (2)."""
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    affine[:3, 3] = [15.0, 15.0, -15.0]
    label = np.zeros((SIDE,) * 3, np.uint8)
    label[2:7, 4:12, 4:12] = 2  # LPS: low voxel index 0 is the right side
    label[9:14, 4:12, 4:12] = 1
    rng = np.random.default_rng(0)
    image = (100 + 80 * (label == 1) + 40 * (label == 2) + rng.normal(0, 5, label.shape))
    paths = str(folder / f"{name}.nii.gz"), str(folder / f"{name}_ref.nii.gz")
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), paths[0])
    nib.save(nib.Nifti1Image(label, affine), paths[1])
    return paths


class SideModel(nn.Module):
    """Labels by position alone, as a network that learnt anatomy would: class 1 in the left
    half of its window along ``axis``, class 2 in the right half, so a flipped scan gets the
    same classes on the same side of the window."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[2 + self.axis]
        shape = [1, 1, 1, 1, 1]
        shape[2 + self.axis] = n
        left = (torch.arange(n) < n // 2).float().reshape(shape).expand(x.shape[0], 1,
                                                                        *x.shape[2:])
        return torch.cat([torch.zeros_like(left), 8 * left, 8 * (1 - left)], 1)


def test_tta_flips_back_and_swaps_mirrored_classes(tmp_path):
    scan, _ = write_scan(tmp_path)
    paired = config(data={"mirror_pairs": [[1, 2]]})
    sure = predict_with_uncertainty(SideModel(0), scan, paired, "cpu", passes=4)
    assert sure.method == "tta"
    assert sure.uncertainty.max() < 1e-2  # flipped passes agree once classes are swapped
    # Left (class 1) lies at high LPS voxel index: the model's window is RAS.
    assert (sure.labels[SIDE // 2:] == 1).all() and (sure.labels[: SIDE // 2] == 2).all()
    # Declared symmetric, the flip swaps nothing: this model's flipped passes then disagree.
    unsure = predict_with_uncertainty(SideModel(0), scan,
                                      config(data={"symmetric_labels": True}), "cpu", passes=4)
    assert unsure.uncertainty.mean() > 0.5


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_maps_lie_on_the_input_grid(tmp_path, dropout):
    scan, ref = write_scan(tmp_path)
    cfg = config(model={"dropout": dropout})
    torch.manual_seed(0)
    model = SegmentationTask(cfg).build_model().eval()
    result = predict_with_uncertainty(model, scan, cfg, "cpu", passes=3)
    assert result.method == ("mc-dropout" if dropout else "tta")
    assert result.labels.shape == result.uncertainty.shape == nib.load(scan).shape
    assert result.uncertainty.dtype == np.float32
    assert result.uncertainty.min() >= 0.0 and result.uncertainty.max() <= 1.0
    assert result.uncertainty.std() > 0 and 0.0 < result.score <= 1.0
    assert not any(m.training for m in model.modules())  # eval restored, dropout included


def test_error_uncertainty_counts_foreground_only():
    labels = np.array([0, 1, 1, 2, 0])
    reference = np.array([0, 1, 2, 2, 1])
    uncertainty = np.array([0.9, 0.1, 0.8, 0.2, 0.6])
    assert error_uncertainty(labels, reference, uncertainty) == pytest.approx(
        (0.7, 0.15, 2, 2))
    assert uncertainty_path("out/m.nii.gz").name == "m_uncertainty.nii.gz"
    # The score is class-balanced: a small unsure class counts as much as a large sure one.
    assert scan_score(labels, uncertainty) == pytest.approx(np.mean([(0.1 + 0.8) / 2, 0.2]))
    assert scan_score(np.zeros(5, int), uncertainty) == pytest.approx(uncertainty.mean())


def test_cli_writes_both_maps_and_prints_the_ratio(tmp_path):
    scan, ref = write_scan(tmp_path)
    cfg = config(model={"dropout": 0.3})
    model = SegmentationTask(cfg).build_model()
    path = save_model(tmp_path / "m.pt", config=cfg, state_dict=model.state_dict())
    out = tmp_path / "pred.nii.gz"
    proc = subprocess.run([sys.executable, "-m", "fedscan", "predict", "--model", str(path),
                           "--image", scan, "--out", str(out), "--uncertainty", "3",
                           "--label", ref, "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert "uncertainty score" in lines[2] and "3 mc-dropout passes" in lines[2]
    assert "ratio" in lines[3] and lines[4] == f"scored against {ref}:"
    source = nib.load(scan)
    for written in (out, tmp_path / "pred_uncertainty.nii.gz"):
        img = nib.load(written)
        assert img.shape == source.shape
        np.testing.assert_allclose(img.affine, source.affine, atol=1e-6)
    bad = subprocess.run([sys.executable, "-m", "fedscan", "predict", "--model", str(path),
                          "--image", scan, "--out", str(out), "--uncertainty", "1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "at least 2 passes" in bad.stderr


def test_study_prints_ratio_and_rank_correlation(tmp_path):
    import json

    from fedscan.simulations.uncertainty import study, summarise

    folder = tmp_path / "heldout"
    entries = []
    folder.mkdir()
    for i in range(3):
        scan, ref = write_scan(folder, f"case{i}")
        entries.append({"image": scan, "label": ref})
    (folder / "dataset.json").write_text(json.dumps({"training": [
        {k: v.replace(str(folder), ".") for k, v in e.items()} for e in entries]}))
    cfg = config(data={"mirror_pairs": [[1, 2]]})
    path = save_model(tmp_path / "m.pt", config=cfg,
                      state_dict=SegmentationTask(cfg).build_model().state_dict())
    rows = study(path, [folder], passes=2, device="cpu")
    assert len(rows) == 3 and all(0 <= r["dice"] <= 1 for r in rows)
    text = summarise([{**r, "dice": d, "score": s} for r, d, s in
                      zip(rows, (0.9, 0.8, 0.7), (0.1, 0.2, 0.3), strict=True)])
    assert "error/correct ratio" in text
    assert "Spearman rank correlation of Dice and uncertainty score: -1.000" in text
