"""Deployment subcommands of ``fedscan``: ``certs``, ``server``, ``client``.

Kept apart from ``cli.py`` so the deployment commands read as one unit; each handler parses,
calls one function and returns an exit status, like the rest of the CLI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedscan.shared.errors import FedscanError

LOOPBACK = ("localhost", "127.0.0.1")


def _certs_ca(args: argparse.Namespace) -> int:
    from fedscan.shared.certs import create_ca

    crt, key = create_ca(args.out, name=args.name)
    print(f"wrote {crt} (give to every hospital) and {key} (keep offline; never on the server)")
    return 0


def _certs_server(args: argparse.Namespace) -> int:
    from fedscan.shared.certs import create_server_cert

    # The operator's own CLI talks to the SuperLink on loopback, so loopback is always a SAN.
    hosts = list(dict.fromkeys([*args.host, *LOOPBACK]))
    pem, key = create_server_cert(args.ca, hosts, out_dir=args.out)
    print(f"wrote {pem}, {key} and {Path(args.out) / 'ca.crt'} for {', '.join(hosts)}")
    return 0


def _certs_site(args: argparse.Namespace) -> int:
    from fedscan.shared.certs import create_site_key

    priv, pub = create_site_key(args.name, args.out)
    print(f"wrote {priv} (stays at the hospital) and {pub} (send to the operator)")
    return 0


def _server_config_of(run_dir: str) -> str:
    """The server.yaml a run folder was started with (recorded in its generated app)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    app = Path(run_dir) / "app" / "pyproject.toml"
    if not app.is_file():
        raise FedscanError(f"{run_dir}: not a deployment run folder (no app/pyproject.toml); "
                           "pass --config")
    return str(tomllib.loads(app.read_text())["tool"]["flwr"]["app"]["config"]["server-config"])


def _server_start(args: argparse.Namespace) -> int:
    from fedscan.server.deployment import start_server

    if not args.config and not args.resume:
        raise FedscanError("server start: pass --config server.yaml (or --resume RUN_DIR)")
    config = args.config or _server_config_of(args.resume)
    start_server(config, insecure=args.insecure, resume=args.resume,
                 keep_running=args.keep_running)
    return 0


def _server_register(args: argparse.Namespace) -> int:
    from fedscan.server.deployment import register_site

    register_site(args.config, args.key, name=args.name, run_dir=args.run_dir)
    return 0


def _client_start(args: argparse.Namespace) -> int:
    from fedscan.client.daemon import start_client

    return start_client(args.config, insecure=args.insecure)


