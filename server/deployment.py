"""``fedscan server start``: the consortium server on Flower's deployment runtime.

One command starts a SuperLink (TLS, SuperNode authentication, a persistent state database in
the run folder), admits the hospitals whose public keys the config lists, submits the fedscan
app with ``flwr run`` and waits for it; the ServerApp (``fedscan.server.server_app:app``) runs
in the SuperLink's ``flwr-serverapp`` process and writes summary.json, checkpoints, the final
model and the report into the run folder, exactly like ``fedscan simulate``.

Flower's CLI (``flwr run``, ``flwr supernode register``) reads its connections from
``$FLWR_HOME/config.toml``; each run folder gets its own ``.flwr`` home so a run never touches
the operator's ``~/.flwr``.

Only the Fleet API faces the network: the SuperLink listens on 127.0.0.1 (an internal port,
where the operator's ``flwr`` CLI reaches it) behind nginx, which terminates TLS on
``server.host:server.port`` and forwards nothing but ``/v1/fleet/*`` (``server/front.py``).

The app submitted is a generated folder holding only ``pyproject.toml`` (components and run
config, no code): the SuperLink and every hospital import the fedscan **installed** on their
own machine. The server's guard (``server/guard.py``, first on the SuperLink's ``PATH``) runs
only that app; the hospitals' guard (``client/guard.py``) accepts such a FAB.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from fedscan.server import front, guard
from fedscan.server.settings import NODES_FILE, ServerSettings, load_server_settings
from fedscan.shared.certs import certificate_summary, private_keys_of
from fedscan.shared.errors import ConfigError, FedscanError

CONNECTION = "fedscan"
#: Environment switches that would make the SuperLink open extra (gRPC) ports.
FLOWER_EXTRA_PORT_SWITCHES = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")
INSECURE_WARNING = (
    "fedscan: WARNING: --insecure: the server accepts plain-text HTTP and any node without "
    "authentication. Model weights travel unencrypted and anyone who reaches the port can "
    "join. Use only on a test network.")


# -- Flower CLI plumbing ------------------------------------------------------------------------

def flower_env(flwr_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in FLOWER_EXTRA_PORT_SWITCHES}
    env.update({"FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"})
    return env


def write_connection(flwr_home: Path, address: str, ca_cert: str | None, insecure: bool) -> None:
    """``$FLWR_HOME/config.toml`` with one connection, ``fedscan``, to this SuperLink."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    tls = "insecure = true" if insecure else f'root-certificates = "{ca_cert}"'
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{address}"\n{tls}\n')


def flwr(args: list[str], flwr_home: Path, timeout: float = 120) -> dict[str, Any]:
    """Run a ``flwr`` CLI command with ``--format json``; returns its JSON answer."""
    exe = shutil.which("flwr") or "flwr"
    proc = subprocess.run([exe, *args, CONNECTION, "--format", "json"], capture_output=True,
                          text=True, env=flower_env(flwr_home), timeout=timeout)
    try:
        return json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        return {"success": False,
                "error-message": (proc.stdout + proc.stderr).strip()[-2000:] or
                f"flwr {' '.join(args)} exited with {proc.returncode}"}


def superlink_command(settings: ServerSettings, database: Path, insecure: bool,
                      internal_port: int) -> list[str]:
    """The ``flower-superlink`` command line (Flower 1.41 flags), bound to loopback."""
    s = settings.server
    cmd = [shutil.which("flower-superlink") or "flower-superlink",
           "--host", "127.0.0.1", "--port", str(internal_port), "--database", str(database),
           "--disable-runtime-dependency-installation"]
    if insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(s.ca_cert), "--ssl-certfile", str(s.cert),
                "--ssl-keyfile", str(s.key), "--enable-supernode-auth"]
    return cmd


def _wait_for_port(address: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-1500:] if log.is_file() else ""
            raise FedscanError(f"flower-superlink exited with code {proc.returncode}; see "
                               f"{log}\n{tail}")
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise FedscanError(f"flower-superlink did not listen on {address} within {timeout:.0f}s")


