"""The status page beside ``fedscan server start`` (TLS, node authentication, two admitted
hospital daemons, 2 rounds): the ServerApp process writes live.json, the page served by the
`server start` process shows the admitted sites by name, online, with their round in flight,
and the finished run; the page stops with the run."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from consortium import ENV, free_ports
from tinysites import TINY_RUN, make_sites

from fedscan.shared.certs import create_ca, create_server_cert, create_site_key
from fedscan.shared.status.view import build_view

pytestmark = pytest.mark.slow
SITES = ("site-a", "site-b")


def test_server_start_serves_the_live_page(tmp_path):
    port, *runtime = free_ports(3)
    make_sites(tmp_path / "data")
    create_ca(tmp_path / "ca")  # the CA key stays apart from the server's TLS files
    create_server_cert(tmp_path / "ca", ["localhost", "127.0.0.1"], out_dir=tmp_path / "certs")
    for i, name in enumerate(SITES):
        create_site_key(name, tmp_path / "keys")
        (tmp_path / f"{name}.yaml").write_text(
            f"name: {name}\ndata: data/{name}\nserver: 127.0.0.1:{port}\n"
            f"ca_cert: certs/ca.crt\nprivate_key: keys/{name}\nruntime_port: {runtime[i]}\n")
    (tmp_path / "server.yaml").write_text(
        f"server: {{host: 127.0.0.1, port: {port}, ca_cert: certs/ca.crt, "
        "cert: certs/server.pem, key: certs/server.key, run_dir: run, site_grace: 90, "
        "status_port: 0}\n"
        "sites:\n" + "".join(f"  - {{name: {s}, public_key: keys/{s}.pub}}\n" for s in SITES)
        + "rounds: 2\nstrategy: {round_timeout: 300}\n" + TINY_RUN)
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, args: list[str]) -> subprocess.Popen:
        log = (tmp_path / f"{name}.log").open("w")
        procs[name] = subprocess.Popen([sys.executable, "-m", "fedscan", *args], cwd=tmp_path,
                                       stdout=log, stderr=subprocess.STDOUT, env=ENV,
                                       start_new_session=True)
        return procs[name]

    def log(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text(errors="replace")

    try:
        server = start("server", ["server", "start", "--config", "server.yaml"])
        deadline = time.monotonic() + 120
        while "status page http" not in log("server"):
            assert server.poll() is None and time.monotonic() < deadline, log("server")[-3000:]
            time.sleep(0.5)
        url = log("server").split("status page ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and "token" not in url
        for site in SITES:
            start(site, ["client", "start", "--config", f"{site}.yaml"])
        seen_in_flight = None
        deadline = time.monotonic() + 600  # rounds take minutes on a loaded 2-core machine
        while server.poll() is None:
            assert time.monotonic() < deadline, log("server")[-3000:]
            try:
                view = httpx.get(url + "api/status", timeout=5).json()
            except httpx.HTTPError:
                time.sleep(0.5)
                continue
            sites = {s["name"]: s for s in view["sites"]}
            if (seen_in_flight is None and view["rounds"]["in_flight"] == 1
                    and all(sites[s]["online"] for s in SITES)
                    and all(sites[s]["in_flight"] in ("waiting", "replied") for s in SITES)):
                seen_in_flight = view
            time.sleep(0.5)
        assert server.returncode == 0, log("server")[-3000:]
        assert seen_in_flight is not None, "round 1 in flight with both admitted sites online"
        assert seen_in_flight["run"]["state"] == "running"
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "api/status", timeout=3)  # the page stopped with the run
        final = build_view(tmp_path / "run")
        assert final["run"]["state"] == "finished" and final["rounds"]["done"] == 2
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert [s["name"] for s in final["sites"]] == summary["sites"] == list(SITES)
        for s in final["sites"]:
            assert s["last_outcome"] == "trained" and s["bytes_down"] > 0
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        pid_file = Path(tmp_path / "run" / "superlink.pid")
        if pid_file.is_file():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
