"""A real simulation (Ray) killed with SIGKILL after round 2 and continued with
``fedscan simulate --resume`` ends with the uninterrupted run's weights (1e-6) and every
site's ε: DP sites, 2 of 3 sites sampled per round (FedAdam, so its moments must be
restored too), FedBN (each site's own normalisation layers must be restored from its state
folder: with them reset, the shared weights of rounds 3-4 differ)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from consortium import ENV, kill9
from tinysites import make_sites

from fedscan.shared.checkpoint import load_model

CONFIG = """\
sites:
  - {name: site-a, data: data/site-a}
  - {name: site-b, data: data/site-b}
  - {name: site-c, data: data/site-c}
rounds: 4
data: {spacing: [8, 8, 8]}
model: {channels: [4, 8, 16], strides: [2, 2], num_res_units: 0, local_norm: true}
train: {patch_size: [16, 16, 16], batch_size: 2, local_steps: 2}
evaluate: {hd95: false}
strategy: {name: fedadam, fraction_train: 0.67, eta: 0.05}
privacy: {epsilon: 50.0, noise_multiplier: 0.8}
tracking: {tensorboard: false}
"""


def simulate(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedscan", "simulate", *args]


def epsilons(run: Path) -> dict[str, float]:
    """Each site's ε from its own ledger file (what the site enforces)."""
    return {p.parent.name: json.loads(p.read_text())["epsilon"]
            for p in sorted(run.glob("site-state/*/privacy_ledger.json"))}


def completed(run: Path) -> list[int]:
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return []
    return [r["round"] for r in summary["rounds"] if r["seconds"] is not None]


@pytest.mark.slow
def test_sigkilled_simulation_resumes_to_the_uninterrupted_result(tmp_path):
    make_sites(tmp_path / "data", n_cases=3)
    (tmp_path / "run.yaml").write_text(CONFIG)
    config = str(tmp_path / "run.yaml")

    full = tmp_path / "full"
    proc = subprocess.run(simulate("--config", config, "--out", str(full)), env=ENV,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    split = tmp_path / "split"
    with (tmp_path / "killed.log").open("w") as log:
        victim = subprocess.Popen(simulate("--config", config, "--out", str(split)), env=ENV,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 200
        while 2 not in completed(split) and time.monotonic() < deadline:
            assert victim.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
            time.sleep(0.02)
        kill9(victim.pid)  # the simulation and its Ray processes, as a power cut
        victim.wait(timeout=30)
    assert completed(split) == [1, 2]
    assert not (split / "final_model.pt").exists()
    # Round 3's sites were still evaluating round 2's model: no ledger counts round 3 yet.
    full_summary = json.loads((full / "summary.json").read_text())
    steps_by_2 = {s: m["steps"] for r in full_summary["rounds"] if r["round"] <= 2
                  for s, m in r["train"].items()}
    killed = {p.parent.name: json.loads(p.read_text())["steps"]
              for p in split.glob("site-state/*/privacy_ledger.json")}
    assert killed == steps_by_2, "the kill came after a site trained round 3; rerun"

    proc = subprocess.run(simulate("--resume", str(split)), env=ENV, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "resuming federated" in proc.stdout

    summary = json.loads((split / "summary.json").read_text())
    assert summary["resumed_after"] == [2]
    run_uid = summary["run_uid"]  # the same run id before and after the kill
    assert sorted(p.parent.parent.name for p in split.glob("site-state/*/local-weights/*.pt")
                  ) == ["site-a", "site-b", "site-c"]
    assert {p.stem for p in split.glob("site-state/*/local-weights/*.pt")} == {run_uid}
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3, 4]
    sampled = [r["sampled"] for r in summary["rounds"]]
    assert sampled == [r["sampled"] for r in full_summary["rounds"]]
    assert all(len(s) == 2 for s in sampled) and len({tuple(s) for s in sampled}) > 1

    a = load_model(full / "final_model.pt")[1]
    b = load_model(split / "final_model.pt")[1]
    assert set(a) == set(b)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    eps_full, eps_split = epsilons(full), epsilons(split)
    assert set(eps_full) == {"site-a", "site-b", "site-c"}
    assert eps_split == pytest.approx(eps_full, rel=1e-12)
    assert all(e > 0 for e in eps_full.values())
    # The summary's last ε per site (what the server was told) agrees with the ledgers.
    told = {s: m["epsilon"] for r in summary["rounds"] for s, m in r["train"].items()}
    assert told == pytest.approx(eps_split, rel=1e-12)


def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys):
    from fedscan.cli import main

    assert main(["simulate", "--resume", str(tmp_path)]) == 2
    assert "no config.yaml and summary.json" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("mode: pooled\nsites: []\n")
    (tmp_path / "summary.json").write_text("{}")
    assert main(["simulate", "--resume", str(tmp_path)]) == 2
    assert "only a federated run" in capsys.readouterr().err
    assert main(["simulate", "--resume", str(tmp_path), "--config", "x.yaml"]) == 2
    assert "neither --config nor --mode" in capsys.readouterr().err
