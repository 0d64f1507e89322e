"""The hospital runs only code it approved: a guarded ``flwr-clientapp``.

Flower's SuperNode runs every message in a ``flwr-clientapp`` process that installs the run's
FAB (the app bundle the server submitted) and imports the ClientApp the FAB names, with the
FAB's folder first on ``sys.path``, so whatever Python the server ships runs inside the
hospital. ``fedscan client start`` puts this module in front of Flower's ``flwr-clientapp`` on
the SuperNode's ``PATH``; it is Flower's own ``flwr-clientapp`` with two seams wrapped:

* FAB installation: the FAB is read from memory first (``shared/fab_policy.py``) and
  1. installed and run as it is only when its sha256 is in the site's ``trusted_fab_hashes``;
  2. otherwise accepted only if it names ``fedscan.client.client_app:app`` and every code file
     it carries is byte-identical to the fedscan installed at the site; it is then **not
     installed at all**;
  3. refused otherwise, before anything is written: the message gets an error reply, the
     run's training at this site does not happen.
* ClientApp loading: returns the **installed** fedscan ClientApp for an approved FAB (the FAB
  folder is never put on ``sys.path``) and refuses a FAB that was not checked first.

Every decision is appended to ``<state_dir>/audit.log``. Flower's own FAB signature check
(``flower-supernode --trusted-entities``) needs FABs signed through the Flower platform, which
a private consortium does not have; a hash allow-list is the local equivalent. The SuperNode's
SuperExec may start other task programs (``flwr-agentapp``, ...): the daemon puts refusing
shims in front of those (:func:`refuse_task`).

A second change keeps exception text at the site: the error replies Flower's runner builds
for failures outside the ClientApp (where fedscan's error mod cannot catch them) carry a
generic code only (:func:`generic_error_factory`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from fedscan.client.audit import audit
from fedscan.shared.fab_policy import FabRefused, foreign_code, read_fab, sha256

APPROVED_CLIENTAPP = "fedscan.client.client_app:app"
#: Environment variable naming site.yaml; set by the daemon, inherited by every ClientApp.
SITE_CONFIG_ENV = "FEDSCAN_SITE_CONFIG"
POLICY_TRUSTED, POLICY_INSTALLED = "trusted-fab-hash", "installed-code"
#: FAB hash -> policy of the FAB checked in this process (one message per process).
_approved: dict[str, str] = {}


def _state_dir() -> str | None:
    try:
        from fedscan.client.site_config import load_site_settings

        return str(load_site_settings(os.environ[SITE_CONFIG_ENV]).state_dir)
    except Exception:  # no policy: log to stderr only
        return None


def _run_id() -> int | None:
    from flwr.supercore.task_identity import TaskIdentity

    try:
        return TaskIdentity.run_id
    except RuntimeError:  # not inside a Flower task (tests)
        return None


def check_clientapp(content: bytes, trusted_hashes: list[str]) -> tuple[str, str | None]:
    """Decide on a FAB's bytes: ``(policy, None)`` when it may run here, else ``("", why)``."""
    try:
        fab = read_fab(content)
    except FabRefused as exc:
        return "", str(exc)
    if sha256(content) in trusted_hashes:
        return POLICY_TRUSTED, None
    ref = fab.components.get("clientapp")
    if ref != APPROVED_CLIENTAPP:
        return "", f"the FAB names ClientApp {ref!r}, not {APPROVED_CLIENTAPP!r}"
    reason = foreign_code(fab)
    return ("", reason) if reason else (POLICY_INSTALLED, None)


