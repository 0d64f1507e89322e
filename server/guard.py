"""The server runs only the installed fedscan ServerApp: a guarded ``flwr-serverapp``.

The SuperLink's SuperExec starts ``flwr-serverapp`` by name from ``PATH`` for every run; Flower's
own one installs the run's FAB and imports the ServerApp it names with the FAB's folder first
on ``sys.path``. Only the TLS front keeps outsiders away from the Control API; this guard is
the second wall (defence in depth): ``fedscan server start`` puts it first on the SuperLink's
``PATH``, and for each run it

1. reads the FAB from memory before Flower installs anything (``shared/fab_policy.py``) and
   refuses it unless it holds nothing but ``pyproject.toml`` and that file is, parsed, the one
   ``fedscan server start`` generated for this run folder (its canonical hash is handed to the
   SuperLink in ``FEDSCAN_APPROVED_APP``), naming ``fedscan.server.server_app:app``;
2. refuses a run whose run config differs from the generated one (``flwr run --run-config``
   overrides could point the ServerApp at another config or folder);
3. runs the **installed** fedscan ServerApp (the FAB folder never goes on ``sys.path``).

Every decision (run id, FAB hash, reason) is appended to ``RUN_DIR/audit.log``. Shims for the
other task programs a SuperExec can start (``flwr-agentapp``, ``flwr-simulation``, ...) refuse
and log. Without the environment ``fedscan server start`` sets, everything is refused.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedscan.shared.fab_policy import (
    FabContents,
    FabRefused,
    audit,
    canonical_hash,
    read_fab,
    sha256,
    task_commands,
    write_shim,
)

APPROVED_SERVERAPP = "fedscan.server.server_app:app"
#: Environment of the SuperLink (inherited by SuperExec and every task it starts).
RUN_DIR_ENV = "FEDSCAN_RUN_DIR"
APPROVED_APP_ENV = "FEDSCAN_APPROVED_APP"
AUDIT_LOG = "audit.log"
#: The FAB this process accepted (one run per ``flwr-serverapp`` process).
_accepted: dict[str, FabContents] = {}


def approved_app_hash(app_dir: Path) -> str:
    """The canonical hash of a generated app's pyproject.toml (what the guard accepts)."""
    import tomli

    return canonical_hash(tomli.loads((app_dir / "pyproject.toml").read_text()))


def install_guard(run_dir: Path) -> Path:
    """Write ``RUN_DIR/bin``: the guarded ``flwr-serverapp`` and refusing shims for the other
    task programs; returns the folder to put first on the SuperLink's ``PATH``."""
    bin_dir = run_dir / "bin"
    for command in task_commands():
        guarded = command == "flwr-serverapp"
        write_shim(bin_dir / command, sys.executable, "fedscan.server.guard",
                   "main" if guarded else "refuse_task",
                   "Written by `fedscan server start`: " + (
                       "Flower's flwr-serverapp, guarded." if guarded else
                       "this server runs only the fedscan ServerApp."))
    return bin_dir


def _audit_log() -> Path | None:
    run_dir = os.environ.get(RUN_DIR_ENV)
    return Path(run_dir) / AUDIT_LOG if run_dir else None


def _run_id() -> int | None:
    from flwr.supercore.task_identity import TaskIdentity

    try:
        return TaskIdentity.run_id
    except RuntimeError:  # not inside a Flower task (tests)
        return None


def check_serverapp(content: bytes, approved_hash: str | None) -> tuple[FabContents | None,
                                                                        str | None]:
    """Decide on a FAB's bytes: ``(fab, None)`` when it may run, else ``(None, why)``."""
    if not approved_hash:
        return None, (f"no approved app ({APPROVED_APP_ENV} unset: not started by `fedscan "
                      "server start`)")
    try:
        fab = read_fab(content)
    except FabRefused as exc:
        return None, str(exc)
    others = sorted(set(fab.files) - {"pyproject.toml"})
    if others:
        code = fab.code_files
        return None, (f"the FAB carries code: {', '.join(code[:5])}" if code else
                      f"the FAB carries files other than pyproject.toml: {', '.join(others[:5])}")
    ref = fab.components.get("serverapp")
    if ref != APPROVED_SERVERAPP or set(fab.components) - {"serverapp", "clientapp"}:
        return None, (f"the FAB names components {fab.components!r}, not ServerApp "
                      f"{APPROVED_SERVERAPP!r}")
    if canonical_hash(fab.pyproject) != approved_hash:
        return None, "the FAB is not the app `fedscan server start` generated for this run folder"
    return fab, None


def guarded_install(flower_install: Callable) -> Callable:
    """Wrap Flower's ``install_from_fab``: decide on the FAB's bytes, install only if approved."""
    from flwr.serverapp.server_app import LoadServerAppError

    def install(fab_file: bytes, *args: object, **kwargs: object) -> Path:
        content = bytes(fab_file) if not isinstance(fab_file, Path) else fab_file.read_bytes()
        digest = sha256(content)
        fab, reason = check_serverapp(content, os.environ.get(APPROVED_APP_ENV))
        if fab is None:
            audit(_audit_log(), "run-refused", "fedscan-server-guard", run_id=_run_id(),
                  fab_hash=digest, reason=reason)
            raise LoadServerAppError(f"refused by the server's policy: {reason}")
        _accepted[digest] = fab
        return flower_install(fab_file, *args, **kwargs)

    return install


def guarded_run(flower_run: Callable) -> Callable:
    """Wrap Flower's ServerApp runner: the approved FAB's run config, the installed app."""
    from flwr.common.config import flatten_dict
    from flwr.serverapp.server_app import LoadServerAppError

    def run(grid: Any, context: Any, server_app_dir: str, server_app_attr: str | None = None,
            loaded_server_app: Any = None) -> Any:
        where = {"run_id": _run_id(), "fab_hash": next(iter(_accepted), None)}
        reason = None
        if len(_accepted) != 1:
            reason = "the FAB was not checked before installation"
        elif server_app_attr != APPROVED_SERVERAPP or loaded_server_app is not None:
            reason = f"Flower asked to load {server_app_attr!r}"
        elif dict(context.run_config) != flatten_dict(next(iter(_accepted.values())).run_config):
            reason = "the run config was overridden (flwr run --run-config)"
        if reason:
            audit(_audit_log(), "run-refused", "fedscan-server-guard", reason=reason, **where)
            raise LoadServerAppError(f"refused by the server's policy: {reason}")
        from fedscan.server import server_app

        audit(_audit_log(), "run-accepted", "fedscan-server-guard", policy="installed-code",
              code=str(Path(server_app.__file__).parent), **where)
        return flower_run(grid=grid, context=context, server_app_dir=server_app_dir,
                          loaded_server_app=server_app.app)

    return run


def main() -> None:
    """Entry point of the ``flwr-serverapp`` shim that ``fedscan server start`` installs."""
    import importlib

    from flwr.superlink.cli import flwr_serverapp  # the function behind `flwr-serverapp`

    runtime = importlib.import_module("flwr.superlink.runtime.run_serverapp")
    runtime.install_from_fab = guarded_install(runtime.install_from_fab)
    runtime.run_ = guarded_run(runtime.run_)
    flwr_serverapp()


def refuse_task() -> None:
    """Entry point of the shims for every other task program the SuperExec could start."""
    command = Path(sys.argv[0]).name
    audit(_audit_log(), "task-refused", "fedscan-server-guard", command=command,
          reason=f"this server runs only the fedscan ServerApp, not {command}")
    raise SystemExit(1)


if __name__ == "__main__":
    main()
