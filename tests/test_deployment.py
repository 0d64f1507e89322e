"""Loopback integration: a real consortium on Flower's deployment runtime.

One scenario, real processes on 127.0.0.1 with TLS and SuperNode authentication on:

1. ``fedscan server start`` (SuperLink + ServerApp) admits three hospital keys;
2. preflight: a registered site passes ``fedscan client check``; an unregistered key fails it
   and its daemon is refused by the server;
3. three ``fedscan client start`` daemons (SuperNodes) join; site-c is killed with SIGKILL
   while it trains in round 1, and round 1 completes with the other two;
4. the server is killed with SIGKILL after round 1; site-c's daemon is started again;
5. ``fedscan server start --resume RUN_DIR`` runs round 2 with all three sites.

The tests below then check what the scenario left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tinysites import TINY_RUN, make_sites

from fedscan.shared.certs import create_ca, create_server_cert, create_site_key

pytestmark = pytest.mark.slow
SITES = ("site-a", "site-b", "site-c")
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (Linux /proc), before anyone is killed."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill9(pid: int) -> None:
    """SIGKILL a process and everything below it (a machine losing power)."""
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


class Processes:
    """Every process the scenario starts, killed with its descendants at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("a")
        proc = subprocess.Popen([sys.executable, "-m", "fedscan", *args], cwd=self.root,
                                stdout=log, stderr=subprocess.STDOUT, env=ENV,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill9(proc.pid)
        pid_file = self.root / "run" / "superlink.pid"
        if pid_file.is_file():
            kill9(int(pid_file.read_text()))


def wait_for(what: str, condition, timeout: float, procs: Processes, logs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    tails = "\n".join(f"--- {n}\n{procs.log(n)[-3000:]}" for n in logs)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


def completed_rounds(run: Path) -> list[int]:
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return []
    return [r["round"] for r in summary["rounds"] if r.get("seconds") is not None]


def setup_consortium(root: Path) -> tuple[int, list[int]]:
    port, *runtime = free_ports(5)
    make_sites(root / "data")
    create_ca(root / "certs")
    create_server_cert(root / "certs", ["localhost", "127.0.0.1"])
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
        wait_for("site-c to start training", lambda: audit_c.is_file(), 180, procs,
                 ["server", "site-c"])
        kill9(procs.procs["site-c"].pid)
        out["site-c-killed"] = time.monotonic()
        wait_for("round 1", lambda: completed_rounds(out["run"]) == [1], 240, procs,
                 ["server", "site-a", "site-b"])
        out["round-1-done"] = time.monotonic()
        # The server dies right after round 1.
        kill9(int((out["run"] / "superlink.pid").read_text()))
        kill9(procs.procs["server"].pid)
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


def test_sites_ran_only_their_installed_code(scenario):
    root = scenario["root"]
    for site in ("site-a", "site-b"):
        events = [json.loads(line) for line in
                  (root / f".fedscan-{site}" / "audit.log").read_text().splitlines()]
        assert events and all(e["event"] == "run-accepted" and e["policy"] == "installed-code"
                              for e in events)
        assert len({e["run_id"] for e in events}) == 2  # the first run and the resumed one
