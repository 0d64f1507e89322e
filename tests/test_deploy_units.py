"""Deployment pieces without a network: PKI, site/server configs, secure-by-default refusals,
the code-approval guard, and the deploy/ files against Flower 1.41's real flags."""

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
from fedscan.server.deployment import load_server_settings, superlink_command, write_app
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
    pem, _ = create_server_cert(tmp_path, ["fl.example.org", "10.0.0.5"])
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
    assert fedscan("certs", "ca", "--out", str(tmp_path)).returncode == 0
    proc = fedscan("certs", "server", "--ca", str(tmp_path), "--host", "fl.example.org")
    assert proc.returncode == 0, proc.stderr
    assert "fl.example.org, localhost, 127.0.0.1" in proc.stdout


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
    assert s.control_address == "127.0.0.1:9000"
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
    cmd = superlink_command(settings, tmp_path / "state.db", insecure=True)
    assert "--insecure" in cmd and "--enable-supernode-auth" not in cmd
    proc = fedscan("server", "start", "--config", str(tmp_path / "server.yaml"))
    assert proc.returncode == 2 and "unless you pass --insecure" in proc.stderr
    assert not (tmp_path / "runs").exists()  # refused before starting anything


# -- code approval (guard) -------------------------------------------------------------------

def fab_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_guard_accepts_code_free_or_identical_fab(tmp_path):
    assert guard.check_fab_dir(fab_dir(tmp_path / "a", {"pyproject.toml": ""}),
                               guard.APPROVED_CLIENTAPP) is None
    installed = (REPO / "client" / "client_app.py").read_text()
    same = fab_dir(tmp_path / "b", {"client/client_app.py": installed})
    assert guard.check_fab_dir(same, guard.APPROVED_CLIENTAPP) is None


def test_guard_refuses_other_code(tmp_path):
    ref = guard.APPROVED_CLIENTAPP
    assert "names ClientApp 'evil:app'" in guard.check_fab_dir(
        fab_dir(tmp_path / "a", {"evil.py": "app = 1"}), "evil:app")
    assert "not installed at this site: evil.py" in guard.check_fab_dir(
        fab_dir(tmp_path / "b", {"evil.py": "import os"}), ref)
    changed = (REPO / "client" / "client_app.py").read_text() + "\n# exfiltrate()\n"
    assert "differs from the installed fedscan" in guard.check_fab_dir(
        fab_dir(tmp_path / "c", {"client/client_app.py": changed}), ref)
    assert "not installed" in guard.check_fab_dir(
        fab_dir(tmp_path / "d", {"client/extra_module.py": ""}), ref)


def test_guard_loader_refuses_logs_and_honours_trusted_hashes(tmp_path, monkeypatch):
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.common.config import get_project_dir

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    site = write_site(tmp_path, "state_dir: state\ntrusted_fab_hashes: [" + "b" * 64 + "]\n")
    monkeypatch.setenv(guard.SITE_CONFIG_ENV, str(site))
    app_dir = get_project_dir("evil/app", "1.0", "a" * 64)
    fab_dir(app_dir, {"pyproject.toml": "[tool.flwr.app.components]\nclientapp = 'x:app'\n",
                      "x.py": "app = None"})
    calls = []
    load = guard.approved_loader_factory(
        lambda *a: (lambda *b: calls.append(b) or "flower-loaded"))("", None, True)
    with pytest.raises(LoadClientAppError, match="refused by site policy"):
        load("evil/app", "1.0", "a" * 64)
    audit = (tmp_path / "state" / "audit.log").read_text()
    assert '"event": "run-refused"' in audit and "x:app" in audit
    assert load("evil/app", "1.0", "b" * 64) == "flower-loaded"  # trusted: Flower's loader
    assert '"policy": "trusted-fab-hash"' in (tmp_path / "state" / "audit.log").read_text()
    ok_dir = get_project_dir("fedscan/fedscan", "0.1.0", "c" * 64)
    fab_dir(ok_dir, {"pyproject.toml": "[tool.flwr.app.components]\n"
                                       f"clientapp = '{guard.APPROVED_CLIENTAPP}'\n"})
    from fedscan.client.client_app import app

    assert load("fedscan/fedscan", "0.1.0", "c" * 64) is app  # the installed ClientApp
    monkeypatch.delenv(guard.SITE_CONFIG_ENV)
    with pytest.raises(LoadClientAppError, match="no site policy"):  # fail closed
        load("fedscan/fedscan", "0.1.0", "c" * 64)


# -- deploy/ files ---------------------------------------------------------------------------

def flower_flags(command: str) -> set[str]:
    out = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=60).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]+)", out))


def test_commands_use_only_flags_flower_141_has(tmp_path):
    site = load_site_settings(write_site(tmp_path))
    (tmp_path / "server.yaml").write_text("server: {ca_cert: a, cert: b, key: c}\n"
                                          "sites: [{name: a}]\n")
    server = load_server_settings(tmp_path / "server.yaml")
    for cmd, exe in ((superlink_command(server, tmp_path / "s.db", False), "flower-superlink"),
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
    assert services["server"]["ports"] == ["8000:8000"]
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


def test_operator_commands_explain_missing_server(tmp_path):
    (tmp_path / "server.yaml").write_text("server: {run_dir: r}\nsites: [{name: a}]\n")
    proc = fedscan("server", "register-site", "--config", "server.yaml", "--key", "a.pub",
                   cwd=tmp_path)
    assert proc.returncode == 2 and "no server started here" in proc.stderr
    proc = fedscan("server", "start", "--resume", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and "not a deployment run folder" in proc.stderr
