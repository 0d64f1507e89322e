"""server.yaml: the consortium server's settings (a fedscan run config plus a ``server:`` block).

Read by ``fedscan server start`` (server/deployment.py) and by the ServerApp it starts
(server/server_app.py), which must not import the launcher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedscan.shared.config import Config, from_dict, parse_config, read_yaml
from fedscan.shared.errors import ConfigError

#: Node id -> site name of the keys this server admitted (in the run folder).
NODES_FILE = "nodes.json"


@dataclass
class ServerBlock:
    """The ``server:`` block of server.yaml: where hospitals connect and the TLS files."""

    #: Where the TLS front (nginx) listens for the hospitals' SuperNodes.
    host: str = "0.0.0.0"
    port: int = 8000
    #: The SuperLink's own port, on 127.0.0.1 only (the operator's ``flwr`` CLI uses it);
    #: default: a free port chosen at start.
    internal_port: int | None = None
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    #: The run folder (outputs, state database, logs); relative to server.yaml.
    run_dir: str = "runs/consortium"
    #: SuperLink state database (registered nodes, runs); default ``<run_dir>/state.db``.
    database: str | None = None
    #: Seconds to wait for the SuperLink to accept connections.
    startup_timeout: float = 60.0
    #: Seconds each round waits for every listed site to be online before it starts with the
    #: sites present (at least ``strategy.min_sites``).
    site_grace: float = 120.0
    #: Status page port while the run goes (None: no page; 0: a free port); see
    #: docs/operations.md.
    status_port: int | None = None
    #: Status page address: loopback unless set; any other address requires a token and is
    #: served over HTTPS with ``cert``/``key``.
    status_host: str = "127.0.0.1"


#: Site keys that only take effect at the hospital (its data, budget, limits and paths).
SITE_ONLY_KEYS = ("data", "privacy", "state_dir", "policy", "harmonisation_reference")


@dataclass
class ServerSettings:
    """A parsed server.yaml: the deployment block, the federation, the hospitals' keys."""

    path: Path
    server: ServerBlock
    federation: Config
    site_keys: dict[str, str] = field(default_factory=dict)


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
                    for key in SITE_ONLY_KEYS:
                        if key in site:
                            raise ConfigError(
                                f"sites[{i}].{key}: a hospital sets this in its own site.yaml; "
                                "the server never sees it (remove it here)")
                    if "truth" in site:
                        raise ConfigError(
                            f"sites[{i}].truth: the harmonisation study's paired truth is for "
                            "simulations only; a deployment never reads it (remove it here)")
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
