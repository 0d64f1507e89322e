"""Bad input at the command line: non-zero exit, one line naming the file or key, no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def write_site(root: Path, n: int = 3, label_shape=(16, 16, 16)) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    entries = []
    for i in range(n):
        img = np.random.default_rng(i).random((16, 16, 16)).astype(np.float32)
        lab = np.zeros(label_shape, np.uint8)
        lab[4:10, 4:10, 4:10] = 1
        nib.save(nib.Nifti1Image(img, np.eye(4)), root / "imagesTr" / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), root / "labelsTr" / f"c{i}.nii.gz")
        entries.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"training": entries}))
    return root


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedscan", *args], capture_output=True,
                          text=True, timeout=300)


def write_config(tmp_path: Path, site: Path, extra: str = "") -> Path:
    cfg = tmp_path / "fed.yaml"
    cfg.write_text(f"sites:\n  - {{name: a, data: {site}}}\nrounds: 1\n{extra}")
    return cfg


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fedscan: error:")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_dataset_json(tmp_path: Path):
    site = write_site(tmp_path / "site")
    (site / "dataset.json").unlink()
    proc = run_cli("simulate", "--config", str(write_config(tmp_path, site)),
                   "--out", str(tmp_path / "run"))
    assert_one_line_error(proc, "dataset.json")


def test_image_label_shape_mismatch(tmp_path: Path):
    site = write_site(tmp_path / "site", label_shape=(16, 16, 12))
    proc = run_cli("simulate", "--config", str(write_config(tmp_path, site)),
                   "--out", str(tmp_path / "run"))
    assert_one_line_error(proc, "c0.nii.gz", "mismatch")


@pytest.mark.parametrize("corruption", ["garbage", "truncated"])
def test_unreadable_nifti(tmp_path: Path, corruption: str):
    site = write_site(tmp_path / "site")
    target = site / "imagesTr" / "c1.nii.gz"
    raw = target.read_bytes()
    target.write_bytes(b"not a nifti at all" if corruption == "garbage" else raw[: len(raw) // 2])
    proc = run_cli("simulate", "--config", str(write_config(tmp_path, site)),
                   "--out", str(tmp_path / "run"))
    assert_one_line_error(proc, "c1.nii.gz")


def test_unknown_config_key(tmp_path: Path):
    site = write_site(tmp_path / "site")
    cfg = write_config(tmp_path, site, extra="train:\n  learning_rate: 0.1\n")
    proc = run_cli("simulate", "--config", str(cfg), "--out", str(tmp_path / "run"))
    assert_one_line_error(proc, "train.learning_rate")


def test_predict_missing_model_and_image(tmp_path: Path):
    proc = run_cli("predict", "--model", str(tmp_path / "none.pt"), "--image",
                   str(tmp_path / "x.nii.gz"), "--out", str(tmp_path / "o.nii.gz"))
    assert_one_line_error(proc, "none.pt")
