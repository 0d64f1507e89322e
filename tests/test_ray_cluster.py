"""A simulation on an existing Ray cluster: a head and a worker node started here with
``ray start`` (one CPU each), the config's ``simulation.ray_address`` pointing at the head;
the virtual hospitals' ClientApp actors run on both nodes (seen as children of each node's
raylet while the run goes)."""

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
from consortium import ENV, free_ports
from tinysites import make_sites

SITES = ["site-a", "site-b", "site-c"]


def ray(*args: str, env: dict) -> subprocess.CompletedProcess:
    # The venv's python runs Ray's CLI, so the nodes' workers import this fedscan.
    return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def node_args(ports: list[int]) -> list[str]:
    manager, objects, agent, metrics, runtime, low = ports
    return ["--num-cpus=1", "--num-gpus=0", "--node-ip-address=127.0.0.1",
            f"--node-manager-port={manager}", f"--object-manager-port={objects}",
            f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime}",
            f"--min-worker-port={low}", f"--max-worker-port={low + 40}"]


def actor_nodes(managers: dict[int, str]) -> set[str]:
    """The nodes (by name) whose raylet is the parent of a ClientApp actor right now."""
    raylets = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        for port, name in managers.items():
            if "raylet" in cmd and f"--node_manager_port={port}" in cmd:
                raylets[p.info["pid"]] = name
    seen = set()
    for pid, name in raylets.items():
        try:
            for child in psutil.Process(pid).children():
                if "ClientAppActor" in " ".join(child.cmdline()):
                    seen.add(name)
        except psutil.Error:
            continue
    return seen


@pytest.mark.slow
def test_simulation_places_actors_on_both_nodes_of_a_ray_cluster(tmp_path):
    make_sites(tmp_path / "data", n_cases=3)
    ports = free_ports(15)
    gcs, client = ports[0], ports[1]
    head_ports, worker_ports = ports[2:8], ports[8:14]
    # Ray's worker port ranges must not overlap: 40 ports from two free ones far apart.
    head_ports[-1], worker_ports[-1] = 21000 + (gcs % 2000) * 2, 25000 + (gcs % 2000) * 2
    # One short temp dir per node (Ray's socket paths; two nodes must not share sockets).
    temps = [tempfile.mkdtemp(prefix="rc", dir="/tmp") for _ in range(2)]
    env = {**ENV, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    address = f"127.0.0.1:{gcs}"
    try:
        head = ray("start", "--head", f"--port={gcs}", f"--ray-client-server-port={client}",
                   "--include-dashboard=false", f"--temp-dir={temps[0]}",
                   "--disable-usage-stats", *node_args(head_ports), env=env)
        assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-2000:]
        worker = ray("start", f"--address={address}", f"--temp-dir={temps[1]}",
                     *node_args(worker_ports), env=env)
        assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]

        sites = "".join(f"  - {{name: {s}, data: data/{s}}}\n" for s in SITES)
        (tmp_path / "run.yaml").write_text(
            f"sites:\n{sites}rounds: 2\n"
            "data: {spacing: [8, 8, 8]}\n"
            "model: {channels: [4, 8, 16], strides: [2, 2], num_res_units: 0}\n"
            "train: {patch_size: [16, 16, 16], batch_size: 2, local_steps: 2}\n"
            "evaluate: {hd95: false}\ntracking: {tensorboard: false}\n"
            f"simulation: {{ray_address: '{address}', cpus_per_site: 1}}\n")
        managers = {head_ports[0]: "head", worker_ports[0]: "worker"}
        with (tmp_path / "sim.log").open("w") as log:
            sim = subprocess.Popen([sys.executable, "-m", "fedscan", "simulate", "--config",
                                    str(tmp_path / "run.yaml"), "--out", str(tmp_path / "run")],
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
            seen: set[str] = set()
            deadline = time.monotonic() + 300
            while sim.poll() is None and time.monotonic() < deadline:
                seen |= actor_nodes(managers)
                time.sleep(0.5)
            if sim.poll() is None:
                sim.kill()
        assert sim.wait() == 0, (tmp_path / "sim.log").read_text()[-3000:]
        assert seen == {"head", "worker"}, seen
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert [r["round"] for r in summary["rounds"]] == [1, 2]
        assert set(summary["rounds"][-1]["train"]) == set(SITES)
    finally:
        stop_nodes(temps, [head_ports[0], worker_ports[0]])
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)


def stop_nodes(temps: list[str], managers: list[int]) -> None:
    """Kill this test's Ray processes only (``ray stop`` would end every Ray on the machine):
    those naming its temp dirs or node-manager ports, and everything below them."""
    marks = [*temps, *(f"--node_manager_port={m}" for m in managers)]
    ours = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(mark in cmd for mark in marks):
            ours.append(p)
    for p in ours:
        try:
            victims = [*p.children(recursive=True), p]
        except psutil.Error:
            continue
        for victim in victims:
            with contextlib.suppress(psutil.Error):
                victim.kill()


def test_backend_joins_a_cluster_from_config_or_environment(monkeypatch):
    from fedscan.shared.config import parse_config
    from fedscan.shared.errors import ConfigError
    from fedscan.simulations.federated import simulation_backend

    sites = [{"name": "a", "data": "/x"}]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = simulation_backend(parse_config({"sites": sites, "device": "cpu"}))
    assert "address" not in local["init_args"] and local["client_resources"]["num_gpus"] == 0
    cfg = parse_config({"sites": sites, "simulation": {"ray_address": "10.0.0.1:6379",
                                                       "gpus_per_site": 0.25}})
    backend = simulation_backend(cfg)
    assert backend["init_args"] == {"address": "10.0.0.1:6379", "include_dashboard": False}
    assert backend["client_resources"] == {"num_cpus": 1, "num_gpus": 0.25}
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    env = simulation_backend(parse_config({"sites": sites}))
    assert env["init_args"]["address"] == "auto"
    with pytest.raises(ConfigError, match="simulation.cpus_per_site"):
        parse_config({"sites": sites, "simulation": {"cpus_per_site": 0}})