def _client_check(args: argparse.Namespace) -> int:
    if args.data_stats:
        from fedscan.client.site_check import print_site_stats

        return print_site_stats(args.config, model=args.model)
    from fedscan.client.preflight import run_checks

    checks = run_checks(args.config, insecure=args.insecure)
    for check in checks:
        print(check, flush=True)
    failed = [c for c in checks if c.status == "FAIL"]
    print(f"{len(failed)} check(s) failed" if failed else "all checks passed",
          file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


def _client_drift(args: argparse.Namespace) -> int:
    from fedscan.client.drift import DriftThresholds, detect_drift, format_drift, write_json
    from fedscan.client.site_config import load_site_settings

    site = load_site_settings(args.config).site
    thresholds = DriftThresholds()
    try:
        result = detect_drift(site, args.model, args.data, thresholds,
                              use_model=not args.no_model_check)
    except ValueError as exc:
        raise FedscanError(str(exc)) from None
    print(format_drift(result, thresholds), flush=True)
    if args.json:
        write_json(result, args.json)
    return 1 if result.drifted else 0


def _client_status(args: argparse.Namespace) -> int:
    import json

    from fedscan.client.site_config import load_site_settings
    from fedscan.client.site_status import format_status, site_status

    site = load_site_settings(args.config).site
    if not args.serve:
        status = site_status(site)
        print(json.dumps(status, indent=1) if args.json else format_status(status))
        return 0
    from fedscan.client.site_page import site_page_factory
    from fedscan.shared.status.serve import StatusOptions, StatusServer, warn_plain_http

    site_status(site)  # a missing state folder is an error now, not on the first request
    options = StatusOptions(host=args.host, port=args.port)
    server = StatusServer(None, options, make_app=site_page_factory(site))
    print(f"fedscan: site {site.name}'s own page at {server.url} (Ctrl-C stops it)", flush=True)
    warn_plain_http(options)
    server.serve_forever()
    return 0


def add_deployment_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``certs``, ``server`` and ``client`` to the ``fedscan`` parser."""
    certs = sub.add_parser("certs", help="consortium CA, server certificate, hospital keys")
    csub = certs.add_subparsers(dest="certs_command", required=True)
    p = csub.add_parser("ca", help="create the consortium CA (ca.crt, ca.key)")
    p.add_argument("--out", required=True, help="folder for ca.crt and ca.key")
    p.add_argument("--name", default="fedscan consortium CA", help="CA common name")
    p.set_defaults(func=_certs_ca)
    p = csub.add_parser("server", help="issue the server's TLS certificate (server.pem/.key)")
    p.add_argument("--ca", required=True, help="folder with ca.crt and ca.key")
    p.add_argument("--host", action="append", required=True,
                   help="DNS name or IP hospitals use to reach the server (repeatable); "
                        "localhost and 127.0.0.1 are always added")
    p.add_argument("--out", required=True,
                   help="the server's own folder (server.pem, server.key, a copy of ca.crt); "
                        "not the CA's folder")
    p.set_defaults(func=_certs_server)
    p = csub.add_parser("site", help="a hospital's node key pair (OpenSSH ECDSA P-384)")
    p.add_argument("--name", required=True, help="site name (file name of the key)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_certs_site)

    server = sub.add_parser("server", help="the consortium server (Flower SuperLink)")
    ssub = server.add_subparsers(dest="server_command", required=True)
    p = ssub.add_parser("start", help="start the SuperLink and run the federation")
    p.add_argument("--config", help="server.yaml")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run folder after its last completed round")
    p.add_argument("--insecure", action="store_true",
                   help="plain-text HTTP, no node authentication (test networks only)")
    p.add_argument("--keep-running", action="store_true",
                   help="leave the SuperLink running after the run")
    p.add_argument("--verbose", action="store_true",
                   help="show the ServerApp's Flower log (INFO, DEBUG, deprecation notices)")
    p.set_defaults(func=_server_start)
    p = ssub.add_parser("register-site", help="admit a hospital's public key "
                                              "(flwr supernode register)")
    p.add_argument("--config", required=True, help="server.yaml of the running server")
    p.add_argument("--key", required=True, help="the hospital's .pub file")
    p.add_argument("--name", help="site name (default: the key's file name)")
    p.add_argument("--run-dir", help="run folder of the running server (default: "
                                     "server.run_dir)")
    p.set_defaults(func=_server_register)

    client = sub.add_parser("client", help="the hospital daemon (Flower SuperNode)")
    asub = client.add_subparsers(dest="client_command", required=True)
    p = asub.add_parser("start", help="run the hospital daemon until stopped")
    p.add_argument("--config", required=True, help="site.yaml")
    p.add_argument("--insecure", action="store_true",
                   help="plain-text HTTP, no node authentication (test networks only)")
    p.add_argument("--verbose", action="store_true",
                   help="show the ClientApp's Flower log (INFO, DEBUG, deprecation notices)")
    p.set_defaults(func=_client_start)
    p = asub.add_parser("check", help="preflight: data, server, certificate, key, resources")
    p.add_argument("--config", required=True, help="site.yaml")
    p.add_argument("--insecure", action="store_true", help="skip the TLS and key checks")
    p.add_argument("--data-stats", action="store_true",
                   help="only compute this site's data statistics and show what the data "
                        "check before round 1 would send (nothing is sent)")
    p.add_argument("--model", help="--data-stats: preprocess as this model file does "
                                   "(default: the data defaults and dataset.json)")
    p.set_defaults(func=_client_check)
    p = asub.add_parser("drift", help="have new scans drifted from this site's data? (exit 0: "
                                      "no, 1: drift, 2: error; nothing is sent)")
    p.add_argument("--config", required=True, help="site.yaml")
    p.add_argument("--model", required=True, help="the model the site uses (.pt)")
    p.add_argument("--data", required=True,
                   help="the new scans: an MSD folder (dataset.json, labels: Dice is "
                        "compared) or a folder of NIfTI images (uncertainty is compared)")
    p.add_argument("--no-model-check", action="store_true",
                   help="compare intensities only (skip the model's Dice / uncertainty)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.set_defaults(func=_client_drift)
    p = asub.add_parser("status", help="what ran on this site's data: runs accepted and "
                                       "refused, rounds, epsilon, what was sent (local only)")
    p.add_argument("--config", required=True, help="site.yaml")
    p.add_argument("--json", action="store_true", help="print the view as JSON")
    p.add_argument("--serve", action="store_true",
                   help="serve the view as a local web page instead of printing it")
    p.add_argument("--host", default="127.0.0.1",
                   help="--serve: address to bind (default 127.0.0.1; any other requires a "
                        "token: FEDSCAN_STATUS_TOKEN or a printed random one)")
    p.add_argument("--port", type=int, default=8051,
                   help="--serve: port (default 8051; 0 picks a free one)")
    p.set_defaults(func=_client_status)
