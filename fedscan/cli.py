"""The ``fedscan`` command: parse arguments, call one function, turn user errors into one line."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from types import ModuleType

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


def _cross_site(args: argparse.Namespace) -> int:
    from fedscan.simulations.run import cross_site

    if args.fine_tune_steps is not None and args.fine_tune_steps < 1:
        print("fedscan: error: --fine-tune-steps must be >= 1", file=sys.stderr)
        return 2
    cross_site(Path(args.run), args.fine_tune_steps)
    return 0


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

        if args.uncertainty is not None:
            raise FedscanError("--uncertainty needs a NIfTI --image")

        written = predict_dicom(args.model, args.image, args.out, seg_out=args.seg_out,
                                largest_component=args.largest_component, device=args.device)
        for path in written:
            print(f"wrote {path}")
        return _score(args)
    if args.seg_out:
        raise FedscanError("--seg-out needs a DICOM series as --image (a SEG references one)")
    if args.uncertainty is not None:
        return _predict_uncertain(args)
    from fedscan.shared.inference import predict_file

    out = predict_file(args.model, args.image, args.out,
                       largest_component=args.largest_component, device=args.device)
    print(f"wrote {out}")
    return _score(args)


def _predict_uncertain(args: argparse.Namespace) -> int:
    """``--uncertainty N``: the label map, an uncertainty map beside it and the scan's score;
    with ``--label`` also the wrong/correct voxels' mean uncertainty."""
    from fedscan.shared.data import read_label
    from fedscan.shared.uncertainty import error_uncertainty, predict_file_with_uncertainty

    if args.uncertainty < 2:
        raise FedscanError("--uncertainty needs at least 2 passes")
    if args.largest_component:
        raise FedscanError("--largest-component and --uncertainty: choose one")
    out, map_path, result = predict_file_with_uncertainty(args.model, args.image, args.out,
                                                          args.uncertainty, device=args.device)
    print(f"wrote {out}\nwrote {map_path}")
    print(f"uncertainty score {result.score:.4f} (normalised entropy, mean over foreground "
          f"classes of their voxels' mean; {args.uncertainty} {result.method} passes)")
    if args.label:
        reference = read_label(args.label, None, result.labels.shape)
        wrong, right, n_wrong, n_right = error_uncertainty(result.labels, reference,
                                                           result.uncertainty)
        ratio = f"{wrong / right:.2f}" if right > 0 else "undefined"
        print(f"uncertainty of wrong voxels {wrong:.4f} ({n_wrong}), of correct voxels "
              f"{right:.4f} ({n_right}): ratio {ratio}")
    return _score(args)


def _score(args: argparse.Namespace) -> int:
    """With ``--label``: the prediction's per-class Dice and HD95 against the reference."""
    if not args.label:
        return 0
    from fedscan.shared.inference import score_prediction
    from fedscan.shared.report import format_class_table

    metrics, names = score_prediction(args.model, args.out, args.label)
    print(f"scored against {args.label}:")
    print(format_class_table(metrics, names[1:]))
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

    folders = generate_federation(Path(args.out), seed=args.seed,
                                  progress=lambda line: print(line, flush=True))
    for name, folder in folders.items():
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

        result = bench_status.status_overhead(Path(args.out), rounds=args.rounds or 2,
                                              repeats=args.repeats or 3)
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
        print(bench.format_overhead(bench.dp_overhead(repeats=args.repeats or 15)))
    elif args.what == "attacks":
        from fedscan.simulations import attacks

        rounds = args.rounds or attacks.ROUNDS
        print(attacks.format_attacks(attacks.attack_bench(Path(args.out), rounds=rounds)))
    else:
        print(_dp_utility(args, bench))
    return 0


