"""``fedscan client check``: a preflight a hospital's IT runs before starting the daemon.

Each check prints one line (``OK``, ``WARN`` or ``FAIL``, what, details); the exit status is
non-zero when any check fails. The key check activates the node on the server and deactivates
it again, so run it while the daemon is stopped (with the daemon running it reports the node
as already online, which also proves the key is registered).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fedscan.client.site_config import SiteSettings, load_site_settings
from fedscan.shared.certs import certificate_summary
from fedscan.shared.errors import FedscanError

#: Warn when the server certificate expires within this many days.
CERT_WARN_DAYS = 30
#: Warn below this much free disk (GiB) in the data and state folders.
DISK_WARN_GIB = 5.0


@dataclass
class Check:
    status: str  # OK | WARN | FAIL
    name: str
    detail: str

    def __str__(self) -> str:
        return f"{self.status:<4}  {self.name:<12} {self.detail}"


def check_data(settings: SiteSettings) -> Check:
    from fedscan.shared.data import describe, read_dataset

    try:
        site = read_dataset(settings.data, name=settings.name, check=True)
    except FedscanError as exc:
        return Check("FAIL", "data", str(exc))
    return Check("OK", "data", f"{site.root}: {len(site.train)} training and "
                               f"{len(site.validation)} validation cases{describe(site)}; "
                               "contract valid")


def check_reference(settings: SiteSettings) -> Check:
    """The harmonisation reference folder, when the site names one, and the site's policy."""
    from fedscan.shared.data import read_dataset

    # share_local_model is shown only when it keeps the local model (true is the default).
    limits = {k: v for k, v in vars(settings.policy).items() if v is not None and v is not True}
    policy = ", ".join(f"{k} {v}" for k, v in limits.items()) or "no limits"
    if settings.harmonisation_reference is None:
        return Check("OK", "tasks", f"policy: {policy}; no harmonisation_reference "
                                    "(needed only to train the harmonisation task)")
    try:
        ref = read_dataset(settings.harmonisation_reference, name="reference", check=False)
    except FedscanError as exc:
        return Check("FAIL", "tasks", f"harmonisation_reference: {exc}")
    return Check("OK", "tasks", f"policy: {policy}; harmonisation_reference {ref.root} "
                                f"({len(ref.cases)} cases)")


def check_reachable(settings: SiteSettings, timeout: float = 5.0) -> Check:
    try:
        with socket.create_connection((settings.host, settings.port), timeout=timeout):
            pass
    except OSError as exc:
        return Check("FAIL", "server", f"{settings.server} not reachable ({exc})")
    return Check("OK", "server", f"{settings.server} reachable (TCP)")


def check_tls(settings: SiteSettings, timeout: float = 5.0) -> Check:
    """Handshake with the server, verifying its certificate against the consortium CA."""
    try:
        ctx = ssl.create_default_context(cafile=settings.ca_cert)
        with socket.create_connection((settings.host, settings.port), timeout=timeout) as sock, \
                ctx.wrap_socket(sock, server_hostname=settings.host) as tls:
            cert = tls.getpeercert()
    except (OSError, ssl.SSLError) as exc:
        return Check("FAIL", "certificate", f"TLS to {settings.server} with CA "
                                            f"{settings.ca_cert} failed: {exc}")
    expires = datetime.fromtimestamp(ssl.cert_time_to_seconds(cert["notAfter"]), timezone.utc)
    days = (expires - datetime.now(timezone.utc)).days
    ca = certificate_summary(str(settings.ca_cert))
    detail = (f"server certificate valid for {settings.host}, signed by {ca['subject']}, "
              f"expires {expires:%Y-%m-%d} ({days} days)")
    return Check("WARN" if days < CERT_WARN_DAYS else "OK", "certificate", detail)


def check_key(settings: SiteSettings) -> Check:
    """Is the site's public key registered on the server? (Signed ActivateNode request.)"""
    import httpx
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.proto.fleet_pb2 import (  # pylint: disable=E0611
        ActivateNodeRequest,
        DeactivateNodeRequest,
    )
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    try:
        key = load_ssh_private_key(Path(str(settings.private_key)).read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("not an EC key")
    except (OSError, ValueError) as exc:
        return Check("FAIL", "key", f"{settings.private_key}: not a usable OpenSSH EC private "
                                    f"key ({exc})")
    public = public_key_to_bytes(key.public_key())
    client = FleetHttpClient.from_server_address(
        settings.server, False, str(settings.ca_cert),
        interceptors=[NodeAuthHttpInterceptor(key, key.public_key())])
    try:
        node_id = client.ActivateNode(ActivateNodeRequest(public_key=public,
                                                          heartbeat_interval=30)).node_id
        client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
        return Check("OK", "key", f"registered on the server (node id {node_id})")
    except httpx.HTTPStatusError as exc:
        text = exc.response.text
        if exc.response.status_code == 412:  # Flower's "Failed to activate SuperNode"
            # Flower gives the same answer for an unknown key and a node already online.
            return Check("FAIL", "key", "the server does not accept this key: not registered "
                                        f"(send {settings.private_key}.pub to the operator), "
                                        "or this site's daemon is connected already (stop it "
                                        "and check again)")
        return Check("FAIL", "key", f"server refused the key check: HTTP "
                                    f"{exc.response.status_code} {text[:200]}")
    except httpx.HTTPError as exc:
        return Check("FAIL", "key", f"key check failed: {exc}")
    finally:
        client.close()


def check_resources(settings: SiteSettings) -> list[Check]:
    checks = []
    for label, folder in (("data", settings.data), ("state", settings.state_dir)):
        target = Path(str(folder))
        while not target.exists() and target != target.parent:
            target = target.parent
        free = shutil.disk_usage(target).free / 2**30
        checks.append(Check("WARN" if free < DISK_WARN_GIB else "OK", "disk",
                            f"{free:.1f} GiB free for {label} ({folder})"))
    checks.append(Check("OK", "cpu", f"{os.cpu_count()} cores"))
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        checks.append(Check("OK", "gpu", ", ".join(names)))
    else:
        status = "FAIL" if settings.device.startswith("cuda") else "OK"
        checks.append(Check(status, "gpu", f"none visible (device: {settings.device})"))
    return checks


def run_checks(config: str | Path, insecure: bool = False) -> list[Check]:
    """Run every preflight check for a site config."""
    settings = load_site_settings(config)
    checks = [Check("OK", "config", f"{Path(config).resolve()}: site {settings.name}"),
              check_data(settings), check_reference(settings), check_reachable(settings)]
    missing = [k for k in ("ca_cert", "private_key")
               if not getattr(settings, k) or not Path(str(getattr(settings, k))).is_file()]
    if missing and not insecure:
        checks.append(Check("FAIL", "certificate", f"{', '.join(missing)} missing in the site "
                                                   "config or not a file (or pass --insecure)"))
    elif insecure:
        checks.append(Check("WARN", "certificate", "skipped: --insecure (no TLS)"))
        checks.append(Check("WARN", "key", "skipped: --insecure (no node authentication)"))
    elif checks[-1].status == "OK":
        checks.append(check_tls(settings))
        if checks[-1].status != "FAIL":
            checks.append(check_key(settings))
    checks += check_resources(settings)
    return checks
