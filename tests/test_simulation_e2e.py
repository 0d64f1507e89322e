"""End to end: a real Flower simulation (Ray) with 2 tiny phantom sites and 2 rounds, then
predict on a held-out case, checked against the Dice the run reported for that case.

The sites are clinical-shaped: 2-channel 4D images and 4 classes, two of them the left and
the right of one structure (declared ``mirror_pairs`` in dataset.json), so per-class results
are checked end to end (site replies, summary.json, report, test set, ``predict --label``).
"""

import importlib.util
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import binary_erosion

from fedscan.simulations.phantoms import ScannerProfile, render, sample_anatomy

#: Background, the brain's outer shell split at the world midline (x = 0), the brain's core.
CLASSES = ["background", "left_shell", "right_shell", "core"]

# Coarse 8 mm grids keep volumes ~24^3 so the whole run takes well under a minute of compute.
PROFILES = {
    "site-a": ScannerProfile("site-a", "RAS", (8.0, 8.0, 8.0), noise_std=0.02),
    "site-b": ScannerProfile("site-b", "LPS", (7.0, 8.0, 9.0), gamma=0.7, bias_strength=0.2,
                             noise_std=0.03, scale=1000.0, dtype="int16"),
    "heldout": ScannerProfile("heldout", "PIL", (9.0, 7.0, 8.0), gamma=1.2, noise_std=0.02),
}


