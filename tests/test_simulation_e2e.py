"""End to end: a real Flower simulation (Ray) with 2 tiny phantom sites and 2 rounds, then
predict on a held-out case, checked against the Dice the run reported for that case."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedscan.simulations.phantoms import ScannerProfile, render, sample_anatomy, write_dataset

# Coarse 8 mm grids keep volumes ~24^3 so the whole run takes well under a minute of compute.
PROFILES = {
    "site-a": ScannerProfile("site-a", "RAS", (8.0, 8.0, 8.0), noise_std=0.02),
    "site-b": ScannerProfile("site-b", "LPS", (7.0, 8.0, 9.0), gamma=0.7, bias_strength=0.2,
                             noise_std=0.03, scale=1000.0, dtype="int16"),
    "heldout": ScannerProfile("heldout", "PIL", (9.0, 7.0, 8.0), gamma=1.2, noise_std=0.02),
}


def make_site(root: Path, profile: ScannerProfile, n: int, n_val: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        image, label, affine = render(sample_anatomy(rng), profile, rng)
        cases.append((f"{profile.name}_{i:03d}", image, label, affine))
    val = [c[0] for c in cases[n - n_val:]] if n_val else None
    write_dataset(root / profile.name, cases, val, description="tiny e2e phantom site")
    return root / profile.name


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("e2e")
    for seed, (name, n, n_val) in enumerate([("site-a", 5, 2), ("site-b", 4, 1),
                                             ("heldout", 2, 0)]):
        make_site(root / "data", PROFILES[name], n, n_val, seed)
    cfg = root / "tiny.yaml"
    cfg.write_text(
        "sites:\n  - {name: site-a, data: data/site-a}\n  - {name: site-b, data: data/site-b}\n"
        "test_sets:\n  - {name: heldout, data: data/heldout}\n"
        "rounds: 2\n"
        "data: {spacing: [8, 8, 8]}\n"
        "model: {channels: [4, 8, 16], strides: [2, 2], num_res_units: 0}\n"
        "train: {patch_size: [16, 16, 16], batch_size: 2, local_steps: 4}\n"
    )
    out = root / "run"
    proc = subprocess.run([sys.executable, "-m", "fedscan", "simulate", "--config", str(cfg),
                           "--out", str(out)], capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, out


@pytest.mark.slow
def test_federated_run_writes_complete_outputs(tiny_run):
    _, out = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "federated"
    assert summary["sites"] == ["site-a", "site-b"]
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for entry in summary["rounds"]:
        assert set(entry["train"]) == {"site-a", "site-b"}
        assert set(entry["evaluate"]) == {"site-a", "site-b"}
        assert entry["train"]["site-a"]["num_examples"] == 3
        assert entry["train"]["site-b"]["num_examples"] == 3
        assert entry["train"]["site-a"]["steps"] == 4
        assert np.isfinite(entry["train"]["site-a"]["loss"])
        assert 0.0 <= entry["aggregate"]["dice"] <= 1.0
        assert entry["seconds"] > 0
        # The aggregate is the case-weighted mean of the sites' values.
        ev = entry["evaluate"]
        weighted = (ev["site-a"]["dice"] * ev["site-a"]["num_examples"]
                    + ev["site-b"]["dice"] * ev["site-b"]["num_examples"]) / (
                    ev["site-a"]["num_examples"] + ev["site-b"]["num_examples"])
        assert entry["aggregate"]["dice"] == pytest.approx(weighted)
    final = summary["final"]
    assert set(final["per_site"]) == {"site-a", "site-b"}
    last = summary["rounds"][-1]["evaluate"]
    assert final["per_site"]["site-a"]["dice"] == last["site-a"]["dice"]
    assert set(final["test_sets"]["heldout"]["cases"]) == {"heldout_000", "heldout_001"}
    assert (out / summary["model"]).is_file()
    for name in ("report.md", "dice.png", "loss.png", "config.yaml",
                 "checkpoints/round_001.pt", "checkpoints/round_002.pt"):
        assert (out / name).is_file(), name
    # Round checkpoints differ: training changed the global model between rounds.
    import torch
    r1 = torch.load(out / "checkpoints/round_001.pt", weights_only=True)["state_dict"]
    r2 = torch.load(out / "checkpoints/round_002.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(r1[k], r2[k]) for k in r1)


@pytest.mark.slow
def test_predict_matches_reported_case_dice(tiny_run):
    root, out = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    image = root / "data/heldout/imagesTr/heldout_000.nii.gz"
    label = root / "data/heldout/labelsTr/heldout_000.nii.gz"
    pred_path = out / "pred.nii.gz"
    proc = subprocess.run([sys.executable, "-m", "fedscan", "predict", "--model",
                           str(out / summary["model"]), "--image", str(image), "--out",
                           str(pred_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pred, ref, src = nib.load(pred_path), nib.load(label), nib.load(image)
    assert pred.shape == src.shape
    assert np.allclose(pred.affine, src.affine, atol=1e-5)
    p = np.asarray(pred.dataobj) == 1
    t = np.asarray(ref.dataobj) == 1
    dice = 2 * (p & t).sum() / max(p.sum() + t.sum(), 1)
    reported = summary["final"]["test_sets"]["heldout"]["cases"]["heldout_000"]["dice"]
    assert dice == pytest.approx(reported, abs=0.01)