def check_security(settings: ServerSettings, insecure: bool) -> None:
    """TLS files present, the CA key out of the server's reach, loopback names in the cert."""
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
        return
    for key in ("ca_cert", "cert", "key"):
        value = getattr(settings.server, key)
        if not value:
            raise ConfigError(f"{settings.path}: config key 'server.{key}' is required (TLS and "
                              "node authentication are on unless you pass --insecure)")
        if not Path(value).is_file():
            raise ConfigError(f"{settings.path}: config key 'server.{key}': file not found: "
                              f"{value}")
    s = settings.server
    folders = {Path(str(p)).parent for p in (s.ca_cert, s.cert, s.key)}
    leaked = private_keys_of(str(s.ca_cert), sorted(folders))
    if leaked:
        raise ConfigError(f"{settings.path}: the CA private key {leaked[0]} sits among the "
                          "server's TLS files; move it offline (the server must never be able "
                          "to read it: `fedscan certs server --out` writes the server's files "
                          "to their own folder)")
    names = set(certificate_summary(str(s.cert))["sans"])
    missing = [n for n in ("localhost", "127.0.0.1") if n not in names]
    if missing:
        raise ConfigError(f"{settings.path}: config key 'server.cert': the certificate does not "
                          f"name {', '.join(missing)} (the front and the operator's CLI reach "
                          "the SuperLink on loopback); reissue it with `fedscan certs server`")


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def register_keys(settings: ServerSettings, flwr_home: Path, keys: dict[str, str]) -> None:
    """Admit hospitals' public keys (``flwr supernode register``); already known ones are OK.

    New node ids are added to ``<run_dir>/nodes.json`` (next to ``flwr_home``), so the
    ServerApp can name a site that never answered.
    """
    nodes_path = flwr_home.parent / NODES_FILE
    nodes = json.loads(nodes_path.read_text()) if nodes_path.is_file() else {}
    for name, key in keys.items():
        if not Path(key).is_file():
            raise ConfigError(f"{settings.path}: public key of site {name!r} not found: {key}")
        answer = flwr(["supernode", "register", key, "--name", name], flwr_home)
        message = str(answer.get("error-message", ""))
        if answer.get("success"):
            print(f"fedscan: admitted site {name} (node {answer.get('node-id')})", flush=True)
            nodes[str(answer.get("node-id"))] = name
            nodes_path.write_text(json.dumps(nodes, indent=2))
        elif "already in use" in message:
            print(f"fedscan: site {name} was admitted before", flush=True)
        else:
            raise FedscanError(f"could not register the key of site {name}: {message}")


def write_app(run_dir: Path, settings: ServerSettings, resume: bool,
              insecure: bool = False) -> Path:
    """The Flower app submitted to the SuperLink: only a pyproject.toml, no code."""
    try:
        app_version = version("fedscan")
    except PackageNotFoundError:
        app_version = "0.0.0"
    app_dir = run_dir / "app"
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(f'''# Generated by `fedscan server start`.
# No code: the components name the fedscan installed on each machine.
[project]
name = "fedscan"
version = "{app_version}"
description = "fedscan federated run (code is the fedscan installed at each site)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedscan"

[tool.flwr.app.components]
serverapp = "fedscan.server.server_app:app"
clientapp = "fedscan.client.client_app:app"

[tool.flwr.app.config]
server-config = "{settings.path}"
run-dir = "{run_dir}"
resume = {"true" if resume else "false"}
insecure = {"true" if insecure else "false"}
''')
    return app_dir


def _runs(flwr_home: Path) -> list[dict[str, Any]]:
    answer = flwr(["ls"], flwr_home)
    return list(answer.get("runs", [])) if answer.get("success") else []


