"""The ``fedscan`` command: parse arguments, call one function, turn user errors into one line."""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

from fedscan.shared.errors import FedscanError


def _simulate(args: argparse.Namespace) -> int:
    from fedscan.simulations.run import simulate

    if args.mode is None:
        modes = None  # the config's ``mode``
    else:
        modes = ["federated", "local", "pooled"] if args.mode == "all" else args.mode.split(",")
    if args.resume and (args.config or args.mode):
        raise FedscanError("--resume continues a run with its own config.yaml: give neither "
                           "--config nor --mode")
    simulate(args.config, modes, Path(args.out), rounds=args.rounds,
             status=_status_options(args), resume=Path(args.resume) if args.resume else None)


def _status_options(args: argparse.Namespace):
    """The status page's options from ``--status``/``--status-host``/``--status-port``, or
    None when none of them was given."""
    if not (args.status or args.status_host or args.status_port is not None):
        return None
    from fedscan.shared.status.serve import DEFAULT_PORT, StatusOptions

    return StatusOptions(host=args.status_host or "127.0.0.1",
                         port=DEFAULT_PORT if args.status_port is None else args.status_port)


def _dashboard(args: argparse.Namespace) -> int:
    from fedscan.shared.status.serve import StatusOptions, StatusServer, warn_plain_http

    run_dir = Path(args.run_dir)
    if not (run_dir / "summary.json").is_file() and not (run_dir / "live.json").is_file():
        raise FedscanError(f"{run_dir}: not a run folder (no summary.json or live.json)")
    options = StatusOptions(host=args.host, port=args.port)
    server = StatusServer(run_dir.resolve(), options)
    print(f"fedscan: status page of {run_dir} at {server.url} (Ctrl-C stops it)", flush=True)
    warn_plain_http(options)
    server.serve_forever()
    return 0


def _predict(args: argparse.Namespace) -> int:
    from fedscan.shared.dicom_io import is_dicom_input

    if is_dicom_input(args.image):
        from fedscan.shared.dicom_predict import predict_dicom

        written = predict_dicom(args.model, args.image, args.out, seg_out=args.seg_out,
                                largest_component=args.largest_component, device=args.device)
        for path in written:
            print(f"wrote {path}")
        return 0
    if args.seg_out:
        raise FedscanError("--seg-out needs a DICOM series as --image (a SEG references one)")
    from fedscan.shared.inference import predict_file

    out = predict_file(args.model, args.image, args.out,
                       largest_component=args.largest_component, device=args.device)
    print(f"wrote {out}")
    return 0


def _import_dicom(args: argparse.Namespace) -> int:
    from fedscan.shared.dicom_import import format_report, import_dicom

    labels = [n.strip() for n in args.labels.split(",")] if args.labels else None
    report = import_dicom(args.dicom, args.out, labels=labels, skip_bad=args.skip_bad,
                          mapping=args.mapping,
                          warn=lambda line: print(line, file=sys.stderr))
    for line in format_report(report):
        print(line)
    return 0


def _harmonize(args: argparse.Namespace) -> int:
    from fedscan.shared.inference import harmonise_file

    out = harmonise_file(args.model, args.image, args.out, device=args.device)
    print(f"wrote {out}")
    return 0


def _phantoms(args: argparse.Namespace) -> int:
    from fedscan.simulations.phantoms import generate_federation

    for name, folder in generate_federation(Path(args.out), seed=args.seed).items():
        print(f"{name}: {folder}")
    return 0


