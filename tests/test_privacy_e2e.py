"""End to end: a real Flower simulation (Ray) with one DP site and one without, then the same
run again into the same folder: the DP site's ε continues from its ledger and never resets."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import create_accountant

from fedscan.simulations.phantoms import ScannerProfile, render, sample_anatomy, write_dataset

PROFILES = {
    "site-a": ScannerProfile("site-a", "RAS", (8.0, 8.0, 8.0), noise_std=0.02),
    "site-b": ScannerProfile("site-b", "LPS", (7.0, 8.0, 9.0), gamma=0.7, noise_std=0.03,
                             scale=1000.0, dtype="int16"),
}
FIELDS = ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "accountant")


def _simulate(cfg: Path, out: Path, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "fedscan", "simulate", "--config", str(cfg),
                           "--out", str(out), *extra], capture_output=True, text=True,
                          timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def _replay(entry: dict) -> float:
    accountant = create_accountant(mechanism=entry["accountant"])
    accountant.history = [(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])]
    return accountant.get_epsilon(delta=entry["delta"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict, dict]:
    root = tmp_path_factory.mktemp("dp-e2e")
    for seed, (name, n, n_val) in enumerate([("site-a", 5, 2), ("site-b", 4, 1)]):
        rng = np.random.default_rng(seed)
        cases = []
        for i in range(n):
            image, label, affine = render(sample_anatomy(rng), PROFILES[name], rng)
            cases.append((f"{name}_{i:03d}", image, label, affine))
        write_dataset(root / "data" / name, cases, [c[0] for c in cases[n - n_val:]],
                      description="tiny DP e2e site")
    cfg = root / "dp.yaml"
    cfg.write_text(
        "sites:\n  - {name: site-a, data: data/site-a}\n"
        "  - {name: site-b, data: data/site-b, privacy: {epsilon: .inf}}\n"
        "privacy: {epsilon: 3.0, delta: 1.0e-5, max_grad_norm: 1.0, accountant: prv}\n"
        "rounds: 2\n"
        "data: {spacing: [8, 8, 8]}\n"
        "model: {channels: [4, 8, 16], strides: [2, 2], num_res_units: 0}\n"
        "train: {patch_size: [16, 16, 16], batch_size: 2, local_steps: 4}\n"
    )
    out = root / "run"
    first = _simulate(cfg, out)
    # Run again into the same folder (a restart): the site's ledger is in out/site-state.
    second = _simulate(cfg, out, "--rounds", "1")
    return out, first, second


@pytest.mark.slow
def test_summary_carries_an_exact_privacy_ledger(runs):
    out, first, _ = runs
    epsilons = []
    for entry in first["rounds"]:
        a, b = entry["train"]["site-a"], entry["train"]["site-b"]
        for field in FIELDS:
            assert field in a, field
        assert a["accountant"] == "prv" and a["status"] == "trained"
        assert a["steps"] == 4 * entry["round"] and a["steps_this_round"] == 4
        assert a["epsilon"] == pytest.approx(_replay(a), rel=0.01)
        epsilons.append(a["epsilon"])
        assert b["status"] == "off" and "epsilon" not in b
    assert epsilons == sorted(epsilons) and epsilons[-1] <= 3.0
    assert epsilons[-1] > 2.9  # σ was calibrated to spend the budget over the planned run
    assert (out / "epsilon.png").is_file()
    report = (out / "report.md").read_text()
    assert "## Privacy" in report and "epsilon.png" in report


@pytest.mark.slow
def test_restart_continues_the_ledger_and_the_run_completes(runs):
    out, first, second = runs
    before = first["rounds"][-1]["train"]["site-a"]
    after = second["rounds"][0]["train"]["site-a"]
    # Budget spent in the first run: the site declines rather than start ε again from zero.
    assert after["status"] == "declined" and after["num_examples"] == 0
    assert after["steps"] == before["steps"] and after["epsilon"] == before["epsilon"]
    assert second["rounds"][0]["train"]["site-b"]["num_examples"] == 3
    assert second["final"]["dice"] is not None and (out / "final_model.pt").is_file()
