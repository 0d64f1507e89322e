"""The consortium server attacked with Flower's own CLI, as an outsider and as the operator's
neighbour: real processes, TLS and node authentication on.

``fedscan server start`` runs a real federation (two hospitals, one round). While it runs:

* an **outsider** who holds only the consortium CA certificate (every hospital has it) and
  network access to the hospitals' port runs ``flwr run`` of a foreign app whose ServerApp
  would write a marker file, ``flwr supernode register`` of its own key, ``flwr list``,
  ``flwr stop`` and ``flwr log`` of the real run, and ``flwr pull``, against that port. When
  this machine can make network namespaces, the outsider is a separate network host (its
  own namespace, joined by a veth pair with link-local addresses) and the front listens on
  the host's end of it; otherwise it runs on loopback;
* a party **on the server host** submits foreign FABs to the SuperLink's internal port
  directly (what the front cannot stop): one carrying code, one whose version would make
  Flower write outside its home folder. The ServerApp guard must refuse and log both, and
  install neither.

Every attempt must be refused, no marker file and no escaped folder may appear, and the real
run must complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from consortium import ENV, Processes, alive, free_ports, wait_for
from tinysites import TINY_RUN, make_sites

from fedscan.shared.certs import create_ca, create_server_cert, create_site_key

pytestmark = pytest.mark.slow
SITES = ("site-a", "site-b")
FLWR = str(Path(sys.executable).with_name("flwr"))
#: Commands the outsider tries; {run} is the real run's id, {app} the foreign app.
ATTACKS = {
    "run": ["run", "{app}", "{conn}", "--format", "json"],
    "register": ["supernode", "register", "{key}", "{conn}", "--format", "json"],
    "list": ["list", "{conn}", "--format", "json"],
    "stop": ["stop", "{run}", "{conn}", "--format", "json"],
    "log": ["log", "{run}", "{conn}"],
    "pull": ["pull", "{run}", "{conn}"],
}
EVIL_APP = '''import pathlib
pathlib.Path({marker!r}).write_text("foreign code ran at import")
from flwr.serverapp import ServerApp
app = ServerApp()

@app.main()
def main(grid, context):
    pathlib.Path({marker!r}).write_text("foreign ServerApp ran")
'''


def foreign_app(folder: Path, marker: Path, version: str = "1.0.0") -> Path:
    """A Flower app whose ServerApp writes ``marker`` when imported or run."""
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        f'[project]\nname = "evilapp"\nversion = "{version}"\ndependencies = []\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n'
        '[tool.flwr.app]\npublisher = "mallory"\n'
        '[tool.flwr.app.components]\nserverapp = "evil_app:app"\n'
        'clientapp = "evil_app:app"\n')
    (folder / "evil_app.py").write_text(EVIL_APP.format(marker=str(marker)))
    return folder


def connection(home: Path, address: str, ca_cert: Path) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "atk"\n\n[superlink.atk]\naddress = "{address}"\n'
        f'root-certificates = "{ca_cert}"\n')
    return home


# -- a second network host: a namespace joined by a veth pair ------------------------------

def make_netns() -> dict | None:
    """A network namespace and a veth pair with link-local /30 addresses; None if this
    machine cannot make them (not root, no ``ip``, no namespaces in a container)."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        return None
    tag = f"{os.getpid() % 100000}"
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    octets = [o for o in range(20, 250) if o != 169 and f"169.254.{o}." not in used]
    octet = random.Random(os.getpid()).choice(octets)
    net = {"name": f"fedscan-atk{tag}", "veth": f"fsa{tag}h", "peer": f"fsa{tag}n",
           "host_ip": f"169.254.{octet}.1", "ns_ip": f"169.254.{octet}.2"}
    steps = [["ip", "netns", "add", net["name"]],
             ["ip", "link", "add", net["veth"], "type", "veth", "peer", "name", net["peer"]],
             ["ip", "link", "set", net["peer"], "netns", net["name"]],
             ["ip", "addr", "add", f"{net['host_ip']}/30", "dev", net["veth"]],
             ["ip", "link", "set", net["veth"], "up"],
             ["ip", "-n", net["name"], "addr", "add", f"{net['ns_ip']}/30", "dev", net["peer"]],
             ["ip", "-n", net["name"], "link", "set", net["peer"], "up"],
             ["ip", "-n", net["name"], "link", "set", "lo", "up"]]
    for step in steps:
        if subprocess.run(step, capture_output=True, timeout=30).returncode != 0:
            drop_netns(net)
            return None
    return net