def _check_data(args: argparse.Namespace) -> int:
    from fedscan.shared.data import describe, read_dataset

    site = read_dataset(args.data, num_classes=args.num_classes, check=True)
    print(f"{site.root}: OK, {len(site.train)} training and {len(site.validation)} "
          f"validation cases{describe(site)}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fedscan.simulations import bench

    args.out = args.out or f"runs/bench-{args.what}"
    if args.what == "status-overhead":
        from fedscan.simulations import bench_status

        result = bench_status.status_overhead(Path(args.out), rounds=args.rounds or 3)
        print(bench_status.format_status_overhead(result))
    elif args.what == "scale":
        from fedscan.simulations import bench_scale

        try:
            sizes = [int(n) for n in args.sites.split(",")]
        except ValueError:
            raise FedscanError(f"--sites: expected numbers like 10,100,1000, got "
                               f"{args.sites!r}") from None
        print(bench_scale.format_scale(bench_scale.scale(Path(args.out), sizes)))
    elif args.what == "dp-overhead":
        print(bench.format_overhead(bench.dp_overhead(repeats=args.repeats)))
    else:
        rows = bench.dp_utility(Path(args.out), rounds=args.rounds)
        print(bench.format_utility(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedscan", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="simulate a federation of hospitals on this machine")
    p.add_argument("--config", help="YAML config (default: the embedded phantom federation)")
    p.add_argument("--mode",
                   help="federated | local | pooled | all, or a comma list (default: the "
                        "config's mode, federated unless it says otherwise)")
    p.add_argument("--out", default="runs/default", help="output folder (default: runs/default)")
    p.add_argument("--rounds", type=int, help="override the config's rounds")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the federated run in DIR after its last completed round "
                        "(its config.yaml; --rounds N to run more rounds)")
    p.add_argument("--status", action="store_true",
                   help="serve the live status page while the run goes (default "
                        "http://127.0.0.1:8050/)")
    p.add_argument("--status-port", type=int, default=None,
                   help="status page port (implies --status; 0 picks a free one)")
    p.add_argument("--status-host", default=None,
                   help="status page address (implies --status; default 127.0.0.1; any other "
                        "address requires a token: FEDSCAN_STATUS_TOKEN or a printed random "
                        "one)")
    p.add_argument("--verbose", action="store_true",
                   help="show Flower's log (INFO and DEBUG, deprecation notices) and every "
                        "site's step lines (default: one progress display)")
    p.set_defaults(func=_simulate)

    p = sub.add_parser("dashboard", help="serve the status page of a run folder (live or "
                                         "finished)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (summary.json, live.json)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any other requires a token)")
    p.add_argument("--port", type=int, default=8050, help="port (default 8050; 0: a free one)")
    p.set_defaults(func=_dashboard)

    p = sub.add_parser("predict", help="segment a NIfTI scan or DICOM series with a trained "
                                       "model")
    p.add_argument("--model", required=True, help="final_model.pt from a run")
    p.add_argument("--image", required=True,
                   help="input NIfTI (any orientation and spacing), or a folder holding one "
                        "DICOM series")
    p.add_argument("--out", required=True, help="output label NIfTI (input's grid)")
    p.add_argument("--seg-out", help="DICOM input only: also write a DICOM SEG (.dcm) "
                                     "referencing the series, for a PACS")
    p.add_argument("--largest-component", action="store_true",
                   help="keep only the largest connected component (brain masks)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.set_defaults(func=_predict)

    p = sub.add_parser("harmonize", help="translate a scan into the consortium's reference "
                                         "domain with a trained harmonisation model")
    p.add_argument("--model", required=True,
                   help="a site's site_model.pt (its own intensity curves; in a simulation "
                        "DIR/site-state/SITE/site_model.pt), or a run's final_model.pt "
                        "(shared weights only, identity curves)")
    p.add_argument("--image", required=True, help="input NIfTI (any orientation and spacing)")
    p.add_argument("--out", required=True, help="output NIfTI (input's shape and affine)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.set_defaults(func=_harmonize)

    p = sub.add_parser("import-dicom", help="turn DICOM series (and SEG or NIfTI labels) into a "
                                            "site folder in the data contract (local only)")
    p.add_argument("--dicom", required=True,
                   help="folder searched recursively for DICOM series (any structure)")
    p.add_argument("--out", required=True, help="new site folder (MSD layout, dataset.json)")
    p.add_argument("--labels", help="foreground class names in class order, comma-separated "
                                    "(SEG segments are matched by label; default: from the SEGs)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out series that are not one regular volume (with a warning) "
                        "instead of stopping")
    p.add_argument("--mapping", help="where the case id -> series CSV goes "
                                     "(default: OUT/dicom_import.csv)")
    p.set_defaults(func=_import_dicom)

    p = sub.add_parser("phantoms", help="write the synthetic phantom hospitals to a folder")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_phantoms)

    p = sub.add_parser("check-data", help="validate a site's dataset folder (data contract)")
    p.add_argument("--data", required=True, help="folder with dataset.json")
    p.add_argument("--num-classes", type=int, default=None)
    p.set_defaults(func=_check_data)

    p = sub.add_parser("bench", help="benchmarks: DP step overhead, Dice at several epsilons, "
                                     "status page overhead")
    p.add_argument("what", choices=["dp-overhead", "dp-utility", "status-overhead", "scale"],
                   help="dp-overhead: DP vs plain step time per Opacus mode; dp-utility: the "
                        "default federation at epsilon 1, 3, 8 and inf; status-overhead: the "
                        "same small federation without and with the status page; scale: "
                        "wall time per round, peak memory of the process tree and framework "
                        "overhead per site-round at several federation sizes")
    p.add_argument("--out", default=None,
                   help="dp-utility, status-overhead: output folder (default: "
                        "runs/bench-<what>)")
    p.add_argument("--rounds", type=int,
                   help="dp-utility, status-overhead: override the rounds")
    p.add_argument("--repeats", type=int, default=15, help="dp-overhead: timed steps per mode")
    p.add_argument("--sites", default="10,100,1000",
                   help="scale: federation sizes, comma-separated (default 10,100,1000)")
    p.set_defaults(func=_bench)

    from fedscan.deploy_cli import add_deployment_commands

    add_deployment_commands(sub)  # certs, server, client
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        from fedscan.shared.console import set_verbose

        set_verbose(True)  # before any Flower process or Ray worker starts: they inherit it
    if args.command == "simulate" and args.mode not in (None, "all"):
        bad = [m for m in args.mode.split(",") if m not in ("federated", "local", "pooled")]
        if bad:
            print(f"fedscan: error: --mode: unknown mode {bad[0]!r}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except FedscanError as exc:
        print(f"fedscan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedscan: interrupted; outputs written so far are kept", file=sys.stderr)
        _exit_if_threads_linger(130)
        return 130


def _exit_if_threads_linger(code: int) -> None:
    """Exit now when worker threads outlive Ctrl-C: Flower's simulation engine keeps its
    (non-daemon) threads and Ray actors waiting, so the interpreter would never finish. Ray is
    shut down first (bounded) so no actor is left behind; every output was already written."""
    lingering = [t for t in threading.enumerate()
                 if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if not lingering:
        return
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        stopper = threading.Thread(target=ray.shutdown, daemon=True)
        stopper.start()
        stopper.join(timeout=15)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
