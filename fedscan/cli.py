"""The ``fedscan`` command: parse arguments, call one function, turn user errors into one line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedscan.shared.errors import FedscanError


def _simulate(args: argparse.Namespace) -> int:
    from fedscan.simulations.run import simulate

    modes = ["federated", "local", "pooled"] if args.mode == "all" else args.mode.split(",")
    simulate(args.config, modes, Path(args.out), rounds=args.rounds)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from fedscan.shared.inference import predict_file

    out = predict_file(args.model, args.image, args.out,
                       largest_component=args.largest_component, device=args.device)
    print(f"wrote {out}")
    return 0


def _harmonize(args: argparse.Namespace) -> int:
    from fedscan.shared.harmonisation_io import harmonise_file

    out = harmonise_file(args.model, args.image, args.out, device=args.device)
    print(f"wrote {out}")
    return 0


def _phantoms(args: argparse.Namespace) -> int:
    from fedscan.shared.phantoms import generate_federation

    for name, folder in generate_federation(Path(args.out), seed=args.seed).items():
        print(f"{name}: {folder}")
    return 0


def _check_data(args: argparse.Namespace) -> int:
    from fedscan.shared.data import read_dataset

    site = read_dataset(args.data, num_classes=args.num_classes, check=True)
    print(f"{site.root}: OK, {len(site.train)} training and {len(site.validation)} "
          f"validation cases")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fedscan.simulations import bench

    if args.what == "dp-overhead":
        print(bench.format_overhead(bench.dp_overhead(repeats=args.repeats)))
    elif args.what == "attacks":
        from fedscan.simulations import attacks

        rounds = args.rounds or attacks.ROUNDS
        out = Path(args.out or "runs/bench-attacks")
        print(attacks.format_attacks(attacks.attack_bench(out, rounds=rounds)))
    else:
        rows = bench.dp_utility(Path(args.out or "runs/bench-dp-utility"), rounds=args.rounds)
        print(bench.format_utility(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedscan", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="simulate a federation of hospitals on this machine")
    p.add_argument("--config", help="YAML config (default: the embedded phantom federation)")
    p.add_argument("--mode", default="federated",
                   help="federated | local | pooled | all, or a comma list (default: federated)")
    p.add_argument("--out", default="runs/default", help="output folder (default: runs/default)")
    p.add_argument("--rounds", type=int, help="override the config's rounds")
    p.set_defaults(func=_simulate)

    p = sub.add_parser("predict", help="segment a NIfTI scan with a trained model")
    p.add_argument("--model", required=True, help="final_model.pt from a run")
    p.add_argument("--image", required=True, help="input NIfTI (any orientation and spacing)")
    p.add_argument("--out", required=True, help="output label NIfTI (input's grid)")
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

    p = sub.add_parser("phantoms", help="write the synthetic phantom hospitals to a folder")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_phantoms)

    p = sub.add_parser("check-data", help="validate a site's dataset folder (data contract)")
    p.add_argument("--data", required=True, help="folder with dataset.json")
    p.add_argument("--num-classes", type=int, default=None)
    p.set_defaults(func=_check_data)

    p = sub.add_parser("bench", help="benchmarks: DP step overhead, Dice at several epsilons, "
                                     "one dishonest site among four")
    p.add_argument("what", choices=["dp-overhead", "dp-utility", "attacks"],
                   help="dp-overhead: DP vs plain step time per Opacus mode; dp-utility: the "
                        "default federation at epsilon 1, 3, 8 and inf; attacks: four "
                        "hospitals, one of which lies (10^9 cases, NaN samples, a 5x "
                        "sign-flipped update, Dice 1e9), against the honest run")
    p.add_argument("--out", default=None,
                   help="output folder (default: runs/bench-dp-utility, runs/bench-attacks)")
    p.add_argument("--rounds", type=int,
                   help="dp-utility, attacks: override the rounds (attacks: 4)")
    p.add_argument("--repeats", type=int, default=15, help="dp-overhead: timed steps per mode")
    p.set_defaults(func=_bench)

    from fedscan.deploy_cli import add_deployment_commands

    add_deployment_commands(sub)  # certs, server, client
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "simulate" and args.mode != "all":
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
        return 130


if __name__ == "__main__":
    sys.exit(main())