def clinical_case(image: np.ndarray, brain: np.ndarray, affine: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A 2-channel image (channels last) and 4-class label from a phantom's image and mask."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in brain.shape], indexing="ij"), -1)
    x = ijk @ affine[0, :3] + affine[0, 3]
    core = binary_erosion(brain > 0, iterations=1)
    label = np.where(core, 3, np.where(brain > 0, np.where(x < 0, 1, 2), 0)).astype(np.uint8)
    image = image.astype(np.float32)
    second = (image.max() - image) * (image > np.percentile(image, 30))  # a T2-like contrast
    return np.stack([image, second.astype(np.float32)], -1), label


def make_site(root: Path, profile: ScannerProfile, n: int, n_val: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    folder = root / profile.name
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir(parents=True)
    entries = []
    for i in range(n):
        image, brain, affine = render(sample_anatomy(rng), profile, rng)
        image, label = clinical_case(image, brain, affine)
        cid = f"{profile.name}_{i:03d}"
        entries.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
        nib.save(nib.Nifti1Image(image, affine), folder / entries[-1]["image"])
        nib.save(nib.Nifti1Image(label, affine), folder / entries[-1]["label"])
    spec = {"labels": dict(enumerate(CLASSES)), "channel_names": {"0": "T1", "1": "T2"},
            "mirror_pairs": [[1, 2]], "training": entries[:n - n_val]}
    if n_val:
        spec["validation"] = entries[n - n_val:]
    (folder / "dataset.json").write_text(json.dumps(spec))
    return folder


HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
#: The run's tracking block: a local SQLite store (relative to the config file).
MLFLOW = "tracking: {mlflow: 'sqlite:///mlflow.db', experiment: e2e}\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("e2e")
    for seed, (name, n, n_val) in enumerate([("site-a", 5, 2), ("site-b", 4, 1),
                                             ("heldout", 2, 0)]):
        make_site(root / "data", PROFILES[name], n, n_val, seed)
    cfg = root / "tiny.yaml"
    cfg.write_text(
        "sites:\n  - {name: site-a, data: data/site-a}\n"
        # site-b's 4 cases are below the default smallest group of 5: its policy lowers it.
        "  - {name: site-b, data: data/site-b, policy: {data_stats_min_cases: 3, "
        "share_local_model: false}}\n"
        "test_sets:\n  - {name: heldout, data: data/heldout}\n"
        "rounds: 2\n"
        "data: {spacing: [8, 8, 8], in_channels: 2, num_classes: 4}\n"
        "model: {channels: [4, 8, 16], strides: [2, 2], num_res_units: 0}\n"
        "train: {patch_size: [16, 16, 16], batch_size: 2, local_steps: 4}\n"
        "cross_site: {enabled: true, fine_tune_steps: 2}\n"
        + (MLFLOW if HAS_MLFLOW else "")
    )
    out = root / "run"
    proc = subprocess.run([sys.executable, "-m", "fedscan", "simulate", "--config", str(cfg),
                           "--out", str(out)], capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (root / "console.txt").write_text(proc.stdout + proc.stderr)
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
        # Per-class Dice and HD95 named from dataset.json, aggregated like the headline; the
        # headline is their mean over foreground classes at every site.
        for site in ("site-a", "site-b"):
            ev = entry["evaluate"][site]
            assert {f"{m}/{c}" for m in ("dice", "hd95") for c in CLASSES[1:]} <= set(ev)
            assert ev["dice"] == pytest.approx(np.mean([ev[f"dice/{c}"] for c in CLASSES[1:]]))
            assert not any("case" in k or k.startswith("site") for k in ev)  # nothing per case
        for c in CLASSES[1:]:
            assert 0.0 <= entry["aggregate"][f"dice/{c}"] <= 1.0
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
    for c in CLASSES[1:]:
        assert 0.0 <= final[f"dice/{c}"] <= 1.0
        assert 0.0 <= final["test_sets"]["heldout"][f"dice/{c}"] <= 1.0
        assert f"dice/{c}" in final["test_sets"]["heldout"]["cases"]["heldout_000"]
    assert summary["config"]["data"]["labels"] == CLASSES
    assert summary["config"]["data"]["mirror_pairs"] == [[1, 2]]
    report = (out / "report.md").read_text()
    for c in CLASSES[1:]:
        assert f"dice/{c}" in report and f"hd95/{c} (mm)" in report
    assert (out / summary["model"]).is_file()
    # The data check before round 1: both sites compared, 2 channels, 4 classes; none flagged.
    check = summary["data_check"]
    assert check["compared"] == ["site-a", "site-b"] and check["flags"] == []
    assert check["sites"]["site-b"]["min_cases"] == 3
    assert len(check["sites"]["site-a"]["histograms"]) == 2
    assert check["sites"]["site-a"]["class_cases"] == [5, 5, 5, 5]
    assert "## Data check before round 1" in report and "No site was flagged." in report
    for name in ("report.md", "dice.png", "loss.png", "config.yaml",
                 "checkpoints/round_001.pt", "checkpoints/round_002.pt"):
        assert (out / name).is_file(), name
    # Round checkpoints differ: training changed the global model between rounds.
    import torch
    r1 = torch.load(out / "checkpoints/round_001.pt", weights_only=True)["state_dict"]
    r2 = torch.load(out / "checkpoints/round_002.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(r1[k], r2[k]) for k in r1)


@pytest.mark.slow
def test_cross_site_matrix_in_summary_report_and_heatmap(tiny_run):
    """site-a shares its fine-tuned model; site-b's policy keeps its own, so no weights of
    it leave the site (its sent.log), yet it evaluates the global and site-a's models."""
    root, out = tiny_run
    cs = json.loads((out / "summary.json").read_text())["cross_site"]
    assert cs["models"] == ["global", "site-a"] and cs["sites"] == ["site-a", "site-b"]
    assert cs["fine_tune_steps"] == 2 and cs["dropped"] == []
    assert "refused" in cs["not_shared"]["site-b"]
    for model in cs["models"]:
        for site in cs["sites"]:
            cell = cs["matrix"][model][site]
            assert cell["num_examples"] == {"site-a": 2, "site-b": 1}[site]
            for key in ["dice", *(f"dice/{c}" for c in CLASSES[1:])]:
                assert 0.0 <= cell[key] <= 1.0
    assert set(cs["comparison"]) == {"site-a"}
    assert cs["comparison"]["site-a"]["sites"] == ["site-b"]
    assert (out / "cross_site_dice.png").is_file() and (out / "cross_site_hd95.png").is_file()
    report = (out / "report.md").read_text()
    section = report[report.index("## Cross-site evaluation"):]
    assert "| global |" in section and "| site-a (local) |" in section
    dice = cs["matrix"]["global"]["site-b"]["dice"]
    assert f"{dice:.4f}" in section and "cross_site_dice.png" in section
    sent = [json.loads(line) for line in
            (out / "site-state" / "site-b" / "sent.log").read_text().splitlines()]
    fine_tune = [e for e in sent if e["phase"] == "train.cross_site"]
    assert fine_tune == [{**fine_tune[0], "error": "policy-refused"}]
    assert "arrays" not in fine_tune[0]
    evaluated = [e for e in sent if e["phase"] == "evaluate.cross_site"]
    assert len(evaluated) == 1 and evaluated[0]["arrays"] == {}
    assert set(evaluated[0]["records"]) == {"model:global", "model:site-a", "site"}
    console = (root / "console.txt").read_text()
    assert "cross-site dice" in console and "site-a (local)" in console
    log = (out / "site-state" / "site-a" / "site.log").read_text()
    assert "[site-a] cross-site fine-tuning step 2/2 loss" in log


@pytest.mark.slow
def test_cross_site_on_demand_for_a_finished_run(tiny_run, tmp_path):
    """``fedscan cross-site --run DIR`` computes the matrix again from the run's final model
    (a copy of the run, so the other tests read the original)."""
    import shutil

    _, out = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    before = json.loads((run / "summary.json").read_text())
    (run / "cross_site_dice.png").unlink()
    proc = subprocess.run([sys.executable, "-m", "fedscan", "cross-site", "--run", str(run),
                           "--fine-tune-steps", "1"], capture_output=True, text=True,
                          timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = json.loads((run / "summary.json").read_text())
    cs = after["cross_site"]
    assert cs["fine_tune_steps"] == 1 and cs["models"] == ["global", "site-a"]
    assert after["rounds"] == before["rounds"] and after["final"] == before["final"]
    # The global model is the same final model: its cells are the run's own values.
    for site in ("site-a", "site-b"):
        assert cs["matrix"]["global"][site] == before["cross_site"]["matrix"]["global"][site]
    assert (run / "cross_site_dice.png").is_file()
    assert "local models fine-tuned 1 steps" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "fedscan", "cross-site", "--run",
                          str(tmp_path / "nothing")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no config.yaml and final_model.pt" in bad.stderr


@pytest.mark.slow
def test_predict_matches_reported_case_dice(tiny_run):
    """predict --label prints the per-class Dice the run reported for that held-out case."""
    root, out = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    image = root / "data/heldout/imagesTr/heldout_000.nii.gz"
    label = root / "data/heldout/labelsTr/heldout_000.nii.gz"
    pred_path = out / "pred.nii.gz"
    proc = subprocess.run([sys.executable, "-m", "fedscan", "predict", "--model",
                           str(out / summary["model"]), "--image", str(image), "--out",
                           str(pred_path), "--label", str(label)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pred, ref, src = nib.load(pred_path), nib.load(label), nib.load(image)
    assert pred.shape == src.shape[:3]
    assert np.allclose(pred.affine, src.affine, atol=1e-5)
    reported = summary["final"]["test_sets"]["heldout"]["cases"]["heldout_000"]
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[3:]}
    for k, c in enumerate(CLASSES[1:], start=1):
        p = np.asarray(pred.dataobj) == k
        t = np.asarray(ref.dataobj) == k
        dice = 2 * (p & t).sum() / max(p.sum() + t.sum(), 1) if p.any() or t.any() else 1.0
        assert dice == pytest.approx(reported[f"dice/{c}"], abs=0.01)
        assert float(rows[c][0]) == pytest.approx(reported[f"dice/{c}"], abs=1e-4)
    assert proc.stdout.splitlines()[2].split() == ["class", "dice", "hd95", "(mm)"]


def visible_lines(text: str) -> list[str]:
    """What a terminal finally shows of each console line (a progress bar redraws its line
    with carriage returns)."""
    lines = (line.split("\r")[-1].strip() for line in text.split("\n"))
    return [line for line in lines if line]


@pytest.mark.slow
def test_console_prints_each_line_once_without_debug(tiny_run):
    root, out = tiny_run
    # Captured in text mode, the bar's carriage returns became newlines: each of its states
    # counts as a line here, so even those must all differ (stricter than a terminal).
    text = (root / "console.txt").read_text()
    lines = visible_lines(text)
    repeated = {line: n for line, n in Counter(lines).items() if n > 1}
    assert not repeated, text[-4000:]
    noise = [line for line in lines
             if re.search(r"DEBUG|DEPRECATED|Deprecat|FutureWarning|UserWarning", line)]
    assert not noise, noise
    # One progress display: the rounds bar, with each site's state inside it.
    assert "federated rounds" in text and re.search(r"round 2: (site-[ab] (done|training)"
                                                    r"(, )?)+", text), text[-3000:]
    assert "[site-a] round" not in text  # the sites' step lines are in their own logs
    assert text.index("data check: 2 site(s) compared, 0 flag(s)") < text.index("round 1")
    log = (out / "site-state" / "site-a" / "site.log").read_text()
    assert "[site-a] round 2 step 4/4 loss" in log
    # The closing block names every output and how to open it.
    block = text[text.index(f"== outputs in {out}"):]
    for path in (out / "report.html", out / "summary.json", out / "final_model.pt"):
        assert str(path) in block, block
    assert f"fedscan dashboard {out}" in block


@pytest.mark.slow
def test_tensorboard_holds_every_rounds_metrics_per_site(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0,
                                                                       "images": 0})
    events.Reload()

    def series(tag: str) -> dict[int, float]:
        return {e.step: e.value for e in events.Scalars(tag)}

    for site in ("site-a", "site-b"):
        keys = [k for k in summary["rounds"][0]["evaluate"][site] if k != "num_examples"]
        assert "dice" in keys
        for key in keys:  # every metric the task declares, per-class keys included
            assert series(f"{key}/{site}") == pytest.approx(
                {r["round"]: r["evaluate"][site][key] for r in summary["rounds"]}, rel=1e-6)
        assert series(f"train_loss/{site}") == pytest.approx(
            {r["round"]: r["train"][site]["loss"] for r in summary["rounds"]}, rel=1e-6)
    assert series("dice/aggregate") == pytest.approx(
        {r["round"]: r["aggregate"]["dice"] for r in summary["rounds"]}, rel=1e-6)
    previews = [t for t in events.Tags()["images"] if t.startswith("preview/heldout/")]
    assert sorted(previews) == ["preview/heldout/heldout_000", "preview/heldout/heldout_001"]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MLFLOW, reason="MLflow is the optional [tracking] extra")
def test_mlflow_run_and_model_version_name_config_and_data(tiny_run):
    from mlflow.tracking import MlflowClient

    from fedscan.shared.config import load_config
    from fedscan.shared.data import data_fingerprint, read_site

    root, out = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
                          registry_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["rounds"] == "2" and run.data.params["sites"] == "site-a,site-b"
    assert not any(str(root / "data") in v for v in run.data.params.values())
    for site in ("site-a", "site-b"):
        history = client.get_metric_history(run.info.run_id, f"dice/{site}")
        assert {m.step: m.value for m in history} == pytest.approx(
            {r["round"]: r["evaluate"][site]["dice"] for r in summary["rounds"]})
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "report.html", "dice.png", "summary.json", "model"} <= artifacts
    (version,) = client.search_model_versions("name='fedscan-segmentation'")
    assert version.run_id == run.info.run_id
    # The config hash is the one every site recorded in its audit log for this run.
    audit = [json.loads(line) for line in
             (out / "site-state" / "site-a" / "audit.log").read_text().splitlines()]
    rounds = [a for a in audit if not a["phase"].endswith(".cross_site")]
    assert {a["sha256"] for a in rounds} == {version.tags["config_sha256"]}
    # Cross-site fine-tuning ran another config (local_steps = fine_tune_steps): its own hash.
    (tuned,) = [a for a in audit if a["phase"] == "train.cross_site"]
    assert tuned["sha256"] != version.tags["config_sha256"]
    cfg = load_config(root / "tiny.yaml")
    for site in cfg.sites:
        expected = data_fingerprint(read_site(site, cfg.data, check=False))
        assert version.tags[f"data_fingerprint.{site.name}"] == expected
    assert version.tags["sites"] == "site-a,site-b"
    assert version.tags["code_version"].startswith("0.1.0")
