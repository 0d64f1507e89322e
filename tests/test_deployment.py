"""Loopback integration: a real consortium on Flower's deployment runtime.

One scenario, real processes on 127.0.0.1 with TLS and SuperNode authentication on:

1. ``fedscan server start`` (SuperLink on an internal loopback port behind the nginx front,
   ServerApp) admits three hospital keys; the hospitals reach only the front;
2. preflight: a registered site passes ``fedscan client check``; an unregistered key fails it
   and its daemon is refused by the server;
3. three ``fedscan client start`` daemons (SuperNodes) join; site-c is killed with SIGKILL
   while it trains in round 1, and round 1 completes with the other two;
4. ``fedscan server start`` is killed with SIGKILL after round 1 (only that process: its
   SuperLink and nginx must die with it); site-c's daemon is started again;
5. ``fedscan server start --resume RUN_DIR`` runs round 2 with all three sites.

The tests below then check what the scenario left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from consortium import (
    ENV,
    Processes,
    alive,
    completed_rounds,
    descendants,
    free_ports,
    kill9,
    wait_for,
)
from tinysites import TINY_RUN, make_sites

from fedscan.shared.certs import create_ca, create_server_cert, create_site_key

pytestmark = pytest.mark.slow
SITES = ("site-a", "site-b", "site-c")
def setup_consortium(root: Path) -> tuple[int, list[int]]:
    port, *runtime = free_ports(5)
    make_sites(root / "data")
    create_ca(root / "ca")  # the CA's key stays in its own folder, never the server's
    create_server_cert(root / "ca", ["localhost", "127.0.0.1"], root / "certs")
    for i, name in enumerate([*SITES, "intruder"]):
        create_site_key(name, root / "keys")
        data = name if name != "intruder" else "site-a"
        (root / f"{name}.yaml").write_text(
            f"name: {name}\ndata: data/{data}\nserver: 127.0.0.1:{port}\n"
            f"ca_cert: certs/ca.crt\nprivate_key: keys/{name}\nruntime_port: {runtime[i]}\n")
    (root / "server.yaml").write_text(
        f"server: {{host: 127.0.0.1, port: {port}, ca_cert: certs/ca.crt, "
        "cert: certs/server.pem, key: certs/server.key, run_dir: run, site_grace: 90}\n"
        # site-c is admitted while the server runs, with `fedscan server register-site`.
        "sites:\n" + "".join(f"  - {{name: {s}, public_key: keys/{s}.pub}}\n" for s in SITES[:2])
        + "  - {name: site-c}\n"
        + "rounds: 2\nstrategy: {min_sites: 2, round_timeout: 300}\n" + TINY_RUN)
    return port, runtime


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    root = tmp_path_factory.mktemp("consortium")
    setup_consortium(root)
    procs = Processes(root)
    out: dict = {"root": root, "run": root / "run", "procs": procs}
    started = time.monotonic()
    try:
        procs.start("server", ["server", "start", "--config", "server.yaml"])
        wait_for("the run to be submitted", lambda: "submitted" in procs.log("server"), 120,
                 procs, ["server"])
        out["register"] = subprocess.run(
            [sys.executable, "-m", "fedscan", "server", "register-site", "--config",
             "server.yaml", "--key", "keys/site-c.pub", "--name", "site-c"], cwd=root,
            capture_output=True, text=True, env=ENV, timeout=120)
        # Preflight before the daemons connect (the key check activates the node briefly).
        for name in ("site-a", "intruder"):
            out[f"check-{name}"] = subprocess.run(
                [sys.executable, "-m", "fedscan", "client", "check", "--config",
                 f"{name}.yaml"], cwd=root, capture_output=True, text=True, env=ENV,
                timeout=120)
        out["intruder"] = subprocess.run(
            [sys.executable, "-c", "from fedscan.client.daemon import start_client; "
             "raise SystemExit(start_client('intruder.yaml', once=True))"],
            cwd=root, capture_output=True, text=True, env=ENV, timeout=120)
        for site in SITES:
            procs.start(site, ["client", "start", "--config", f"{site}.yaml"])
        # site-c dies while it trains in round 1 (its ClientApp was just approved).
        audit_c = root / ".fedscan-site-c" / "audit.log"
        # (Its first audit line is the data check's query before round 1: wait for train.)
        wait_for("site-c to start training",
                 lambda: audit_c.is_file() and '"phase": "train"' in audit_c.read_text(),
                 180, procs, ["server", "site-c"])
        kill9(procs.procs["site-c"].pid)
        out["site-c-killed"] = time.monotonic()
        wait_for("round 1", lambda: completed_rounds(out["run"]) == [1], 240, procs,
                 ["server", "site-a", "site-b"])
        out["round-1-done"] = time.monotonic()
        # `fedscan server start` dies right after round 1 (SIGKILL: no cleanup runs). Its
        # SuperLink, nginx and what they started must go with it.
        server_pid = procs.procs["server"].pid
        below = descendants(server_pid)
        out["front-pids"] = [int((out["run"] / "front" / "nginx.pid").read_text())]
        os.kill(server_pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(p) for p in below):
            time.sleep(0.5)
        out["left-after-crash"] = [p for p in below if alive(p)]
        for pid in out["left-after-crash"]:
            kill9(pid)
        ckpt = out["run"] / "checkpoints" / "round_001.pt"
        out["round1-before"] = (ckpt.stat().st_mtime_ns, hashlib.sha256(ckpt.read_bytes())
                                .hexdigest(), json.loads((out["run"] / "summary.json")
                                                         .read_text())["rounds"][0])
        time.sleep(3)  # let the ServerApp notice its SuperLink is gone
        procs.start("site-c", ["client", "start", "--config", "site-c.yaml"])  # rejoins
        out["resume"] = subprocess.run(
            [sys.executable, "-m", "fedscan", "server", "start", "--resume", "run"], cwd=root,
            capture_output=True, text=True, env=ENV, timeout=400)
        out["seconds"] = time.monotonic() - started
        print(f"scenario took {out['seconds']:.0f}s; site-c killed -> round 1 done in "
              f"{out['round-1-done'] - out['site-c-killed']:.0f}s")
        yield out
    finally:
        procs.stop_all()


def test_resumed_run_completes_and_writes_outputs(scenario):
    resume, run = scenario["resume"], scenario["run"]
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["resumed_after"] == [1]
    assert summary["sites"] == list(SITES)
    for name in ("report.md", "dice.png", "loss.png", "config.yaml", "final_model.pt",
                 "checkpoints/round_001.pt", "checkpoints/round_002.pt", "state.db"):
        assert (run / name).is_file(), name
    final = summary["final"]
    assert set(final["per_site"]) == set(SITES) and 0.0 <= final["dice"] <= 1.0


def test_no_completed_round_lost_or_repeated(scenario):
    run = scenario["run"]
    mtime, digest, round1 = scenario["round1-before"]
    ckpt = run / "checkpoints" / "round_001.pt"
    assert ckpt.stat().st_mtime_ns == mtime
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest
    summary = json.loads((run / "summary.json").read_text())
    # Round 1 exactly as recorded before the crash; only its model's evaluation, which the
    # sites send with round 2's train replies, was added after the restart.
    later = ("evaluate", "aggregate", "median")
    assert round1["evaluate"] == {}
    assert {k: v for k, v in summary["rounds"][0].items() if k not in later} == \
        {k: v for k, v in round1.items() if k not in later}
    assert set(summary["rounds"][0]["evaluate"]) >= {"site-a", "site-b"}
    assert "resuming" in scenario["resume"].stdout and "after round 1" in scenario["resume"].stdout
    # The sites that lived through both server processes trained exactly once per round.
    for site in ("site-a", "site-b"):
        assert scenario["procs"].log(site).count("Receiving: train message") == 2, site


def test_killed_site_does_not_stop_the_round_and_rejoins(scenario):
    summary = json.loads((scenario["run"] / "summary.json").read_text())
    r1, r2 = summary["rounds"]
    assert set(r1["train"]) == {"site-a", "site-b"}  # site-c was killed mid-round
    assert any(e["site"] == "site-c" and e["phase"] == "train" for e in r1["errors"])
    assert set(r2["train"]) == set(SITES)  # and came back for round 2


def test_register_site_admits_a_key_while_running(scenario):
    reg = scenario["register"]
    assert reg.returncode == 0 and "admitted site site-c" in reg.stdout, reg.stdout + reg.stderr
    nodes = json.loads((scenario["run"] / "nodes.json").read_text())
    assert sorted(nodes.values()) == list(SITES)


def test_unregistered_key_is_refused(scenario):
    ok, bad, daemon = scenario["check-site-a"], scenario["check-intruder"], scenario["intruder"]
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK    key          registered on the server" in ok.stdout
    assert "OK    certificate" in ok.stdout and "OK    data" in ok.stdout
    assert bad.returncode == 1 and "FAIL  key" in bad.stdout
    assert daemon.returncode != 0
    assert "refused this site's key" in daemon.stderr, daemon.stdout[-2000:] + daemon.stderr
    summary = json.loads((scenario["run"] / "summary.json").read_text())
    assert all("intruder" not in r["train"] for r in summary["rounds"])


def test_bytes_per_round_per_site_within_5_percent_of_fp32_model(scenario):
    summary = json.loads((scenario["run"] / "summary.json").read_text())
    model = summary["model_fp32_bytes"]
    assert model > 500_000  # the default model's channels: a realistic tensor count
    for entry in summary["rounds"]:
        for site in entry["train"]:
            traffic = entry["bytes"][site]
            assert model < traffic["train_down"] <= 1.05 * model, (site, traffic)
            assert model < traffic["train_up"] <= 1.05 * model, (site, traffic)
            print(entry["round"], site, {k: round(v / model, 4) for k, v in traffic.items()})


def test_hospitals_reached_only_the_front(scenario):
    """Every Fleet call went through nginx; the SuperLink's port is the operator's alone."""
    run = scenario["run"]
    connection = (run / ".flwr" / "config.toml").read_text()
    internal = int(connection.split('address = "127.0.0.1:')[1].split('"')[0])
    port = yaml.safe_load((scenario["root"] / "server.yaml").read_text())["server"]["port"]
    assert internal != port
    for site in SITES:
        assert f"127.0.0.1:{internal}" not in scenario["procs"].log(site)
    lines = (run / "front" / "access.log").read_text().splitlines()
    calls = [line.split('"')[1].split()[1] for line in lines]
    for path in ("/v1/fleet/activate-node", "/v1/fleet/pull-messages", "/v1/fleet/push-object",
                 "/v1/fleet/pull-object", "/v1/fleet/send-node-heartbeat"):
        assert path in calls, path
    assert all(c.startswith("/v1/fleet/") for c in calls)
    statuses = {int(line.split('"')[2].split()[0]) for line in lines}
    assert statuses <= {200, 401, 412}, statuses  # 412: the intruder's and preflight's keys
    sizes = [int(line.split("request_bytes=")[1].split()[0]) for line in lines]
    print(f"front: {len(lines)} Fleet calls, largest request {max(sizes)} bytes")
    assert "Fleet API only" in scenario["procs"].log("server")


def test_crash_of_the_server_command_takes_superlink_and_front_along(scenario):
    assert scenario["left-after-crash"] == []
    assert not any(alive(p) for p in scenario["front-pids"])
    # The resumed server started its own front on the same port.
    assert "listening on" in scenario["resume"].stdout


def test_sites_ran_only_their_installed_code(scenario):
    root = scenario["root"]
    for site in ("site-a", "site-b"):
        lines = (root / f".fedscan-{site}" / "audit.log").read_text().splitlines()
        everything = [json.loads(line) for line in lines]
        events = [e for e in everything if e["event"].startswith("run-")]
        assert events and all(e["event"] == "run-accepted" and e["policy"] == "installed-code"
                              for e in events)
        assert len({e["run_id"] for e in events}) == 2  # the first run and the resumed one
        # Every task config it accepted, under one hash (the same config all run long).
        tasks = [e for e in everything if e["event"].startswith("task-")]
        assert {e["event"] for e in tasks} == {"task-accepted"}
        assert len(tasks) >= 3 and len({e["sha256"] for e in tasks}) == 1
