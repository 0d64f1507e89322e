"""End to end: a federated CycleGAN on Flower's simulation runtime (Ray) over two small phantom
hospitals with the real scanner profiles, the phantom study after it (truth metrics,
downstream Dice, FedBN row, panels), and ``fedscan harmonize`` on an anisotropic scan."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from fedscan.shared.checkpoint import SITE_MODEL, load_model
from fedscan.simulations.phantoms import (
    SITE_PROFILES,
    generate_reference_set,
    reference_truth,
    write_phantom_site,
)

SITES = ("site-a", "site-c")


@pytest.fixture(scope="module")
def harmonised_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("harmonise")
    for name in SITES:  # exactly as `fedscan phantoms` renders them, fewer cases
        write_phantom_site(root / "data" / name, name, SITE_PROFILES[name], 3, 1, seed=0)
    generate_reference_set(root / "data" / "reference", seed=0, n_cases=3)
    # site-c brings its paired truth as a folder (what a real-anatomy federation writes); the
    # study must read it rather than re-render the phantom's.
    truth = root / "truth" / "site-c"
    (truth / "imagesTr").mkdir(parents=True)
    for i in range(3):
        image, affine = reference_truth(0, "site-c", i, SITE_PROFILES["site-c"])
        nib.save(nib.Nifti1Image(image, affine), truth / "imagesTr" / f"site-c_{i:03d}.nii.gz")
    (truth / "dataset.json").write_text(json.dumps({"training": [
        {"image": f"./imagesTr/site-c_{i:03d}.nii.gz"} for i in range(3)]}))
    cfg = root / "harmonize.yaml"
    cfg.write_text(
        "task: harmonisation\n"
        "sites:\n  - {name: site-a, data: data/site-a}\n"
        "  - {name: site-c, data: data/site-c, truth: truth/site-c}\n"
        "rounds: 2\n"
        "model: {channels: [4, 8, 16], strides: [2, 2], num_res_units: 0}\n"
        "train: {patch_size: [16, 16, 16], batch_size: 2, local_steps: 2}\n"
        "evaluate: {hd95: false}\n"
        "harmonisation: {reference: data/reference, channels: [4, 8], strides: [2],\n"
        "                disc_channels: 4, disc_layers: 1}\n"
    )
    out = root / "run"
    proc = subprocess.run([sys.executable, "-m", "fedscan", "simulate", "--config", str(cfg),
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, out, proc.stdout


@pytest.mark.slow
def test_federated_cyclegan_shares_only_generators(harmonised_run):
    _, out, _ = harmonised_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "harmonisation"
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for entry in summary["rounds"]:
        assert set(entry["train"]) == set(SITES) and set(entry["evaluate"]) == set(SITES)
        assert all(m["samples"] == 2 * 2 for m in entry["train"].values())  # steps x batch
        for metrics in entry["evaluate"].values():  # metrics of the received generators
            assert all(np.isfinite(v) for v in metrics.values())
    _, state, _ = load_model(out / "final_model.pt")
    assert state and all(k.startswith(("g_site2ref.", "g_ref2site.")) for k in state)
    assert any(k.startswith("g_site2ref.") for k in state)
    assert all(k.split(".")[1] == "body" for k in state)  # curves and heads stay at the site
    assert summary["model_fp32_bytes"] == sum(v.numel() * 4 for v in state.values())
    # Each site keeps its own model: the final global UNet bodies plus its curves, heads and
    # critics.
    curves = {}
    for name in SITES:
        _, own, meta = load_model(out / "site-state" / name / SITE_MODEL)
        assert meta["site"] == name and meta["round"] == 2
        assert all(torch.equal(own[k], state[k]) for k in state)
        assert any(k.startswith("d_ref.") for k in own)
        # The generator's moving average took every update of both rounds: it persisted in
        # the site's context state between them.
        assert int(own["g_site2ref_avg.n_averaged"]) == 2 * 2
        curves[name] = own["g_site2ref.curve.slopes"]
    assert not torch.equal(curves["site-a"], curves["site-c"])  # trained apart


@pytest.mark.slow
def test_study_scores_every_site_and_the_downstream_segmentation(harmonised_run):
    _, out, stdout = harmonised_run
    study = json.loads((out / "study" / "study.json").read_text())
    assert set(study["sites"]) == set(SITES)
    for site in study["sites"].values():
        assert site["cases"] == 3
        for grid in ("grid", "native", "head"):
            for key in ("psnr_raw", "psnr_harmonised", "ssim_raw", "ssim_harmonised"):
                assert np.isfinite(site[f"{grid}_{key}"]), key
        for grid in ("native", "head"):  # the round-trip ceiling beside them
            assert 0 < site[f"{grid}_ssim_ceiling"] <= 1 and site[f"{grid}_psnr_ceiling"] > 10
        assert site["model"].endswith(SITE_MODEL)  # harmonised with the site's own curves
    assert study["sites"]["site-a"]["truth"] == "phantom seed 0"
    assert study["sites"]["site-c"]["truth"].endswith("truth/site-c")
    down = study["downstream"]
    assert set(down["sites"]) == set(SITES)
    for name, row in down["sites"].items():
        assert row["cases"] == study["sites"][name]["cases"]
        for key in ("reference_raw", "reference_harmonised", "augmented_raw",
                    "augmented_harmonised", "fedbn_validation"):
            assert 0.0 <= row[key] <= 1.0, key
    # Most shifted: where the reference-scanner model does worst on raw scans.
    assert down["most_shifted"] == min(SITES, key=lambda s: down["sites"][s]["reference_raw"])
    assert (out / "study" / "panels.png").stat().st_size > 10_000
    text = (out / "study" / "study.md").read_text()
    assert "FedBN" in text and "FedBN" in stdout
    assert "native, inside the head" in text and "PSNR ceiling" in text
    assert f"`{down['most_shifted']}` (most shifted)" in text


@pytest.mark.slow
def test_harmonize_cli_keeps_the_input_grid(harmonised_run, tmp_path):
    root, out, _ = harmonised_run
    image = root / "data" / "site-c" / "imagesTr" / "site-c_000.nii.gz"  # PIL, 5 x 3.5 x 4 mm
    target = tmp_path / "h.nii.gz"
    proc = subprocess.run([sys.executable, "-m", "fedscan", "harmonize", "--model",
                           str(out / "final_model.pt"), "--image", str(image), "--out",
                           str(target)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = nib.load(image), nib.load(target)
    assert after.shape == before.shape
    assert np.allclose(after.affine, before.affine)
    assert torch.isfinite(torch.as_tensor(np.asarray(after.dataobj))).all()
    missing = subprocess.run([sys.executable, "-m", "fedscan", "harmonize", "--model",
                              str(out / "final_model.pt"), "--image", str(tmp_path / "no.nii.gz"),
                              "--out", str(tmp_path / "x.nii.gz")], capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "no.nii.gz" in missing.stderr


@pytest.mark.slow
def test_dp_utility_bench_scores_harmonisation_at_each_epsilon(harmonised_run):
    root, _, _ = harmonised_run
    out = root / "bench"
    proc = subprocess.run([sys.executable, "-m", "fedscan", "bench", "dp-utility", "--config",
                           str(root / "harmonize.yaml"), "--epsilons", "8,inf", "--rounds", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = yaml.safe_load((out / "utility.yaml").read_text())
    assert [r["epsilon"] for r in rows] == [8.0, float("inf")]
    private, plain = rows
    assert 0 < private["spent"] <= 8.0 and plain["spent"] is None
    for row in rows:  # each run has its own study: truth scores and downstream Dice
        assert set(row["study"]["sites"]) == set(SITES)
        assert set(row["study"]["downstream"]["sites"]) == set(SITES)
    # The segmentation runs do not depend on ε: trained once, reused by the second study.
    assert proc.stdout.count("training the reference-domain segmentation model") == 2
    assert proc.stdout.count("training FedBN") == 1 and "reusing" in proc.stdout
    for name in SITES:
        first, second = (r["study"]["downstream"]["sites"][name] for r in rows)
        assert first["reference_raw"] == second["reference_raw"]
        assert first["fedbn_validation"] == second["fedbn_validation"]
    # DP noise changes the generator, so the harmonised images differ.
    assert (private["study"]["sites"]["site-c"]["native_psnr_harmonised"]
            != plain["study"]["sites"]["site-c"]["native_psnr_harmonised"])
    table = proc.stdout[proc.stdout.index("ε budget"):]
    assert table.count("site-a") == 2 and table.count("site-c") == 2
    assert f"{private['spent']:.3f}" in table
    bad = subprocess.run([sys.executable, "-m", "fedscan", "bench", "dp-utility", "--config",
                          str(root / "harmonize.yaml"), "--epsilons", "8,x"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--epsilons" in bad.stderr