def guarded_install(flower_install: Callable) -> Callable:
    """Wrap Flower's ``install_from_fab`` with the site's policy, decided on the FAB's bytes."""
    from flwr.clientapp.client_app import LoadClientAppError

    def install(fab_file: bytes, *args: object, **kwargs: object) -> Path | None:
        content = bytes(fab_file) if not isinstance(fab_file, Path) else fab_file.read_bytes()
        where = {"run_id": _run_id(), "fab_hash": sha256(content)}
        try:
            from fedscan.client.site_config import load_site_settings

            settings = load_site_settings(os.environ[SITE_CONFIG_ENV])
        except Exception as exc:  # fail closed: no policy, no run
            audit(None, "run-refused", reason=f"no site policy ({exc!r})", **where)
            raise LoadClientAppError(f"refused: no site policy ({exc})") from None
        state_dir = settings.state_dir
        policy, reason = check_clientapp(content, list(settings.trusted_fab_hashes))
        if reason:
            audit(state_dir, "run-refused", reason=reason, **where)
            raise LoadClientAppError(f"refused by site policy: {reason}")
        _approved[where["fab_hash"]] = policy
        if policy == POLICY_TRUSTED:
            audit(state_dir, "run-accepted", policy=policy, **where)
            return flower_install(fab_file, *args, **kwargs)
        from fedscan.client import client_app

        audit(state_dir, "run-accepted", policy=policy,
              code=str(Path(client_app.__file__).parent), **where)
        return None  # the installed fedscan runs; nothing of the FAB is written

    return install


def approved_loader_factory(flower_factory: Callable) -> Callable:
    """Wrap Flower's ``get_load_client_app_fn``: load only what :func:`guarded_install`
    approved, the installed ClientApp unless the FAB's hash is trusted."""
    from flwr.clientapp.client_app import ClientApp, LoadClientAppError

    def factory(default_app_ref: str, app_path: str | None, multi_app: bool) -> Callable:
        flower_load = flower_factory(default_app_ref, app_path, multi_app)

        def load(fab_id: str, fab_version: str, fab_hash: str) -> ClientApp:
            policy = _approved.get(fab_hash)
            if policy is None:
                audit(_state_dir(), "run-refused", run_id=_run_id(), fab_hash=fab_hash,
                      reason="the FAB was not checked before installation")
                raise LoadClientAppError("refused: the FAB was not checked before installation")
            if policy == POLICY_TRUSTED:
                return flower_load(fab_id, fab_version, fab_hash)
            from fedscan.client import client_app

            return client_app.app

        return load

    return factory


def generic_error_factory(error_cls: Callable) -> Callable:
    """Wrap Flower's ``Error`` as ``flwr-clientapp``'s runner uses it: no exception text.

    The runner replies ``str(type(ex)) + str(ex)`` for any exception outside the ClientApp's
    handlers (installing the FAB, an unknown message type), where fedscan's error mod cannot
    catch it; such text can name the site's folders. With this wrapper the reason is a
    fedscan code when it already is one, nothing for Flower's fixed "could not load the
    ClientApp" case (the server names it by its error code), else ``internal-error``. The
    full error stays in the SuperNode's log at the site.
    """
    from flwr.common.constant import ErrorCode

    from fedscan.shared.error_codes import SITE_ERRORS

    def make(code: int, reason: str | None = None) -> object:
        if code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION:
            reason = None
        elif reason not in SITE_ERRORS:
            reason = "internal-error"
        return error_cls(code=code, reason=reason)

    return make


def patch_runner(runtime: ModuleType) -> None:
    """Put the site's policy into Flower's ClientApp runner
    (``flwr.supernode.runtime.run_clientapp``): FAB installation, ClientApp loading, and
    text-free error replies."""
    runtime.install_from_fab = guarded_install(runtime.install_from_fab)
    runtime.get_load_client_app_fn = approved_loader_factory(runtime.get_load_client_app_fn)
    runtime.Error = generic_error_factory(runtime.Error)


def main() -> None:
    """Entry point of the ``flwr-clientapp`` shim that ``fedscan client start`` installs."""
    import importlib

    from flwr.supernode.cli import flwr_clientapp  # the function behind `flwr-clientapp`

    patch_runner(importlib.import_module("flwr.supernode.runtime.run_clientapp"))
    flwr_clientapp()


def refuse_task() -> None:
    """Entry point of the shims for every other task program the SuperExec could start."""
    command = Path(sys.argv[0]).name
    audit(_state_dir(), "task-refused", command=command,
          reason=f"this site runs only the fedscan ClientApp, not {command}")
    raise SystemExit(1)


if __name__ == "__main__":
    main()
