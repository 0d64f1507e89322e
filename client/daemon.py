"""``fedscan client start``: the hospital daemon, a Flower SuperNode that runs until stopped.

The daemon starts ``flower-supernode`` with the site's settings: outbound HTTPS to the
consortium server, verified against the consortium CA, requests signed with the site's private
key (node authentication), and ``--node-config site-config=...`` so the ClientApp finds this
file. It opens no port to the outside (the SuperNode's runtime API listens on 127.0.0.1 only,
for its own ClientApp processes). Flower retries with exponential backoff while the server is
unreachable; if the SuperNode exits anyway (TLS failure, key not registered yet, the server
forgot the node after a crash), the daemon restarts it after a growing pause, so an operator
can register the key or restart the server without anyone touching the hospital.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedscan.client.guard import SITE_CONFIG_ENV
from fedscan.client.site_config import NODE_CONFIG_KEY, SiteSettings, load_site_settings
from fedscan.shared.data import read_dataset
from fedscan.shared.errors import ConfigError, DataError
from fedscan.shared.fab_policy import task_commands, write_shim

#: flower-supernode exit code when its key is not registered on the SuperLink (Flower's 305,
#: which reaches the parent as 305 & 0xFF or 1), and the message it prints then.
EXIT_NODE_NOT_REGISTERED = 305
NOT_ADMITTED = "Failed to activate SuperNode"
#: Pause before restarting an exited SuperNode: doubles from MIN to MAX seconds.
BACKOFF_MIN, BACKOFF_MAX = 2.0, 300.0

INSECURE_WARNING = (
    "fedscan: WARNING: --insecure: plain-text HTTP and no node authentication. Model weights "
    "and metrics travel unencrypted and anyone can pose as this site. Use only on a test "
    "network.")


def flower_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: no telemetry, update checks or runtime installs."""
    env = dict(os.environ)
    env.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"})
    env.update(extra or {})
    return env


def install_guard(state_dir: Path) -> Path:
    """Write the ``flwr-clientapp`` shim (see ``client/guard.py``) and refusing shims for the
    other task programs a SuperExec could start; returns their folder."""
    bin_dir = state_dir / "bin"
    for command in task_commands():
        guarded = command == "flwr-clientapp"
        write_shim(bin_dir / command, sys.executable, "fedscan.client.guard",
                   "main" if guarded else "refuse_task",
                   "Written by `fedscan client start`: " + (
                       "Flower's flwr-clientapp, guarded." if guarded else
                       "this site runs only the fedscan ClientApp."))
    return bin_dir


def supernode_command(settings: SiteSettings, config_path: Path, insecure: bool) -> list[str]:
    """The ``flower-supernode`` command line for a site (Flower 1.41 flags)."""
    cmd = [shutil.which("flower-supernode") or "flower-supernode",
           "--superlink", settings.server,
           "--node-config", f'{NODE_CONFIG_KEY}="{config_path}"',
           "--host", "127.0.0.1", "--port", str(settings.runtime_port)]
    if insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(settings.ca_cert),
                "--auth-supernode-private-key", str(settings.private_key)]
    if settings.max_wait_time is not None:
        cmd += ["--max-wait-time", str(settings.max_wait_time)]
    return cmd


def check_security(settings: SiteSettings, insecure: bool, where: str) -> None:
    """TLS and node authentication unless ``--insecure``: both files must be present."""
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
        return
    for key in ("ca_cert", "private_key"):
        value = getattr(settings, key)
        if not value:
            raise ConfigError(f"{where}: config key '{key}' is required (TLS and node "
                              "authentication are on unless you pass --insecure)")
        if not Path(value).is_file():
            raise ConfigError(f"{where}: config key '{key}': file not found: {value}")


def device_env(device: str) -> dict[str, str]:
    """Pin the ClientApp to the site's device: the server's task config cannot move it."""
    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    if device.startswith("cuda:"):
        return {"CUDA_VISIBLE_DEVICES": device.split(":", 1)[1]}
    return {}


def start_client(config: str | Path, insecure: bool = False, once: bool = False) -> int:
    """Run the hospital daemon until SIGINT/SIGTERM (or, with ``once``, one SuperNode life).

    Returns:
        The exit status: 0 when stopped by a signal.
    """
    config_path = Path(config).expanduser().resolve()
    settings = load_site_settings(config_path)
    check_security(settings, insecure, str(config_path))
    try:  # the folder must hold a valid dataset.json (files are checked by `client check`)
        read_dataset(settings.data, name=settings.name, check=False)
    except DataError as exc:
        raise ConfigError(f"{config_path}: config key 'data': {exc}") from None
    state_dir = Path(str(settings.state_dir))
    state_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = install_guard(state_dir)
    env = flower_env({
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(state_dir / "flwr"),
        SITE_CONFIG_ENV: str(config_path),
        **device_env(settings.device),
    })
    cmd = supernode_command(settings, config_path, insecure)
    stop = {"now": False}
    child: dict[str, subprocess.Popen | None] = {"proc": None}

    def on_signal(signum: int, _frame: object) -> None:
        stop["now"] = True
        proc = child["proc"]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    backoff = BACKOFF_MIN
    try:
        while True:
            print(f"fedscan: site {settings.name}: connecting to {settings.server} "
                  f"(state in {state_dir})", flush=True)
            started = time.monotonic()
            # Own process group, so stopping the daemon also stops SuperExec and ClientApps.
            child["proc"] = subprocess.Popen(cmd, env=env, cwd=state_dir, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, text=True, errors="replace",
                                             start_new_session=True)
            seen: list[str] = []
            echo = threading.Thread(target=_echo, args=(child["proc"], seen), daemon=True)
            echo.start()
            code = child["proc"].wait()
            echo.join(timeout=2)
            if stop["now"]:
                _stop_group(child["proc"])
                return 0
            _stop_group(child["proc"])
            if code == EXIT_NODE_NOT_REGISTERED or any(NOT_ADMITTED in line for line in seen):
                print(f"fedscan: site {settings.name}: the server refused this site's key (not "
                      "registered; ask the operator to run `fedscan server register-site`)",
                      file=sys.stderr, flush=True)
            else:
                print(f"fedscan: site {settings.name}: SuperNode exited with code {code}",
                      file=sys.stderr, flush=True)
            if once:
                return code or 1
            if time.monotonic() - started > 10 * BACKOFF_MAX:
                backoff = BACKOFF_MIN  # it ran for a long time: a fresh failure
            print(f"fedscan: retrying in {backoff:.0f}s", file=sys.stderr, flush=True)
            deadline = time.monotonic() + backoff
            while time.monotonic() < deadline and not stop["now"]:
                time.sleep(0.2)
            if stop["now"]:
                return 0
            backoff = min(backoff * 2, BACKOFF_MAX)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _echo(proc: subprocess.Popen, seen: list[str]) -> None:
    """Forward the SuperNode's output and keep the lines that explain an exit."""
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if NOT_ADMITTED in line:
            seen.append(line)


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop what the SuperNode started (SuperExec, ClientApps): they share its group."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(50):
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
