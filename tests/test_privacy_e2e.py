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


@pytest.mark.slow
def test_client_status_shows_what_ran_on_the_sites_data(runs, tmp_path):
    """``fedscan client status`` on site-a's state folder after the two runs (and one run
    it refused): ε equals Opacus' accountant over the ledger, the hashes equal audit.log,
    what was sent equals what the server counted."""
    import shutil
    import urllib.request

    from tinysites import client_context, train_message

    from fedscan.client.client_app import make_client_app
    from fedscan.client.site_config import load_site_settings
    from fedscan.client.site_page import site_page_factory
    from fedscan.client.site_status import site_status
    from fedscan.shared.config import load_config
    from fedscan.shared.messages import to_arrays
    from fedscan.shared.status.serve import StatusOptions, StatusServer
    from fedscan.shared.tasks import build_task

    out, first, second = runs
    state = tmp_path / "state"
    shutil.copytree(out / "site-state" / "site-a", state)
    data = out.parent / "data" / "site-a"
    (tmp_path / "site.yaml").write_text(
        f"name: site-a\ndata: {data}\nserver: 127.0.0.1:9\nstate_dir: {state}\n"
        "privacy: {epsilon: 3.0, delta: 1.0e-5, max_grad_norm: 1.0, accountant: prv}\n"
        "policy: {min_batch_size: 4}\n")
    # A third run the site refuses (batch 2 < its floor of 4), through its real ClientApp.
    site = load_site_settings(tmp_path / "site.yaml").site
    cfg = load_config(out.parent / "dp.yaml")
    arrays = to_arrays(build_task(cfg).build_model().state_dict())
    reply = make_client_app(lambda ctx: site)(train_message(cfg, arrays, 1), client_context())
    assert reply.error.reason == "policy-refused"

    proc = subprocess.run([sys.executable, "-m", "fedscan", "client", "status", "--config",
                           str(tmp_path / "site.yaml"), "--json"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    ledger = json.loads((state / "privacy_ledger.json").read_text())
    accountant = create_accountant(mechanism="prv")
    accountant.history = [tuple(h) for h in ledger["history"]]
    exact = accountant.get_epsilon(delta=1e-5)
    assert status["privacy"]["epsilon"] == exact
    assert status["privacy"]["epsilon"] == first["rounds"][-1]["train"]["site-a"]["epsilon"]
    assert status["privacy"]["steps"] == first["rounds"][-1]["train"]["site-a"]["steps"]
    audit = [json.loads(line) for line in (state / "audit.log").read_text().splitlines()]
    runs_ = {r["run_id"]: r for r in status["runs"]}
    assert len(runs_) == 3
    for run_id, run in runs_.items():
        mine = [a for a in audit if a["run_id"] == run_id]
        assert run["sha256"] == list(dict.fromkeys(a["sha256"] for a in mine))
        assert run["accepted"] == sum(a["event"] == "task-accepted" for a in mine)
        assert run["refused"] == sum(a["event"] == "task-refused" for a in mine)
    one, two, refused = status["runs"]
    # Run one: the data check's query (answered "policy": a DP site keeps its statistics),
    # two rounds' train and the final evaluate.
    assert (one["accepted"], one["refused"], refused["accepted"], refused["refused"]) == \
        (4, 0, 0, 1)
    assert one["rounds_trained"] == [1, 2] and two["rounds_declined"] == [1]
    assert one["epsilon_before"] == 0.0 and one["epsilon_after"] == exact
    assert two["epsilon_before"] == two["epsilon_after"] == exact  # declined: no step
    assert "train.batch_size 2 < policy.min_batch_size 4" in refused["refusals"][0]
    assert refused["errors"] == [{"round": 1, "phase": "train", "code": "policy-refused"}]
    # What was sent is what the server received and counted (the SuperLink adds a delivery
    # time and ids to each reply's metadata on the way: a few dozen bytes).
    for run, summary in ((one, first), (two, second)):
        counted = sum(n for r in summary["rounds"] for k, n in r["bytes"]["site-a"].items()
                      if k.endswith("_up"))
        counted += summary["data_check"]["bytes"]["site-a"]["query_up"]  # before round 1
        assert run["bytes_sent"] == pytest.approx(counted, abs=64 * run["replies"])
    assert {"epsilon", "status", "steps"} <= set(status["sent_names"]["privacy"])
    assert {"loss", "steps", "num-examples"} <= set(status["sent_names"]["metrics"])
    assert status["last_contact"] is not None

    text = subprocess.run([sys.executable, "-m", "fedscan", "client", "status", "--config",
                           str(tmp_path / "site.yaml")], capture_output=True, text=True,
                          timeout=120).stdout
    assert f"epsilon {exact:.4f} spent of 3 in total" in text
    for digest in {a["sha256"] for a in audit}:
        assert f"task config sha256 {digest}" in text
    assert "refused: train.batch_size 2 < policy.min_batch_size 4" in text

    # The same as a local page; off loopback it needs its token (served on loopback here).
    server = StatusServer(None, StatusOptions(host="0.0.0.0", port=0, token="t0k"),
                          bind="127.0.0.1", make_app=site_page_factory(site)).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"{base}/api/status", timeout=10)
        assert denied.value.code == 401
        request = urllib.request.Request(f"{base}/", headers={"Authorization": "Bearer t0k"})
        page = urllib.request.urlopen(request, timeout=10).read().decode()
        assert f"{exact:.4f} spent of 3" in page and one["sha256"][0] in page
        post = urllib.request.Request(f"{base}/api/status", data=b"x", method="POST",
                                      headers={"Authorization": "Bearer t0k"})
        with pytest.raises(urllib.error.HTTPError) as refused_post:
            urllib.request.urlopen(post, timeout=10)
        assert refused_post.value.code == 405
    finally:
        server.stop()
    assert site_status(site)["privacy"]["epsilon"] == exact
