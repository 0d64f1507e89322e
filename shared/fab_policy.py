"""What the server's and the hospitals' guards check in a FAB, on its bytes, before Flower
installs it.

Flower's ``flwr-serverapp`` and ``flwr-clientapp`` install the run's FAB (the app bundle
submitted with ``flwr run``) into ``$FLWR_HOME/apps/`` and then import the component it names,
with the FAB's folder first on ``sys.path``. Flower builds that folder's name from the FAB's
``project.version`` without checking it, so a version with ``/..`` segments writes files
outside ``$FLWR_HOME`` during installation, before any loader-level check could run. Both
guards therefore read the FAB from memory first (:func:`read_fab`) and decide on what it
carries; a refused FAB never reaches the disk.

Used by ``server/guard.py`` (the consortium server) and ``client/guard.py`` (each hospital).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import re
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

#: Source folders of the fedscan distribution (pyproject ``package-dir``) -> package names.
PACKAGE_DIRS = {"fedscan": "fedscan", "server": "fedscan.server", "client": "fedscan.client",
                "shared": "fedscan.shared", "simulations": "fedscan.simulations"}
#: Files Python could execute from a FAB folder.
CODE_SUFFIXES = (".py", ".pyc", ".pth", ".so")
#: Flower caps a FAB at 10 MB; a FAB expanding beyond this is refused unread (zip bomb).
MAX_UNPACKED_BYTES = 64 * 2**20
#: Publisher, name and version end up in a folder name: no path separators, no "..".
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+!-]{0,127}$")


class FabRefused(Exception):
    """A FAB the guard will not install or run; the message says why."""


@dataclass
class FabContents:
    """A FAB read from memory: its files (``.info/`` excluded) and parsed pyproject."""

    files: dict[str, bytes]
    pyproject: dict[str, Any]

    @property
    def components(self) -> dict[str, Any]:
        return dict(self.pyproject.get("tool", {}).get("flwr", {}).get("app", {})
                    .get("components", {}))

    @property
    def run_config(self) -> dict[str, Any]:
        return dict(self.pyproject.get("tool", {}).get("flwr", {}).get("app", {})
                    .get("config", {}))

    @property
    def code_files(self) -> list[str]:
        return sorted(p for p in self.files if p.endswith(CODE_SUFFIXES))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_hash(document: dict[str, Any]) -> str:
    """sha256 of a parsed TOML document, independent of formatting and comments.

    Flower re-serialises pyproject.toml when it builds a FAB, so the guard compares parsed
    content, not bytes.
    """
    return sha256(json.dumps(document, sort_keys=True, default=str).encode())


def read_fab(content: bytes) -> FabContents:
    """Open a FAB in memory and check what Flower would trust without checking.

    Raises:
        FabRefused: not a zip, unsafe member paths, too large unpacked, no readable
            pyproject.toml, or a publisher/name/version that is not a plain folder-name part.
    """
    import tomli  # a Flower dependency; tomllib needs Python 3.11

    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
        members = archive.infolist()
    except (zipfile.BadZipFile, ValueError) as exc:
        raise FabRefused(f"not a FAB (zip): {exc}") from None
    if sum(m.file_size for m in members) > MAX_UNPACKED_BYTES:
        raise FabRefused(f"the FAB unpacks to more than {MAX_UNPACKED_BYTES} bytes")
    files: dict[str, bytes] = {}
    for member in members:
        name = PurePosixPath(member.filename)
        if name.is_absolute() or ".." in name.parts or "\\" in member.filename:
            raise FabRefused(f"unsafe path in the FAB: {member.filename!r}")
        if member.is_dir() or name.parts[:1] == (".info",):
            continue
        files[name.as_posix()] = archive.read(member)
    try:
        pyproject = tomli.loads(files["pyproject.toml"].decode())
        app = pyproject["tool"]["flwr"]["app"]
        parts = {"publisher": app["publisher"], "name": pyproject["project"]["name"],
                 "version": pyproject["project"]["version"]}
    except (KeyError, TypeError, UnicodeDecodeError, tomli.TOMLDecodeError) as exc:
        raise FabRefused(f"the FAB has no readable pyproject.toml ({exc!r})") from None
    for key, value in parts.items():
        if not isinstance(value, str) or not SAFE_NAME.match(value) or ".." in value:
            raise FabRefused(f"the FAB's {key} {value!r} is not a plain name (Flower would "
                             "build an install path from it)")
    return FabContents(files=files, pyproject=pyproject)


def installed_file(rel: str) -> Path | None:
    """The installed fedscan file a FAB path (``client/client_app.py``) corresponds to."""
    parts = PurePosixPath(rel).with_suffix("").parts
    if not parts or parts[0] not in PACKAGE_DIRS:
        return None
    rest = [p for p in parts[1:] if p != "__init__"]
    module = ".".join([PACKAGE_DIRS[parts[0]], *rest])
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin else None


def foreign_code(fab: FabContents) -> str | None:
    """Why the FAB's code is not the installed fedscan's; None when it carries none other.

    Every code file must be byte-identical to the installed fedscan file at the same package
    path (a FAB built from a fedscan checkout of the same version passes).
    """
    for rel in fab.code_files:
        local = installed_file(rel)
        if local is None or not local.is_file():
            return f"the FAB carries code that is not installed here: {rel}"
        if sha256(local.read_bytes()) != sha256(fab.files[rel]):
            return f"the FAB's {rel} differs from the installed fedscan ({local})"
    return None


def audit(log_path: Path | None, event: str, prefix: str, *, echo: bool = True,
          **fields: object) -> None:
    """Append one decision to an audit log (JSON lines) and, with ``echo``, to stderr.

    Args:
        log_path: the audit log; None logs to stderr only (no policy to say where).
        event: e.g. ``run-accepted``, ``run-refused``.
        prefix: who decided, for the stderr line (``fedscan-guard``).
        echo: also print the line to stderr.
        fields: run id, FAB hash, reason, ...
    """
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, **fields}
    line = json.dumps(record, sort_keys=True, default=str)
    if echo or log_path is None:
        print(f"{prefix}: {line}", file=sys.stderr, flush=True)
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


def write_shim(path: Path, python: str, module: str, function: str, comment: str) -> Path:
    """An executable Python script that calls ``module.function()``.

    A script (not ``python -m``), so its ``sys.path[0]`` is its own folder and nothing in the
    working directory of the process that starts it can shadow the installed fedscan.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{python}\n# {comment}\nfrom {module} import {function}\n\n"
                    f"{function}()\n")
    path.chmod(0o755)
    return path


def task_commands() -> list[str]:
    """Every program Flower's SuperExec may start for a task (``flwr-serverapp``, ...)."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    return sorted(TASK_TYPE_TO_COMMAND.values())
