"""A hospital's own configuration (``site.yaml``): who it is, where its data and keys are.

Everything a hospital daemon needs lives in this one file, which never leaves the site:

```yaml
name: site-a                      # the name the site reports under
data: /data/site-a                # MSD layout (dataset.json inside)
server: fl.example.org:8000       # the consortium SuperLink (outbound HTTPS only)
ca_cert: /etc/fedscan/ca.crt      # the consortium CA, to verify the server
private_key: /etc/fedscan/site-a  # OpenSSH ECDSA key; the operator registered site-a.pub
device: auto                      # auto | cpu | cuda
privacy: {epsilon: 8.0}           # the site's own DP guarantee (optional)
state_dir: /var/lib/fedscan       # ε ledger, audit log, site log, Flower's working files
trusted_fab_hashes: []            # FABs allowed to run their own code (sha256)
harmonisation_reference: /data/public/reference   # read by the harmonisation task (optional)
policy:                           # limits the server cannot loosen (optional; none by default)
  min_batch_size: 2
  min_local_steps: 10
  max_local_steps: 200            # more are clamped to this
  max_rounds: 100
  max_patch_voxels: 262144        # 64^3
  share_data_stats: true          # answer the data check before round 1 (default: not with DP)
  data_stats_min_cases: 5         # smallest group of cases a shared statistic describes
  share_local_model: true         # cross-site evaluation: send the fine-tuned local model
```

Relative paths are resolved against the file's folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context

from fedscan.shared.config import (
    PrivacyConfig,
    SiteConfig,
    SitePolicy,
    check_policy,
    check_privacy,
    from_dict,
    read_yaml,
)
from fedscan.shared.errors import ConfigError

#: ``--node-config`` key naming the site config file (set by ``fedscan client start``).
NODE_CONFIG_KEY = "site-config"


@dataclass
class SiteSettings:
    """The schema of ``site.yaml``."""

    name: str
    data: str
    server: str
    ca_cert: str | None = None
    private_key: str | None = None
    device: str = "auto"
    privacy: PrivacyConfig | None = None
    #: Where the daemon keeps its state; default: ``.fedscan-<name>`` next to site.yaml.
    state_dir: str | None = None
    #: Local port of the SuperNode's runtime API (ClientApp processes talk to it).
    runtime_port: int = 9094
    #: sha256 hashes of FABs the site trusts to run their own code instead of the installed
    #: fedscan ClientApp (empty: only installed code runs).
    trusted_fab_hashes: list[str] = field(default_factory=list)
    #: Give up reconnecting after this many seconds without the server (None: never).
    max_wait_time: float | None = None
    #: Limits on the task configs this site accepts (floors and caps the server cannot
    #: loosen); see :class:`~fedscan.shared.config.SitePolicy`.
    policy: SitePolicy = field(default_factory=SitePolicy)
    #: The public reference-domain folder the harmonisation task reads (the server's task
    #: config cannot name one).
    harmonisation_reference: str | None = None

    @property
    def site(self) -> SiteConfig:
        """The :class:`SiteConfig` the ClientApp trains as."""
        return SiteConfig(name=self.name, data=self.data, privacy=self.privacy,
                          state_dir=self.state_dir, policy=self.policy,
                          harmonisation_reference=self.harmonisation_reference)

    @property
    def host(self) -> str:
        return self.server.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.server.rsplit(":", 1)[1])


_PATH_FIELDS = ("data", "ca_cert", "private_key", "state_dir", "harmonisation_reference")


def load_site_settings(path: str | Path) -> SiteSettings:
    """Read and validate ``site.yaml``; errors name the file and the key."""
    path = Path(path).expanduser().resolve()
    data = read_yaml(path, "site config")
    try:
        settings: SiteSettings = from_dict(SiteSettings, data, "", None)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for name in _PATH_FIELDS:
        value = getattr(settings, name)
        if value is not None:
            setattr(settings, name, str((path.parent / Path(value).expanduser()).resolve()))
    if settings.state_dir is None:
        settings.state_dir = str(path.parent / f".fedscan-{settings.name}")
    if ":" not in settings.server or not settings.server.rsplit(":", 1)[1].isdigit():
        raise ConfigError(f"{path}: config key 'server': expected host:port, got "
                          f"{settings.server!r}")

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{path}: config key '{key}': {why}")

    check_privacy(settings.privacy, "privacy", bad)
    check_policy(settings.policy, "policy", bad)
    if settings.device not in ("auto", "cpu") and not settings.device.startswith("cuda"):
        raise bad("device", f"expected auto, cpu or cuda[:N], got {settings.device!r}")
    return settings


def site_from_context(context: Context) -> SiteConfig:
    """The hospital a deployed ClientApp acts for, from its SuperNode's ``--node-config``."""
    if NODE_CONFIG_KEY not in context.node_config:
        raise ConfigError(f"this SuperNode has no --node-config {NODE_CONFIG_KEY}=...; start it "
                          "with `fedscan client start --config site.yaml`")
    return load_site_settings(str(context.node_config[NODE_CONFIG_KEY])).site
