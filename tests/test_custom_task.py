"""A task defined in one file outside fedscan (tests/regression_task.py) runs a real 2-site,
2-round Flower simulation and shows up, with its own metric only, in summary.json, the plots
and report.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tinysites import make_sites

TESTS = Path(__file__).resolve().parent


@pytest.mark.slow
def test_a_task_from_its_own_file_runs_a_federation(tmp_path):
    make_sites(tmp_path / "data", n_cases=3)
    cfg = tmp_path / "regression.yaml"
    cfg.write_text(
        'task: "regression_task:RegressionTask"\n'
        "sites:\n  - {name: site-a, data: data/site-a}\n  - {name: site-b, data: data/site-b}\n"
        "rounds: 2\n"
        "data: {spacing: [8, 8, 8]}\n"
        "train: {patch_size: [16, 16, 16], batch_size: 2, local_steps: 3, lr: 0.05}\n")
    out = tmp_path / "run"
    # The researcher's module is importable by the driver and, through the environment Ray
    # starts its workers with, by every virtual hospital.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, "-m", "fedscan", "simulate", "--config", str(cfg),
                           "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "regression_task:RegressionTask"
    assert [m["name"] for m in summary["metrics"]] == ["mae"]
    assert summary["metrics"][0]["higher_is_better"] is False
    for entry in summary["rounds"]:
        assert set(entry["train"]) == {"site-a", "site-b"}
        ev = entry["evaluate"]
        assert all(set(m) == {"mae", "num_examples"} and m["mae"] >= 0 for m in ev.values())
        weighted = sum(m["mae"] * m["num_examples"] for m in ev.values()) / sum(
            m["num_examples"] for m in ev.values())
        assert entry["aggregate"] == {"mae": pytest.approx(weighted)}
    final = summary["final"]
    assert final["headline"] == "mae" and final["mae"] == pytest.approx(
        summary["rounds"][-1]["aggregate"]["mae"])
    assert set(final["per_site"]) == {"site-a", "site-b"}
    # Its own metric only: nothing of segmentation's in the results.
    assert "dice" not in json.dumps([summary["rounds"], final])
    assert f"mae {final['mae']:.4f} (sites weighted by validation cases)" in proc.stdout

    assert (out / "mae.png").is_file() and (out / "loss.png").is_file()
    assert not (out / "dice.png").exists()
    report = (out / "report.md").read_text()
    assert "Task: **regression_task:RegressionTask**" in report
    assert "| Site | mae | Validation cases |" in report
    assert f"| `site-a` | {final['per_site']['site-a']['mae']:.4f} |" in report
    assert "](mae.png)" in report and "mean absolute difference" in report
    assert "Dice" not in report and "dice" not in report
