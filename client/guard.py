"""The hospital runs only code it approved: a guarded ``flwr-clientapp``.

Flower's SuperNode runs every message in a ``flwr-clientapp`` process that installs the run's
FAB (the app bundle the server submitted) and imports the ClientApp the FAB names, with the
FAB's folder first on ``sys.path``, so whatever Python the server ships runs inside the
hospital. ``fedscan client start`` puts this module in front of Flower's ``flwr-clientapp`` on
the SuperNode's ``PATH``; it is Flower's own ``flwr-clientapp`` with one change, the ClientApp
loader, which:

1. runs the FAB's own code only when its sha256 is in the site's ``trusted_fab_hashes``;
2. otherwise accepts the run only if the FAB names ``fedscan.client.client_app:app`` and every
   ``.py`` file it carries is byte-identical to the fedscan installed at the site, and then
   imports the **installed** ClientApp (the FAB folder is never put on ``sys.path``);
3. refuses anything else: the message gets an error reply, the run's training at this site
   does not happen, and the decision is appended to ``<state_dir>/audit.log``.

A second change keeps exception text at the site: the error replies Flower's runner builds
for failures outside the ClientApp (where fedscan's error mod cannot catch them) carry a
generic code only (:func:`generic_error_factory`).

Flower's own FAB signature check (``flower-supernode --trusted-entities``) needs FABs signed
through the Flower platform, which a private consortium does not have; a hash allow-list is
the local equivalent.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from fedscan.client.audit import audit

APPROVED_CLIENTAPP = "fedscan.client.client_app:app"
#: Environment variable naming site.yaml; set by the daemon, inherited by every ClientApp.
SITE_CONFIG_ENV = "FEDSCAN_SITE_CONFIG"
#: Source folders of the fedscan distribution (pyproject ``package-dir``) -> package names.
PACKAGE_DIRS = {"fedscan": "fedscan", "server": "fedscan.server", "client": "fedscan.client",
                "shared": "fedscan.shared", "simulations": "fedscan.simulations"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def installed_file(rel: str) -> Path | None:
    """The installed fedscan file a FAB path (``client/client_app.py``) corresponds to."""
    parts = Path(rel).with_suffix("").parts
    if not parts or parts[0] not in PACKAGE_DIRS:
        return None
    rest = [p for p in parts[1:] if p != "__init__"]
    module = ".".join([PACKAGE_DIRS[parts[0]], *rest])
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin else None


def check_fab_dir(app_dir: Path, clientapp_ref: str) -> str | None:
    """Why the installed FAB in ``app_dir`` may not run here; None when it may."""
    if clientapp_ref != APPROVED_CLIENTAPP:
        return f"the FAB names ClientApp {clientapp_ref!r}, not {APPROVED_CLIENTAPP!r}"
    for path in sorted(app_dir.rglob("*")):
        if not path.is_file() or path.suffix not in (".py", ".pyc", ".pth", ".so"):
            continue
        rel = path.relative_to(app_dir).as_posix()
        local = installed_file(rel)
        if local is None or not local.is_file():
            return f"the FAB carries code that is not installed at this site: {rel}"
        if _sha256(local) != _sha256(path):
            return f"the FAB's {rel} differs from the installed fedscan ({local})"
    return None


def approved_loader_factory(flower_factory: Callable) -> Callable:
    """Wrap Flower's ``get_load_client_app_fn`` with the site's policy."""
    import tomli  # a Flower dependency; tomllib needs Python 3.11
    from flwr.clientapp.client_app import ClientApp, LoadClientAppError
    from flwr.common.config import get_project_dir
    from flwr.supercore.task_identity import TaskIdentity

    def factory(default_app_ref: str, app_path: str | None, multi_app: bool) -> Callable:
        flower_load = flower_factory(default_app_ref, app_path, multi_app)

        def load(fab_id: str, fab_version: str, fab_hash: str) -> ClientApp:
            try:
                run_id: int | None = TaskIdentity.run_id
            except RuntimeError:  # not inside a Flower task (tests)
                run_id = None
            where = {"run_id": run_id, "fab_id": fab_id, "fab_version": fab_version,
                     "fab_hash": fab_hash}
            state_dir = None
            try:
                from fedscan.client.site_config import load_site_settings

                settings = load_site_settings(os.environ[SITE_CONFIG_ENV])
                state_dir = settings.state_dir
            except Exception as exc:  # fail closed: no policy, no run
                audit(None, "run-refused", reason=f"no site policy ({exc!r})", **where)
                raise LoadClientAppError(f"refused: no site policy ({exc})") from None
            if fab_hash in settings.trusted_fab_hashes:
                audit(state_dir, "run-accepted", policy="trusted-fab-hash", **where)
                return flower_load(fab_id, fab_version, fab_hash)
            app_dir = get_project_dir(fab_id, fab_version, fab_hash)
            try:
                config = tomli.loads((app_dir / "pyproject.toml").read_text())
                ref = config["tool"]["flwr"]["app"]["components"]["clientapp"]
            except (KeyError, OSError, ValueError) as exc:
                ref = f"<unreadable: {exc!r}>"
            reason = check_fab_dir(app_dir, str(ref))
            if reason:
                audit(state_dir, "run-refused", reason=reason, **where)
                raise LoadClientAppError(f"refused by site policy: {reason}")
            from fedscan.client import client_app

            if Path(client_app.__file__).resolve().is_relative_to(app_dir.resolve()):
                raise LoadClientAppError("refused: ClientApp resolved inside the FAB")
            audit(state_dir, "run-accepted", policy="installed-code",
                  code=str(Path(client_app.__file__).parent), **where)
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


def patch_runner(run_clientapp: ModuleType) -> None:
    """Put the site's loader and the text-free error replies into Flower's ClientApp runner
    (``flwr.supernode.runtime.run_clientapp``)."""
    run_clientapp.get_load_client_app_fn = approved_loader_factory(
        run_clientapp.get_load_client_app_fn)
    run_clientapp.Error = generic_error_factory(run_clientapp.Error)


def main() -> None:
    """Entry point of the ``flwr-clientapp`` shim that ``fedscan client start`` installs."""
    from flwr.supernode.cli import flwr_clientapp  # the function behind `flwr-clientapp`
    from flwr.supernode.runtime import run_clientapp

    patch_runner(run_clientapp)
    flwr_clientapp()


if __name__ == "__main__":
    main()
