"""Deployment pieces without a network: PKI, site/server configs, secure-by-default refusals,
the code-approval guard, and the deploy/ files against Flower 1.41's real flags."""

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fedscan.client import guard
from fedscan.client.daemon import check_security as client_security
from fedscan.client.daemon import supernode_command
from fedscan.client.site_config import load_site_settings, site_from_context
from fedscan.server.deployment import check_security as server_security
from fedscan.server.deployment import superlink_command, write_app
from fedscan.server.settings import load_server_settings
from fedscan.shared.certs import create_ca, create_server_cert, create_site_key
from fedscan.shared.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def fedscan(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedscan", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


# -- PKI -----------------------------------------------------------------------------------

def test_ca_server_cert_and_site_key(tmp_path):
    create_ca(tmp_path)
    pem, _ = create_server_cert(tmp_path, ["fl.example.org", "10.0.0.5"], tmp_path / "server")
    assert (tmp_path / "server" / "ca.crt").read_bytes() == (tmp_path / "ca.crt").read_bytes()
    assert not (tmp_path / "server" / "ca.key").exists()
    with pytest.raises(Exception, match="must not sit beside ca.key"):
        create_server_cert(tmp_path, ["x"], tmp_path)
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert oct((tmp_path / "ca.key").stat().st_mode & 0o777) == "0o600"
    priv, pub = create_site_key("site-a", tmp_path / "keys")
    # Flower's own loader (used by `flwr supernode register`) accepts the public key.
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key

    key = bytes_to_public_key(try_load_public_key(pub))
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    assert priv.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    with pytest.raises(Exception, match="refusing to overwrite"):
        create_site_key("site-a", tmp_path / "keys")


def test_certs_cli_adds_loopback_sans(tmp_path):
    assert fedscan("certs", "ca", "--out", str(tmp_path / "ca")).returncode == 0
    proc = fedscan("certs", "server", "--ca", str(tmp_path / "ca"), "--host", "fl.example.org",
                   "--out", str(tmp_path / "server"))
    assert proc.returncode == 0, proc.stderr
    assert "fl.example.org, localhost, 127.0.0.1" in proc.stdout
    proc = fedscan("certs", "server", "--ca", str(tmp_path / "ca"), "--host", "x")
    assert proc.returncode == 2 and "--out" in proc.stderr  # no default beside the CA key


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_private_keys_are_0600_from_the_first_byte(tmp_path, monkeypatch, umask):
    """Every private key is born 0600: checked on the file descriptor at each write, under a
    umask that would leave a plain open() world-readable."""
    import os
    import stat

    written = []
    real_write = os.write

    def checked_write(fd, data):
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        written.append((mode, bytes(data[:40])))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", checked_write)
    old = os.umask(umask)
    try:
        _, ca_key = create_ca(tmp_path / "ca")
        _, server_key = create_server_cert(tmp_path / "ca", ["h"], tmp_path / "server")
        site_key, site_pub = create_site_key("site-a", tmp_path / "keys")
    finally:
        os.umask(old)
    private = [(m, d) for m, d in written if b"PRIVATE KEY" in d]
    assert len(private) == 3 and all(m == 0o600 for m, _ in private), written
    for key in (ca_key, server_key, site_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE(site_pub.stat().st_mode) == (0o644 & ~umask)
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary names left behind
    with pytest.raises(Exception, match="refusing to overwrite"):
        create_ca(tmp_path / "ca")
    assert stat.S_IMODE(ca_key.stat().st_mode) == 0o600


# -- configs -------------------------------------------------------------------------------

def write_site(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "site.yaml"
    path.write_text("name: site-a\ndata: data\nserver: fl.example.org:8000\n"
                    "ca_cert: ca.crt\nprivate_key: keys/site-a\n" + extra)
    return path


def test_site_config_resolves_paths_and_names_errors(tmp_path):
    s = load_site_settings(write_site(tmp_path, "privacy: {epsilon: 8.0}\n"))
    assert s.data == str(tmp_path / "data") and s.ca_cert == str(tmp_path / "ca.crt")
    assert s.state_dir == str(tmp_path / ".fedscan-site-a")
    assert (s.host, s.port) == ("fl.example.org", 8000)
    assert s.site.privacy.epsilon == 8.0 and s.site.name == "site-a"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: d\nserver: nohost\n")
    with pytest.raises(ConfigError, match="'server': expected host:port"):
        load_site_settings(bad)
    bad.write_text("name: x\ndata: d\nserver: h:1\nprivacy: {epsilon: 0}\n")
    with pytest.raises(ConfigError, match="privacy.epsilon"):
        load_site_settings(bad)
    bad.write_text("name: x\ndata: d\nserver: h:1\ncolour: red\n")
    with pytest.raises(ConfigError, match="unknown config key 'colour'"):
        load_site_settings(bad)


def test_deployed_client_app_finds_its_site(tmp_path):
    from flwr.app import Context, RecordDict

    path = write_site(tmp_path)
    ctx = Context(run_id=1, node_id=2, node_config={"site-config": str(path)},
                  state=RecordDict(), run_config={})
    assert site_from_context(ctx).data == str(tmp_path / "data")
    with pytest.raises(ConfigError, match="site-config"):
        site_from_context(Context(run_id=1, node_id=2, node_config={}, state=RecordDict(),
                                  run_config={}))


def test_server_config_and_generated_app(tmp_path):
    (tmp_path / "server.yaml").write_text(
        "server: {port: 9000, ca_cert: c/ca.crt, cert: c/s.pem, key: c/s.key, run_dir: r}\n"
        "sites:\n  - {name: a, public_key: k/a.pub}\n  - {name: b}\nrounds: 3\n")
    s = load_server_settings(tmp_path / "server.yaml")
    assert s.site_keys == {"a": str(tmp_path / "k/a.pub")}
    assert [x.name for x in s.federation.sites] == ["a", "b"] and s.federation.rounds == 3
    assert s.server.port == 9000 and s.server.internal_port is None
    app = write_app(tmp_path / "r", s, resume=True)
    # The FAB Flower builds from it carries no code, only the app's pyproject.
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist()
    assert [n for n in names if not n.startswith(".info/")] == ["pyproject.toml"]
    from flwr.common.config import get_project_config

    config = get_project_config(app)["tool"]["flwr"]["app"]
    assert config["components"]["clientapp"] == guard.APPROVED_CLIENTAPP
    assert config["config"]["resume"] is True


# -- secure by default -----------------------------------------------------------------------

def test_client_refuses_plain_text_without_insecure(tmp_path, capsys):
    path = tmp_path / "site.yaml"
    (tmp_path / "data").mkdir()
    path.write_text("name: a\ndata: data\nserver: 127.0.0.1:1\n")  # no CA, no key
    settings = load_site_settings(path)
    with pytest.raises(ConfigError, match="'ca_cert' is required .* unless you pass --insecure"):
        client_security(settings, insecure=False, where=str(path))
    client_security(settings, insecure=True, where=str(path))
    assert "WARNING: --insecure" in capsys.readouterr().err
    assert "--insecure" in supernode_command(settings, path, insecure=True)
    proc = fedscan("client", "start", "--config", str(path))
    assert proc.returncode == 2 and "unless you pass --insecure" in proc.stderr


def test_server_refuses_plain_text_without_insecure(tmp_path, capsys):
    (tmp_path / "server.yaml").write_text("server: {port: 1}\nsites: [{name: a}]\n")
    settings = load_server_settings(tmp_path / "server.yaml")
    with pytest.raises(ConfigError, match="server.ca_cert' is required"):
        server_security(settings, insecure=False)
    server_security(settings, insecure=True)
    assert "WARNING: --insecure" in capsys.readouterr().err
    cmd = superlink_command(settings, tmp_path / "state.db", insecure=True, internal_port=7)
    assert "--insecure" in cmd and "--enable-supernode-auth" not in cmd
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "7"
    proc = fedscan("server", "start", "--config", str(tmp_path / "server.yaml"))
    assert proc.returncode == 2 and "unless you pass --insecure" in proc.stderr
    assert not (tmp_path / "runs").exists()  # refused before starting anything


def server_yaml(tmp_path: Path, tls: str, name: str = "server.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"server: {{{tls}}}\nsites: [{{name: a}}]\n")
    return path


def test_server_refuses_to_run_beside_the_ca_key(tmp_path):
    create_ca(tmp_path / "ca")
    create_server_cert(tmp_path / "ca", ["fl.example.org", "localhost", "127.0.0.1"],
                       tmp_path / "tls")
    ok = server_yaml(tmp_path, "ca_cert: tls/ca.crt, cert: tls/server.pem, key: tls/server.key")
    server_security(load_server_settings(ok), insecure=False)
    # ca_cert taken from the CA's own folder: ca.key is among the server's files.
    beside = server_yaml(tmp_path, "ca_cert: ca/ca.crt, cert: tls/server.pem, "
                                   "key: tls/server.key", name="beside.yaml")
    with pytest.raises(ConfigError, match=r"CA private key .*ca.key sits among"):
        server_security(load_server_settings(beside), insecure=False)
    # Under another name, next to the server's key.
    (tmp_path / "tls" / "backup.pem").write_bytes((tmp_path / "ca" / "ca.key").read_bytes())
    with pytest.raises(ConfigError, match="backup.pem sits among"):
        server_security(load_server_settings(ok), insecure=False)
    proc = fedscan("server", "start", "--config", str(ok))
    assert proc.returncode == 2 and "backup.pem sits among" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_server_needs_loopback_names_and_nginx(tmp_path, monkeypatch):
    from fedscan.server import front
    from fedscan.shared.errors import FedscanError

    create_ca(tmp_path / "ca")
    create_server_cert(tmp_path / "ca", ["fl.example.org"], tmp_path / "tls")  # API: no loopback
    path = server_yaml(tmp_path, "ca_cert: tls/ca.crt, cert: tls/server.pem, "
                                 "key: tls/server.key")
    with pytest.raises(ConfigError, match="does not name localhost, 127.0.0.1"):
        server_security(load_server_settings(path), insecure=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(front, "NGINX_DIRS", ())
    with pytest.raises(FedscanError, match="nginx not found.*apt-get install -y nginx"):
        front.find_nginx()
    assert "\n" not in front.MISSING_NGINX


@pytest.mark.parametrize("tls", [True, False])
def test_front_config_is_valid_nginx_and_forwards_only_the_fleet_api(tmp_path, tls):
    """nginx itself (``nginx -t``) accepts the generated config; only /v1/fleet/ is proxied."""
    from fedscan.server import front

    create_ca(tmp_path / "ca")
    pem, key = create_server_cert(tmp_path / "ca", ["localhost", "127.0.0.1"], tmp_path / "tls")
    front_dir = tmp_path / "front"
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (front_dir / "tmp" / sub).mkdir(parents=True)
    text = front.nginx_config(front_dir, "127.0.0.1", 8443, 9000,
                              (str(tmp_path / "tls" / "ca.crt"), str(pem), str(key))
                              if tls else None)
    (front_dir / "nginx.conf").write_text(text)
    proc = subprocess.run([front.find_nginx(), "-t", "-p", str(front_dir), "-c",
                           str(front_dir / "nginx.conf"), "-e", str(front_dir / "error.log")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert text.count("proxy_pass") == 1 and "location / {\n            return 403;" in text
    assert ("proxy_ssl_verify on;" in text and "listen 127.0.0.1:8443 ssl;" in text) == tls
    assert "server 127.0.0.1:9000;" in text and "0.0.0.0" not in text


def test_stale_processes_are_stopped_only_when_the_pid_is_theirs(tmp_path):
    """A restart stops what a crashed start left (pid file + program name), and leaves a
    reused pid alone."""
    import time

    from fedscan.server.front import stop_stale

    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        # Right after a (v)fork+exec the kernel may still show an empty command line.
        deadline = time.monotonic() + 10
        while not Path(f"/proc/{proc.pid}/cmdline").read_bytes() and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        (tmp_path / "x.pid").write_text(str(proc.pid))
        assert stop_stale(tmp_path / "x.pid", "nginx") is False and proc.poll() is None
        assert stop_stale(tmp_path / "x.pid", "sleep") is True
        assert proc.wait(timeout=10) is not None
        assert stop_stale(tmp_path / "missing.pid", "sleep") is False
    finally:
        if proc.poll() is None:
            proc.kill()


# -- code approval (guards) ------------------------------------------------------------------

def make_fab(files: dict[str, str | bytes]) -> bytes:
    """A FAB as Flower's Control API receives it: a zip with ``.info/CONTENT``."""
    import hashlib
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as fab:
        lines = []
        for rel, text in files.items():
            data = text.encode() if isinstance(text, str) else text
            fab.writestr(rel, data)
            lines.append(f"{rel},{hashlib.sha256(data).hexdigest()},{len(data) * 8}")
        fab.writestr(".info/CONTENT", "\n".join(lines) + "\n")
    return buffer.getvalue()


def pyproject(clientapp: str = guard.APPROVED_CLIENTAPP, version: str = "0.1.0",
              serverapp: str = "fedscan.server.server_app:app", extra: str = "") -> str:
    return (f'[project]\nname = "fedscan"\nversion = "{version}"\n'
            '[tool.flwr.app]\npublisher = "fedscan"\n[tool.flwr.app.components]\n'
            f'serverapp = "{serverapp}"\nclientapp = "{clientapp}"\n{extra}')


def test_client_guard_accepts_code_free_or_identical_fab():
    assert guard.check_clientapp(make_fab({"pyproject.toml": pyproject()}), []) == (
        guard.POLICY_INSTALLED, None)
    installed = (REPO / "client" / "client_app.py").read_bytes()
    fab = make_fab({"pyproject.toml": pyproject(), "client/client_app.py": installed})
    assert guard.check_clientapp(fab, []) == (guard.POLICY_INSTALLED, None)


def test_client_guard_refuses_other_code_on_the_fabs_bytes():
    def why(files, trusted=()):
        policy, reason = guard.check_clientapp(make_fab(files), list(trusted))
        assert policy == "" and reason
        return reason

    assert "names ClientApp 'evil:app'" in why({"pyproject.toml": pyproject("evil:app"),
                                                "evil.py": "app = 1"})
    assert "not installed here: evil.py" in why({"pyproject.toml": pyproject(),
                                                 "evil.py": "import os"})
    changed = (REPO / "client" / "client_app.py").read_text() + "\n# exfiltrate()\n"
    assert "differs from the installed fedscan" in why(
        {"pyproject.toml": pyproject(), "client/client_app.py": changed})
    assert "not installed" in why({"pyproject.toml": pyproject(),
                                   "client/extra_module.py": ""})
    # Flower would build its install folder from the version: refused before installation.
    assert "not a plain name" in why({"pyproject.toml": pyproject(version="1/../../../../x")})
    assert "unsafe path" in why({"pyproject.toml": pyproject(), "../escape.py": ""})
    assert "not a FAB" in guard.check_clientapp(b"not a zip", [])[1]


def test_client_guard_installs_nothing_refuses_before_install_and_logs(tmp_path, monkeypatch):
    """The guard decides on the FAB's bytes: a refused FAB (even one whose version would make
    Flower write outside FLWR_HOME) never reaches the disk; an approved fedscan FAB is not
    installed either; a trusted hash gets Flower's own install and loader."""
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.client_app import LoadClientAppError

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    evil = make_fab({"pyproject.toml": pyproject(version="1/../../../../escaped"),
                     "x.py": "app = None"})
    trusted = make_fab({"pyproject.toml": pyproject("x:app"), "x.py": "app = None"})
    site = write_site(tmp_path, f"state_dir: state\ntrusted_fab_hashes: "
                                f"[{hashlib.sha256(trusted).hexdigest()}]\n")
    monkeypatch.setenv(guard.SITE_CONFIG_ENV, str(site))
    monkeypatch.setattr(guard, "_approved", {})
    install = guard.guarded_install(install_from_fab)
    with pytest.raises(LoadClientAppError, match="refused by site policy"):
        install(evil, skip_prompt=True)
    assert not (tmp_path / "escaped").exists() and not list(tmp_path.rglob("x.py"))
    calls = []
    load = guard.approved_loader_factory(
        lambda *a: (lambda *b: calls.append(b) or "flower-loaded"))("", None, True)
    with pytest.raises(LoadClientAppError, match="not checked before installation"):
        load("fedscan/fedscan", "0.1.0", hashlib.sha256(evil).hexdigest())
    ours = make_fab({"pyproject.toml": pyproject()})
    assert install(ours, skip_prompt=True) is None  # nothing written
    from fedscan.client.client_app import app

    assert load("fedscan/fedscan", "0.1.0", hashlib.sha256(ours).hexdigest()) is app
    assert Path(install(trusted, skip_prompt=True)).is_dir()  # Flower installed it
    assert load("fedscan/fedscan", "0.1.0", hashlib.sha256(trusted).hexdigest()) == \
        "flower-loaded"
    events = [json.loads(line) for line in (tmp_path / "state" / "audit.log").read_text()
              .splitlines()]
    assert [(e["event"], e.get("policy")) for e in events] == [
        ("run-refused", None), ("run-refused", None), ("run-accepted", "installed-code"),
        ("run-accepted", "trusted-fab-hash")]
    assert "not a plain name" in events[0]["reason"]
    assert events[0]["fab_hash"] == hashlib.sha256(evil).hexdigest()
    monkeypatch.delenv(guard.SITE_CONFIG_ENV)
    with pytest.raises(LoadClientAppError, match="no site policy"):  # fail closed
        install(ours, skip_prompt=True)


def test_server_guard_runs_only_the_generated_app(tmp_path):
    from fedscan.server import guard as server_guard
    from fedscan.server.deployment import write_app as write

    (tmp_path / "server.yaml").write_text("server: {run_dir: r}\nsites: [{name: a}]\n")
    app = write(tmp_path / "r", load_server_settings(tmp_path / "server.yaml"), resume=False)
    approved = server_guard.approved_app_hash(app)
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(app)  # what `flwr run` submits: Flower rewrites the pyproject
    assert server_guard.check_serverapp(fab, approved)[1] is None
    ours = (app / "pyproject.toml").read_text()

    def why(files, approved_hash=approved):
        accepted, reason = server_guard.check_serverapp(make_fab(files), approved_hash)
        assert accepted is None and reason
        return reason

    assert "carries code: evil.py" in why({"pyproject.toml": ours, "evil.py": "import os"})
    assert "carries files other than" in why({"pyproject.toml": ours, "README.md": "hi"})
    assert "not ServerApp" in why({"pyproject.toml": ours.replace(
        "fedscan.server.server_app:app", "evil:app")})
    assert "not ServerApp" in why({"pyproject.toml": ours.replace(  # an AgentApp bundle
        'clientapp = "', 'agentapp = "x:app"\nclientapp = "')})
    assert "not the app" in why({"pyproject.toml": ours.replace("resume = false",
                                                                 "resume = true")})
    assert "not a plain name" in why({"pyproject.toml": ours.replace(
        'version = "', 'version = "9/../../../')})
    assert "not started by" in why({"pyproject.toml": ours}, approved_hash=None)


def test_server_guard_refuses_overridden_run_config_and_runs_the_installed_app(tmp_path,
                                                                              monkeypatch):
    from flwr.app import Context, RecordDict
    from flwr.cli.build import build_fab_from_disk
    from flwr.serverapp.server_app import LoadServerAppError

    from fedscan.server import guard as server_guard
    from fedscan.server import server_app
    from fedscan.server.deployment import write_app as write

    (tmp_path / "server.yaml").write_text("server: {run_dir: r}\nsites: [{name: a}]\n")
    app = write(tmp_path / "r", load_server_settings(tmp_path / "server.yaml"), resume=False)
    monkeypatch.setenv(server_guard.APPROVED_APP_ENV, server_guard.approved_app_hash(app))
    monkeypatch.setenv(server_guard.RUN_DIR_ENV, str(tmp_path / "r"))
    monkeypatch.setattr(server_guard, "_accepted", {})
    runs = []
    run = server_guard.guarded_run(lambda **kw: runs.append(kw) or "ran")
    config = {"server-config": str(tmp_path / "server.yaml"), "run-dir": str(tmp_path / "r"),
              "resume": False, "insecure": False}

    def context(run_config):
        return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                       run_config=run_config)

    with pytest.raises(LoadServerAppError, match="not checked before installation"):
        run(None, context(config), "dir", guard_ref())
    server_guard.guarded_install(lambda *a, **k: "installed")(build_fab_from_disk(app))
    with pytest.raises(LoadServerAppError, match="run config was overridden"):
        run(None, context({**config, "run-dir": "/elsewhere"}), "dir", guard_ref())
    with pytest.raises(LoadServerAppError, match="run config was overridden"):
        run(None, context({**config, "insecure": True}), "dir", guard_ref())  # no admission
    assert run(None, context(config), "dir", guard_ref()) == "ran"
    assert runs[0]["loaded_server_app"] is server_app.app  # the installed ServerApp
    events = [json.loads(line) for line in (tmp_path / "r" / "audit.log").read_text()
              .splitlines()]
    assert [e["event"] for e in events] == ["run-refused"] * 3 + ["run-accepted"]


def guard_ref() -> str:
    from fedscan.server.guard import APPROVED_SERVERAPP

    return APPROVED_SERVERAPP


def test_guard_shims_cover_every_task_program(tmp_path):
    """Both actors put a shim for each program Flower's SuperExec may start first on PATH;
    only the actor's own app program is guarded-Flower, the others refuse and log."""
    from fedscan.client.daemon import install_guard as client_shims
    from fedscan.server.guard import install_guard as server_shims
    from fedscan.shared.fab_policy import task_commands

    assert {"flwr-serverapp", "flwr-clientapp", "flwr-agentapp", "flwr-simulation"} <= set(
        task_commands())
    for bin_dir, own in ((server_shims(tmp_path / "run"), "flwr-serverapp"),
                         (client_shims(tmp_path / "site"), "flwr-clientapp")):
        assert sorted(p.name for p in bin_dir.iterdir()) == task_commands()
        assert "import main" in (bin_dir / own).read_text()
    proc = subprocess.run([str(tmp_path / "run" / "bin" / "flwr-agentapp"), "--token", "t"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FEDSCAN_RUN_DIR": str(tmp_path / "run")})
    assert proc.returncode == 1
    event = json.loads((tmp_path / "run" / "audit.log").read_text())
    assert event["event"] == "task-refused" and event["command"] == "flwr-agentapp"


# -- deploy/ files ---------------------------------------------------------------------------

def flower_flags(command: str) -> set[str]:
    out = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=60).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]+)", out))


def test_commands_use_only_flags_flower_141_has(tmp_path):
    site = load_site_settings(write_site(tmp_path))
    (tmp_path / "server.yaml").write_text("server: {ca_cert: a, cert: b, key: c}\n"
                                          "sites: [{name: a}]\n")
    server = load_server_settings(tmp_path / "server.yaml")
    for cmd, exe in ((superlink_command(server, tmp_path / "s.db", False, 1), "flower-superlink"),
                     (supernode_command(site, tmp_path / "site.yaml", False),
                      "flower-supernode")):
        used = {a for a in cmd if a.startswith("--")}
        assert used <= flower_flags(exe), used - flower_flags(exe)
    # The node config is quoted so Flower parses the path as a string.
    from flwr.common.config import parse_config_args

    arg = supernode_command(site, tmp_path / "site.yaml", False)
    node_config = arg[arg.index("--node-config") + 1]
    assert parse_config_args([node_config]) == {"site-config": str(tmp_path / "site.yaml")}


def test_compose_file(tmp_path):
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"server", "site-a", "site-b", "site-c"}
    assert services["server"]["ports"] == ["8000:8000"]  # only the front
    assert all("ports" not in svc for name, svc in services.items() if name != "server")
    # The CA's folder (ca.key) is mounted nowhere; keys are never made readable to others.
    for name, svc in services.items():
        sources = [v.split(":")[0] for v in svc["volumes"]]
        assert not any(src.startswith("./ca") or "ca.key" in src for src in sources), name
        assert svc["user"] == "${FEDSCAN_UID:-49999}:${FEDSCAN_GID:-49999}", name
    init = (DEPLOY / "compose-init.sh").read_text()
    assert "chmod" not in init and "umask 077" in init and "--out server-tls" in init
    assert "./server-tls:/certs:ro" in services["server"]["volumes"]
    from fedscan.cli import build_parser

    for name, svc in services.items():
        args = build_parser().parse_args(svc["command"])  # a valid fedscan command line
        assert not getattr(args, "insecure", False), name  # TLS everywhere
        config = next(v.split(":")[1] for v in svc["volumes"] if v.startswith("./config/"))
        assert config == args.config
    server = yaml.safe_load((DEPLOY / "config" / "server.yaml").read_text())
    assert {"ca_cert", "cert", "key"} <= set(server["server"]) and server["server"]["port"] == 8000
    for s in "abc":
        site = yaml.safe_load((DEPLOY / "config" / f"site-{s}.yaml").read_text())
        assert site["server"] == "server:8000" and site["ca_cert"] and site["private_key"]
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), src


def test_kubernetes_manifest_and_systemd_unit():
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "server.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ConfigMap", "PersistentVolumeClaim", "Job", "Service"}
    container = kinds["Job"]["spec"]["template"]["spec"]["containers"][0]
    from fedscan.cli import build_parser

    args = build_parser().parse_args(container["args"])
    assert args.resume and not args.insecure
    server = yaml.safe_load(kinds["ConfigMap"]["data"]["server.yaml"])
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert Path(server["server"]["cert"]).parent.as_posix() in mounts
    unit = (DEPLOY / "fedscan-client.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1)
    args = build_parser().parse_args(shlex.split(exec_start)[1:])
    assert args.command == "client" and args.client_command == "start" and not args.insecure
    assert "Restart=always" in unit and "ReadOnlyPaths=/etc/fedscan /data" in unit
    unit = (DEPLOY / "fedscan-server.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1)
    args = build_parser().parse_args(shlex.split(exec_start)[1:])
    assert args.command == "server" and args.server_command == "start" and args.resume
    assert not args.insecure and "Restart=on-failure" in unit
    assert "InaccessiblePaths=-/etc/fedscan/ca" in unit and "UMask=0077" in unit


def test_operator_commands_explain_missing_server(tmp_path):
    (tmp_path / "server.yaml").write_text("server: {run_dir: r}\nsites: [{name: a}]\n")
    proc = fedscan("server", "register-site", "--config", "server.yaml", "--key", "a.pub",
                   cwd=tmp_path)
    assert proc.returncode == 2 and "no server started here" in proc.stderr
    proc = fedscan("server", "start", "--resume", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and "not a deployment run folder" in proc.stderr


@pytest.mark.parametrize("key,value", [("policy", "{max_rounds: 3}"), ("privacy", "{epsilon: 8}"),
                                       ("data", "/data/a"), ("harmonisation_reference", "/ref")])
def test_site_only_keys_in_server_yaml_are_an_error(tmp_path, key, value):
    """A hospital's own settings written into server.yaml would silently do nothing: the
    operator gets one line naming the key instead."""
    from fedscan.shared.errors import ConfigError

    path = tmp_path / "server.yaml"
    path.write_text(f"server: {{run_dir: r}}\nsites:\n  - {{name: a, {key}: {value}}}\n")
    with pytest.raises(ConfigError, match=rf"sites\[0\]\.{key}: a hospital sets this"):
        load_server_settings(path)