def _dp_utility(args: argparse.Namespace, bench: ModuleType) -> str:
    if not args.config:
        return bench.format_utility(bench.dp_utility(Path(args.out), rounds=args.rounds))
    from fedscan.simulations.run import read_simulation_config

    epsilons = _epsilons(args.epsilons) if args.epsilons else bench.EPSILONS
    # As `fedscan simulate` reads it: a config without sites runs on the phantom hospitals.
    cfg = read_simulation_config(args.config)
    if cfg.task == "harmonisation":
        # The CycleGAN trains with its own config at every ε: the segmentation DP settings
        # (large batches, lr) do not apply to it.
        rows = bench.dp_utility(Path(args.out), epsilons=epsilons, base=cfg, privacy=None,
                                dp_train=None, rounds=args.rounds)
        return bench.format_harmonisation_utility(rows)
    rows = bench.dp_utility(Path(args.out), epsilons=epsilons, base=cfg, rounds=args.rounds)
    return bench.format_utility(rows)


def _epsilons(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise FedscanError(f"--epsilons: expected numbers like 8,inf, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise FedscanError(f"--epsilons: every value must be > 0 (inf: no DP), got {text!r}")
    return values


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

    p = sub.add_parser("cross-site", help="cross-site matrix of a finished simulated "
                                          "federated run (global and local models x sites)")
    p.add_argument("--run", required=True, metavar="DIR",
                   help="the run folder (config.yaml, final_model.pt, summary.json)")
    p.add_argument("--fine-tune-steps", type=int, default=None,
                   help="local steps each site fine-tunes the global model for (default: the "
                        "run's cross_site.fine_tune_steps)")
    p.set_defaults(func=_cross_site)

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
    p.add_argument("--label", help="a reference label NIfTI on the scan's grid: print the "
                                   "prediction's Dice and HD95 per class")
    p.add_argument("--uncertainty", type=int, metavar="N",
                   help="N stochastic passes (MC dropout if the model has dropout, else "
                        "test-time augmentation): also write OUT's _uncertainty map "
                        "(normalised entropy, input's grid) and print a per-scan score")
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
                                     "status page overhead, one dishonest site among four, "
                                     "federation size")
    p.add_argument("what", choices=["dp-overhead", "dp-utility", "status-overhead", "attacks",
                                    "scale"],
                   help="dp-overhead: DP vs plain step time per Opacus mode; dp-utility: the "
                        "default federation at epsilon 1, 3, 8 and inf; status-overhead: the "
                        "default demo (2 rounds) without and with the status page; attacks: four "
                        "hospitals, one of which lies (10^9 cases, NaN samples, a 5x "
                        "sign-flipped update, Dice 1e9), against the honest run; scale: "
                        "wall time per round, peak memory of the process tree and framework "
                        "overhead per site-round at several federation sizes")
    p.add_argument("--out", default=None,
                   help="dp-utility, status-overhead, attacks: output folder (default: "
                        "runs/bench-<what>)")
    p.add_argument("--rounds", type=int,
                   help="dp-utility, status-overhead, attacks: override the rounds")
    p.add_argument("--repeats", type=int,
                   help="dp-overhead: timed steps per mode (default 15); status-overhead: "
                        "blocks of off, on, on, off runs (default 3)")
    p.add_argument("--config",
                   help="dp-utility: the federation to run at each epsilon (default: the "
                        "embedded phantom federation); a harmonisation config reports "
                        "PSNR/SSIM against the paired truth and downstream Dice")
    p.add_argument("--epsilons",
                   help="dp-utility: comma-separated budgets (inf: no DP; default 1,3,8,inf)")
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
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _interrupted)
    try:
        return args.func(args)
    except FedscanError as exc:
        print(f"fedscan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedscan: interrupted; outputs written so far are kept", file=sys.stderr)
        _exit_if_threads_linger(130)
        return 130


def _interrupted(signum: int, frame: object) -> None:
    """Ctrl-C: quiet the libraries before their workers report dying, then stop as Python does."""
    from fedscan.shared.console import silence_libraries

    silence_libraries()
    raise KeyboardInterrupt


def _stop_child_processes(timeout: float = 5.0) -> None:
    """Terminate (then kill) every process this one started and reap them, so no Ray process
    outlives fedscan, not even as a zombie."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(alive, timeout=timeout)


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
    _stop_child_processes()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
