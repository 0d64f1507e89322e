"""``fedscan server start``: the consortium server on Flower's deployment runtime.

One command starts a SuperLink (TLS, SuperNode authentication, a persistent state database in
the run folder), admits the hospitals whose public keys the config lists, submits the fedscan
app with ``flwr run`` and waits for it; the ServerApp (``fedscan.server.server_app:app``) runs
in the SuperLink's ``flwr-serverapp`` process and writes summary.json, checkpoints, the final
model and the report into the run folder, exactly like ``fedscan simulate``.

Flower's CLI (``flwr run``, ``flwr supernode register``) reads its connections from
``$FLWR_HOME/config.toml``; each run folder gets its own ``.flwr`` home so a run never touches
the operator's ``~/.flwr``.

The app submitted is a generated folder holding only ``pyproject.toml`` (components and run
config, no code): the SuperLink and every hospital import the fedscan **installed** on their
own machine, and the hospitals' guard (``client/guard.py``) accepts such a FAB.
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
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from fedscan.shared.config import Config, from_dict, parse_config, read_yaml
from fedscan.shared.errors import ConfigError, FedscanError

CONNECTION = "fedscan"
#: Node id -> site name of the keys this server admitted (in the run folder).
NODES_FILE = "nodes.json"
INSECURE_WARNING = (
    "fedscan: WARNING: --insecure: the server accepts plain-text HTTP and any node without "
    "authentication. Model weights travel unencrypted and anyone who reaches the port can "
    "join. Use only on a test network.")


@dataclass
class ServerBlock:
    """The ``server:`` block of server.yaml: where the SuperLink listens and its TLS files."""

    host: str = "0.0.0.0"
    port: int = 8000
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    #: The run folder (outputs, state database, logs); relative to server.yaml.
    run_dir: str = "runs/consortium"
    #: SuperLink state database (registered nodes, runs); default ``<run_dir>/state.db``.
    database: str | None = None
    #: How the operator's own CLI reaches the SuperLink (the certificate must name its host).
    control_address: str | None = None
    #: Seconds to wait for the SuperLink to accept connections.
    startup_timeout: float = 60.0
    #: Seconds each round waits for every listed site to be online before it starts with the
    #: sites present (at least ``strategy.min_sites``).
    site_grace: float = 120.0


@dataclass
class ServerSettings:
    """A parsed server.yaml: the deployment block, the federation, the hospitals' keys."""

    path: Path
    server: ServerBlock
    federation: Config
    site_keys: dict[str, str] = field(default_factory=dict)

    @property
    def control_address(self) -> str:
        if self.server.control_address:
            return self.server.control_address
        host = "127.0.0.1" if self.server.host in ("0.0.0.0", "::", "") else self.server.host
        return f"{host}:{self.server.port}"


def load_server_settings(path: str | Path) -> ServerSettings:
    """Read server.yaml: a fedscan run config plus a ``server:`` block.

    Sites are listed by name (their data stays at the hospitals), each optionally with the
    ``public_key`` to admit; relative paths are resolved against the file's folder.
    """
    path = Path(path).expanduser().resolve()
    data = read_yaml(path, "server config")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = path.parent
    try:
        server = from_dict(ServerBlock, data.pop("server", {}) or {}, "server", None)
        keys = {}
        sites = data.get("sites")
        if isinstance(sites, list):
            for i, site in enumerate(sites):
                if isinstance(site, dict):
                    site = dict(site)
                    if site.get("public_key"):
                        keys[str(site.get("name"))] = str(base / site.pop("public_key"))
                    site.pop("public_key", None)
                    site.setdefault("data", "(at the site)")
                    sites[i] = site
        federation = parse_config(data, base=None)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for name in ("ca_cert", "cert", "key", "run_dir", "database"):
        value = getattr(server, name)
        if value is not None:
            setattr(server, name, str((base / Path(value).expanduser()).resolve()))
    # Test sets are the operator's own folders, evaluated on this machine.
    for test_set in federation.test_sets:
        test_set.data = str((base / test_set.data).resolve())
    return ServerSettings(path=path, server=server, federation=federation, site_keys=keys)


# -- Flower CLI plumbing ------------------------------------------------------------------------

def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
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


def superlink_command(settings: ServerSettings, database: Path, insecure: bool) -> list[str]:
    """The ``flower-superlink`` command line (Flower 1.41 flags)."""
    s = settings.server
    cmd = [shutil.which("flower-superlink") or "flower-superlink",
           "--host", s.host, "--port", str(s.port), "--database", str(database),
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
    for entry in done[shown:]:
        dice = entry.get("aggregate", {}).get("dice")
        sites = ", ".join(sorted(entry.get("train", {})))
        rejected = len(entry.get("rejected", []))
        print(f"fedscan: round {entry['round']} done in {entry['seconds']:.0f}s: sites [{sites}]"
              f", Dice {dice if dice is None else round(dice, 4)}"
              + (f", {rejected} repl{'y' if rejected == 1 else 'ies'} rejected"
                 if rejected else ""), flush=True)
    return max(shown, len(done))


def start_server(config: str | Path, insecure: bool = False,
                 resume: str | Path | None = None, keep_running: bool = False) -> dict[str, Any]:
    """Start the SuperLink, run the federation to the end, stop the SuperLink.

    Args:
        config: server.yaml.
        insecure: plain-text HTTP without node authentication (prints a warning).
        resume: a run folder to continue after its last completed round.
        keep_running: leave the SuperLink up after the run (e.g. to inspect it with ``flwr``).

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
    # SIGTERM (systemd, Kubernetes, timeout) unwinds like Ctrl-C, so the SuperLink is stopped.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    flwr_home = run_dir / ".flwr"
    write_connection(flwr_home, settings.control_address, settings.server.ca_cert, insecure)
    database = Path(settings.server.database or run_dir / "state.db")
    log_path = run_dir / "superlink.log"
    with log_path.open("a") as log_file:
        superlink = subprocess.Popen(superlink_command(settings, database, insecure),
                                     stdout=log_file, stderr=subprocess.STDOUT,
                                     env=flower_env(flwr_home), cwd=run_dir,
                                     start_new_session=True)
    (run_dir / "superlink.pid").write_text(str(superlink.pid))
    try:
        _wait_for_port(settings.control_address, superlink, settings.server.startup_timeout,
                       log_path)
        print(f"fedscan: SuperLink listening on {settings.server.host}:{settings.server.port} "
              f"({'INSECURE' if insecure else 'TLS, node authentication'}); log {log_path}",
              flush=True)
        for run in _runs(flwr_home):  # runs of a crashed server would compete for the sites
            if str(run.get("status", "")).split(":")[0] in ("pending", "starting", "running"):
                flwr(["stop", str(run["run-id"])], flwr_home)
                print(f"fedscan: stopped stale run {run['run-id']}", flush=True)
        if not insecure:
            register_keys(settings, flwr_home, settings.site_keys)
        app_dir = write_app(run_dir, settings, resume=bool(resume), insecure=insecure)
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
            if superlink.poll() is not None:
                raise FedscanError(f"flower-superlink exited with code {superlink.returncode}; "
                                   f"see {log_path}")
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
        if not keep_running:
            stop_superlink(superlink)


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