def drop_netns(net: dict) -> None:
    for step in (["ip", "netns", "del", net["name"]], ["ip", "link", "del", net["veth"]]):
        subprocess.run(step, capture_output=True, timeout=30)


PROBE = '''import json, socket, ssl, sys
host, front, internal, ca = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def tcp(h, p):
    try:
        socket.create_connection((h, p), timeout=5).close()
        return "open"
    except OSError as exc:
        return type(exc).__name__
def post(path, size=0):
    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection((host, front), timeout=30) as s, \\
            ctx.wrap_socket(s, server_hostname=host) as t:
        t.sendall(f"POST {path} HTTP/1.1\\r\\nHost: {host}\\r\\nContent-Length: {size}\\r\\n"
                  "Content-Type: application/protobuf\\r\\nConnection: close\\r\\n\\r\\n"
                  .encode())
        try:
            t.sendall(b"\\0" * size)
        except OSError:
            pass  # nginx may answer 413 and close before the body is sent
        return t.recv(64).split()[1].decode()
print(json.dumps({"front": tcp(host, front), "fleet_status": post("/v1/fleet/get-run"),
                  "control_status": post("/v1/control/list-runs"),
                  "chunk_6MiB_status": post("/v1/fleet/push-object", 6 * 2**20),
                  "body_17MiB_status": post("/v1/fleet/push-object", 17 * 2**20),
                  "internal_on_host": tcp(host, internal),
                  "internal_on_own_loopback": tcp("127.0.0.1", internal)}))
'''


