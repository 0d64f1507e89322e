"""A clinical-style test federation: real anatomy, 2-channel 4D images, left/right classes.

``python -m fedscan.simulations.clinical --out DIR`` generates (once; cached by its options)
three real-anatomy hospitals in three orientations and spacings (RAS 1.5 mm, LPS 1.2x1.2x3 mm
int16, PIL 0.9x0.9x5 mm uint16) and a held-out fourth scanner (RSP 1x1x4 mm, noisier), with
T1 and T2 channels and a label set that has left/right pairs (``hemispheres``: left and right
hemisphere, left and right ventricle; or ``parcellation``: left and right grey matter, white
matter, ventricles), then writes ``DIR/federation.yaml``: the training settings of
``simulations/configs/<label set>.yaml`` with the generated sites and the held-out test set.

    python -m fedscan.simulations.clinical --out runs/clinical-data
    fedscan simulate --config runs/clinical-data/federation.yaml --out runs/clinical

The run's summary.json and report then hold each class's Dice on the held-out scanner.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from fedscan.simulations import realanatomy as R

CONFIGS = Path(__file__).resolve().parent / "configs"


def write_study(out: Path, *, label_set: str = "hemispheres", cases: int = 12,
                validation: int = 3, heldout_cases: int = 3, seed: int = 0) -> Path:
    """Generate the federation under ``out`` (unless there) and write its run config.

    Args:
        out: destination folder.
        label_set: ``hemispheres`` or ``parcellation`` (:data:`~realanatomy.LABEL_SETS`).
        cases: cases per site.
        validation: of which the last are each site's validation cases.
        heldout_cases: cases of the held-out scanner (the test set).
        seed: anatomy and scanner seed.

    Returns:
        The config file (``out/federation.yaml``).
    """
    out = Path(out).resolve()  # the config names absolute folders
    layout = tuple((name, R.SITE_PROFILES[name], cases, validation)
                   for name in ("site-a", "site-b", "site-c"))
    fed = R.write_federation(out / "data", seed, layout=layout,
                             heldout=("heldout", R.HELDOUT_PROFILE, heldout_cases),
                             reference_cases=0, channels=2, label_set=label_set,
                             paired_truth=False, progress=lambda line: print(line, flush=True))
    cfg = yaml.safe_load((CONFIGS / f"{label_set}.yaml").read_text())
    cfg["sites"] = [{"name": name, "data": str(path)} for name, path in fed.sites.items()]
    cfg["test_sets"] = [{"name": "heldout", "data": str(fed.heldout)}]
    path = out / "federation.yaml"
    path.write_text(f"# Written by python -m fedscan.simulations.clinical from "
                    f"simulations/configs/{label_set}.yaml\n"
                    + yaml.safe_dump(cfg, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedscan.simulations.clinical",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="destination folder")
    parser.add_argument("--label-set", default="hemispheres",
                        choices=["hemispheres", "parcellation"])
    parser.add_argument("--cases", type=int, default=12, help="cases per site")
    parser.add_argument("--heldout-cases", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_study(args.out, label_set=args.label_set, cases=args.cases,
                       heldout_cases=args.heldout_cases, seed=args.seed)
    print(f"wrote {path}\nrun it: fedscan simulate --config {path} --out runs/clinical")


if __name__ == "__main__":
    main()