def _progress(run_dir: Path, shown: int) -> int:
    """Print rounds completed since the last call; returns how many are shown now."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return shown
    done = [r for r in summary.get("rounds", []) if r.get("seconds") is not None]
    metric = (summary.get("final") or {}).get("headline")  # the task's main metric
    for entry in done[shown:]:
        value = entry.get("aggregate", {}).get(metric)
        sites = ", ".join(sorted(entry.get("train", {})))
        rejected = len(entry.get("rejected", []))
        print(f"fedscan: round {entry['round']} done in {entry['seconds']:.0f}s: sites [{sites}]"
              f", {metric} {value if value is None else round(value, 4)}"
              + (f", {rejected} repl{'y' if rejected == 1 else 'ies'} rejected"
                 if rejected else ""), flush=True)
    return max(shown, len(done))


def start_server(config: str | Path, insecure: bool = False,
                 resume: str | Path | None = None, keep_running: bool = False) -> dict[str, Any]:
    """Start the SuperLink and its TLS front, run the federation to the end, stop both.

    Args:
        config: server.yaml.
        insecure: plain-text HTTP without node authentication (prints a warning).
        resume: a run folder to continue after its last completed round.
        keep_running: leave the SuperLink and the front up after the run (e.g. to inspect it
            with ``flwr``).

    Returns:
        The run's summary.json content.
    """
    from fedscan.server.rounds import load_resume_point

    settings = load_server_settings(config)
    cfg = settings.federation
    run_dir = Path(resume).resolve() if resume else Path(settings.server.run_dir)
    if resume:
        # Lenient, so a supervisor (systemd, Kubernetes, compose) can always pass --resume.
        point = load_resume_point(run_dir)
        print(f"fedscan: resuming {run_dir} after round {point[0]} of {cfg.rounds}"
              if point else f"fedscan: --resume {run_dir}: no completed round yet, starting "
              "at round 1", flush=True)
    elif load_resume_point(run_dir) is not None:
        raise FedscanError(f"{run_dir} already holds completed rounds: continue it with "
                           f"--resume {run_dir}, or set server.run_dir to a new folder")
    check_security(settings, insecure)
    front.find_nginx()  # before anything starts: a missing front is a one-line error
    # SIGTERM (systemd, Kubernetes, timeout) unwinds like Ctrl-C, so both are stopped.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    run_dir.mkdir(parents=True, exist_ok=True)
    front_dir = run_dir / "front"
    # A crashed `fedscan server start` may have left its SuperLink or front running.
    for pid_file, program in ((run_dir / "superlink.pid", "flower-superlink"),
                              (front_dir / "nginx.pid", "nginx")):
        if front.stop_stale(pid_file, program):
            print(f"fedscan: stopped the {program} a previous server left running", flush=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    app_dir = write_app(run_dir, settings, resume=bool(resume), insecure=insecure)
    s = settings.server
    internal_port = s.internal_port or free_loopback_port()
    control_address = f"127.0.0.1:{internal_port}"
    flwr_home = run_dir / ".flwr"
    write_connection(flwr_home, control_address, s.ca_cert, insecure)
    database = Path(s.database or run_dir / "state.db")
    log_path = run_dir / "superlink.log"
    env = flower_env(flwr_home)
    env.update({"PATH": f"{guard.install_guard(run_dir)}{os.pathsep}{env.get('PATH', '')}",
                guard.RUN_DIR_ENV: str(run_dir),
                guard.APPROVED_APP_ENV: guard.approved_app_hash(app_dir)})
    with log_path.open("a") as log_file:
        superlink = subprocess.Popen(superlink_command(settings, database, insecure,
                                                       internal_port),
                                     stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                     cwd=run_dir, start_new_session=True,
                                     preexec_fn=front.child_setup(not keep_running))
    (run_dir / "superlink.pid").write_text(str(superlink.pid))
    nginx: subprocess.Popen | None = None
    page = None
    try:
        _wait_for_port(control_address, superlink, s.startup_timeout, log_path)
        front_dir.mkdir(exist_ok=True)
        tls = None if insecure else (str(s.ca_cert), str(s.cert), str(s.key))
        nginx = front.start_front(front_dir, s.host, s.port, internal_port, tls,
                                  bound_to_parent=not keep_running)
        print(f"fedscan: listening on {front.listen_address(s.host, s.port)} for the sites "
              f"({'INSECURE' if insecure else 'TLS, node authentication'}; Fleet API only); "
              f"SuperLink on {control_address} (operator only); logs {log_path}, "
              f"{front_dir}/access.log", flush=True)
        page = _start_status_page(settings, run_dir, insecure)
        for run in _runs(flwr_home):  # runs of a crashed server would compete for the sites
            if str(run.get("status", "")).split(":")[0] in ("pending", "starting", "running"):
                flwr(["stop", str(run["run-id"])], flwr_home)
                print(f"fedscan: stopped stale run {run['run-id']}", flush=True)
        if not insecure:
            register_keys(settings, flwr_home, settings.site_keys)
        answer = flwr(["run", str(app_dir)], flwr_home)
        if not answer.get("success"):
            raise FedscanError(f"flwr run failed: {answer.get('error-message')}")
        run_id = answer["run-id"]
        with (run_dir / "run_ids.txt").open("a") as f:
            f.write(f"{run_id}\n")
        need = cfg.strategy.min_sites or len(cfg.sites)
        print(f"fedscan: run {run_id} submitted; waiting for {need} of {len(cfg.sites)} sites; "
              f"{cfg.rounds} rounds", flush=True)
        status, shown = "", 0
        while True:
            time.sleep(2)
            shown = _progress(run_dir, shown)
            for name, proc in (("flower-superlink", superlink), ("nginx", nginx)):
                if proc.poll() is not None:
                    raise FedscanError(f"{name} exited with code {proc.returncode}; see "
                                       f"{log_path if proc is superlink else front_dir}")
            runs = [r for r in _runs(flwr_home) if str(r.get("run-id")) == str(run_id)]
            status = str(runs[0].get("status", "")) if runs else ""
            if status.startswith("finished"):
                break
        _progress(run_dir, shown)
        if status != "finished:completed":
            raise FedscanError(f"run {run_id} ended as {status}; see {log_path}")
        summary = json.loads((run_dir / "summary.json").read_text())
        print(f"fedscan: run complete: {run_dir}/summary.json, report.md, final_model.pt",
              flush=True)
        return summary
    finally:
        if page is not None:
            page.stop()
        if not keep_running:
            if nginx is not None:
                front.stop_process(nginx)
            stop_superlink(superlink)


def _start_status_page(settings: ServerSettings, run_dir: Path, insecure: bool) -> Any:
    """The status page over ``run_dir`` when ``server.status_port`` is set, else None."""
    block = settings.server
    if block.status_port is None:
        return None
    from fedscan.shared.status.serve import StatusOptions, is_loopback, start_status

    tls = not insecure and not is_loopback(block.status_host)
    return start_status(run_dir, StatusOptions(
        host=block.status_host, port=block.status_port,
        certfile=block.cert if tls else None, keyfile=block.key if tls else None))


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def stop_superlink(proc: subprocess.Popen) -> None:
    """Stop the SuperLink and what it started (SuperExec, ServerApp): one process group."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def register_site(config: str | Path, key: str | Path, name: str | None = None,
                  run_dir: str | Path | None = None) -> None:
    """Admit one hospital's public key on the running SuperLink of ``config``."""
    settings = load_server_settings(config)
    folder = Path(run_dir).resolve() if run_dir else Path(settings.server.run_dir)
    flwr_home = folder / ".flwr"
    if not (flwr_home / "config.toml").is_file():
        raise FedscanError(f"{folder}: no server started here (start it with `fedscan server "
                           "start`)")
    key = Path(key).resolve()
    register_keys(settings, flwr_home, {name or key.stem: str(key)})