def listening_addresses(port: int) -> list[str]:
    """Local addresses with a TCP socket listening on ``port`` (from /proc/net/tcp{,6})."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    if len(address) == 8:
                        found.append(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
                    else:
                        raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1]
                                       for i in range(0, 32, 8))
                        found.append(socket.inet_ntop(socket.AF_INET6, raw))
    return found


def run_all(commands: dict[str, list[str]], env: dict, cwd: Path,
            timeout: float = 240) -> dict[str, subprocess.CompletedProcess]:
    """Run CLI commands side by side (each ``flwr`` start takes seconds on a loaded box)."""
    procs = {name: subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
             for name, cmd in commands.items()}
    out = {}
    for name, proc in procs.items():
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
        out[name] = subprocess.CompletedProcess(commands[name], proc.returncode, stdout, "")
    return out


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacked")
    net = make_netns()
    host = net["host_ip"] if net else "127.0.0.1"
    port, *runtime = free_ports(3)
    make_sites(root / "data", n_cases=2)
    create_ca(root / "ca")
    create_server_cert(root / "ca", ["localhost", "127.0.0.1", host], root / "certs")
    for i, name in enumerate(SITES):
        create_site_key(name, root / "keys")
        (root / f"{name}.yaml").write_text(
            f"name: {name}\ndata: data/{name}\nserver: {host}:{port}\n"
            f"ca_cert: certs/ca.crt\nprivate_key: keys/{name}\nruntime_port: {runtime[i]}\n")
    _, mallory_pub = create_site_key("mallory", root / "attacker")
    (root / "server.yaml").write_text(
        f"server: {{host: '{host}', port: {port}, ca_cert: certs/ca.crt, "
        "cert: certs/server.pem, key: certs/server.key, run_dir: run, site_grace: 90}\n"
        "sites:\n" + "".join(f"  - {{name: {s}, public_key: keys/{s}.pub}}\n" for s in SITES)
        + "rounds: 1\nstrategy: {min_sites: 2, round_timeout: 300}\n" + TINY_RUN)
    markers = {k: root / f"MARKER-{k}" for k in ("outsider", "netns", "code", "version")}
    escape = f"escaped-{os.getpid()}"
    apps = {"outsider": foreign_app(root / "evil-outsider", markers["outsider"]),
            "netns": foreign_app(root / "evil-netns", markers["netns"]),
            "code": foreign_app(root / "evil-code", markers["code"]),
            # Unguarded Flower installs this into FLWR_HOME/apps/<...>/../../../../../<escape>.
            "version": foreign_app(root / "evil-version", markers["version"],
                                   version=f"1.0.0/../../../../../{escape}")}
    procs = Processes(root)
    out: dict = {"root": root, "run": root / "run", "procs": procs, "net": net, "host": host,
                 "port": port, "markers": markers, "escape": escape, "apps": apps}
    started = time.monotonic()
    try:
        # --keep-running: the operator inspects the SuperLink after the run (stopped below).
        server = procs.start("server", ["server", "start", "--config", "server.yaml",
                                        "--keep-running"])
        wait_for("the run to be submitted", lambda: "submitted" in procs.log("server"), 180,
                 procs, ["server"])
        run_id = (out["run"] / "run_ids.txt").read_text().split()[0]
        connection_file = (out["run"] / ".flwr" / "config.toml").read_text()
        internal = int(connection_file.split('address = "127.0.0.1:')[1].split('"')[0])
        out.update(run_id=run_id, internal=internal,
                   superlink_listens=listening_addresses(internal),
                   front_listens=listening_addresses(port))
        for site in SITES:
            procs.start(site, ["client", "start", "--config", f"{site}.yaml"])
        # The outsider: only ca.crt and the hospitals' address.
        ca = root / "certs" / "ca.crt"
        outsider_home = connection(root / "outsider", f"{host}:{port}", ca)
        values = {"conn": "atk", "run": run_id, "key": str(mallory_pub)}
        attacks = {f"outsider-{k}": [FLWR, *(a.format(app=apps["outsider"], **values)
                                             for a in args)] for k, args in ATTACKS.items()}
        attacks["outsider-probe"] = [sys.executable, "-c", PROBE, host, str(port),
                                     str(internal), str(ca)]
        if net:
            for k, args in ATTACKS.items():
                attacks[f"netns-{k}"] = ["ip", "netns", "exec", net["name"], FLWR, *(
                    a.format(app=apps["netns"], **values) for a in args)]
            attacks["netns-probe"] = ["ip", "netns", "exec", net["name"], sys.executable, "-c",
                                      PROBE, host, str(port), str(internal), str(ca)]
        # On the server host, straight to the SuperLink: only the ServerApp guard is left.
        operator_home = out["run"] / ".flwr"
        inside = {f"inside-{k}": ["env", f"FLWR_HOME={operator_home}", FLWR, "run",
                                  str(apps[k]), "fedscan", "--format", "json"]
                  for k in ("code", "version")}
        t0 = time.monotonic()
        out["attacks"] = run_all({**attacks, **inside}, {**ENV, "FLWR_HOME": str(outsider_home)},
                                 root)
        out["attack_seconds"] = time.monotonic() - t0
        out["foreign_runs"] = {k: json.loads(out["attacks"][f"inside-{k}"].stdout)
                               .get("run-id") for k in inside_keys(inside)}
        audit = out["run"] / "audit.log"
        wait_for("the guard's decisions on the foreign runs",
                 lambda: all(str(r) in (audit.read_text() if audit.is_file() else "")
                             for r in out["foreign_runs"].values()), 180, procs, ["server"])
        server.wait(timeout=600)
        out["server_rc"] = server.returncode
        # The operator's view afterwards, on the internal port.
        operator = run_all({"list": [FLWR, "list", "fedscan", "--format", "json"],
                            "nodes": [FLWR, "supernode", "list", "fedscan", "--format", "json"]},
                           {**ENV, "FLWR_HOME": str(operator_home)}, root)
        out["operator"] = {k: json.loads(v.stdout[v.stdout.index("{"):])
                           for k, v in operator.items()}
        out["seconds"] = time.monotonic() - started
        print(f"attack scenario took {out['seconds']:.0f}s (attacks {out['attack_seconds']:.0f}s"
              f", {'separate network namespace' if net else 'loopback only'})")
        yield out
    finally:
        procs.stop_all()
        if net:
            drop_netns(net)


def inside_keys(inside: dict) -> list[str]:
    return [k.removeprefix("inside-") for k in inside]


def refused_at_front(result: subprocess.CompletedProcess) -> bool:
    text = result.stdout
    if '"success": true' in text or '"success":true' in text:
        return False
    return "403" in text


def test_real_run_completes_despite_the_attacks(attacked):
    assert attacked["server_rc"] == 0, attacked["procs"].log("server")[-3000:]
    summary = json.loads((attacked["run"] / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1]
    assert set(summary["rounds"][0]["train"]) == set(SITES)
    assert "stopped" not in attacked["procs"].log("server")


def test_outsider_cli_attacks_are_refused_at_the_front(attacked):
    results = {k: v for k, v in attacked["attacks"].items()
               if k.startswith("outsider-") and k != "outsider-probe"}
    assert set(results) == {f"outsider-{k}" for k in ATTACKS}
    for name, result in results.items():
        assert refused_at_front(result), (name, result.stdout[-2000:])
    log = (attacked["run"] / "front" / "access.log").read_text().splitlines()
    control = [line for line in log if "/v1/control/" in line]
    paths = sorted({line.split('"')[1].split()[1] for line in control})
    print("outsider's Control API calls at the front:", paths)
    # Each command's request reached nginx and got 403; none got anything else.
    for path in ("start-run", "register-node", "list-runs", "stop-run"):
        assert f"/v1/control/{path}" in paths, paths
    assert control and all('" 403 ' in line for line in control)


def test_no_foreign_code_ran_and_nothing_escaped(attacked):
    for name, marker in attacked["markers"].items():
        assert not marker.exists(), name
    apps = attacked["run"] / ".flwr" / "apps"
    installed = sorted(p.name for p in apps.iterdir()) if apps.is_dir() else []
    assert installed and all(n.startswith("fedscan.fedscan.") for n in installed), installed
    hits = [str(p) for base in (attacked["root"], Path("/tmp"), attacked["run"].parent.parent)
            for p in base.glob(f"**/{attacked['escape']}*")]
    assert hits == []


def test_foreign_key_was_not_admitted(attacked):
    nodes = json.loads((attacked["run"] / "nodes.json").read_text())
    assert sorted(nodes.values()) == list(SITES)
    listed = attacked["operator"]["nodes"]
    print(json.dumps(listed)[:1500])
    assert len(listed["nodes"]) == len(SITES), listed


def test_superlink_listens_on_loopback_only_and_the_front_on_the_hospitals_address(attacked):
    assert attacked["superlink_listens"] == ["127.0.0.1"]
    assert attacked["front_listens"] == [attacked["host"]]


def test_front_forwards_model_chunks_and_refuses_oversized_bodies(attacked):
    """A 6 MiB body (bigger than Flower's 5 MiB array chunk) reaches the SuperLink, which
    judges it (not nginx's 413); 17 MiB is refused at the front."""
    probe = json.loads(attacked["attacks"]["outsider-probe"].stdout.strip().splitlines()[-1])
    print("probe from the hospitals' side:", probe)
    assert probe["fleet_status"] not in ("403", "404", "413") and probe["control_status"] == "403"
    assert probe["chunk_6MiB_status"] not in ("403", "404", "413"), probe
    assert probe["body_17MiB_status"] == "413", probe


def test_serverapp_guard_refuses_foreign_runs_on_the_internal_port_and_logs_them(attacked):
    """The party on the server host reached the SuperLink (runs were created), but the guard
    refused both before installing anything, and said why."""
    events = [json.loads(line) for line in
              (attacked["run"] / "audit.log").read_text().splitlines()]
    by_run = {str(e["run_id"]): e for e in events}
    for kind, reason in (("code", "the FAB carries code: evil_app.py"),
                         ("version", "is not a plain name")):
        run_id = attacked["foreign_runs"][kind]
        assert run_id, attacked["attacks"][f"inside-{kind}"].stdout[-2000:]
        event = by_run[str(run_id)]
        assert event["event"] == "run-refused" and reason in event["reason"], event
        assert len(event["fab_hash"]) == 64
    accepted = [e for e in events if e["event"] == "run-accepted"]
    assert [str(e["run_id"]) for e in accepted] == [attacked["run_id"]]
    assert accepted[0]["policy"] == "installed-code"
    # Flower's own record: the foreign runs failed, and the FAB hash logged is theirs.
    runs = {str(r["run-id"]): r for r in attacked["operator"]["list"]["runs"]}
    assert runs[attacked["run_id"]]["status"] == "finished:completed"
    for kind in ("code", "version"):
        run = runs[str(attacked["foreign_runs"][kind])]
        assert run["status"].startswith("finished:failed"), run
        assert run["fab-hash"] == by_run[str(attacked["foreign_runs"][kind])]["fab_hash"]
    assert len(runs) == 3  # the outsider's `flwr run` created none


def test_attacker_on_its_own_network_host_reaches_only_the_fleet_api(attacked):
    net = attacked["net"]
    if not net:
        pytest.skip("network namespaces unavailable (needs root and `ip netns`)")
    probe = json.loads(attacked["attacks"]["netns-probe"].stdout.strip().splitlines()[-1])
    # Positive control: the front answers from the other host and forwards Fleet calls.
    assert probe["front"] == "open" and probe["fleet_status"] not in ("403", "404"), probe
    assert probe["control_status"] == "403", probe
    assert probe["internal_on_host"] == "ConnectionRefusedError", probe
    assert probe["internal_on_own_loopback"] == "ConnectionRefusedError", probe
    for k in ATTACKS:
        result = attacked["attacks"][f"netns-{k}"]
        assert refused_at_front(result), (k, result.stdout[-2000:])
    log = (attacked["run"] / "front" / "access.log").read_text()
    assert f"{net['ns_ip']} " in log and "/v1/control/start-run" in log
    assert all('" 403 ' in line for line in log.splitlines()
               if line.startswith(net["ns_ip"]) and "/v1/control/" in line)


def test_sigterm_stops_the_front_with_the_superlink(tmp_path):
    """systemd, Kubernetes and compose stop the server with SIGTERM: nginx and the SuperLink
    go with `fedscan server start`, and the hospitals' port closes."""
    port, internal = free_ports(2)
    create_ca(tmp_path / "ca")
    create_server_cert(tmp_path / "ca", ["localhost", "127.0.0.1"], tmp_path / "certs")
    (tmp_path / "server.yaml").write_text(
        f"server: {{host: 127.0.0.1, port: {port}, internal_port: {internal}, "
        "ca_cert: certs/ca.crt, cert: certs/server.pem, key: certs/server.key, "
        "run_dir: run}\nsites: [{name: site-a}, {name: site-b}]\nrounds: 1\n" + TINY_RUN)
    procs = Processes(tmp_path)
    try:
        server = procs.start("server", ["server", "start", "--config", "server.yaml"])
        wait_for("the run to be submitted", lambda: "submitted" in procs.log("server"), 180,
                 procs, ["server"])
        pids = [int((tmp_path / "run" / name).read_text())
                for name in ("superlink.pid", "front/nginx.pid")]
        assert listening_addresses(internal) == ["127.0.0.1"]
        server.terminate()
        assert server.wait(timeout=60) != 0
        time.sleep(1)
        assert not [p for p in pids if alive(p)]
        assert listening_addresses(port) == [] and listening_addresses(internal) == []
        assert "interrupted" in procs.log("server")
    finally:
        procs.stop_all()
