"""Drift must-show: per-scan detection and false-alarm rates of ``fedscan client drift``'s
intensity test.

``python -m fedscan.simulations.drift [--scans 20] [--out FOLDER]``

The site is the default federation's ``site-a`` (its data folder is the reference, as
``fedscan client drift`` uses it). New scans are rendered from new heads (seeds no site
has used): ``--scans`` under site-a's own scanner profile (any flagged one is a false
alarm), and as many under each unseen profile: the federation's held-out scanner (a
milder change: other orientation, spacing, contrast 1.2) and a new scanner (contrast 2.0,
stronger bias field and noise). Each scan is decided on its own (per-scan decisions, the
rates are over scans); each batch of :data:`BATCH` scans is also decided as
``fedscan client drift`` decides a folder. The model-based half of the command (Dice or
uncertainty) is not part of these rates. With ``--out`` the scans are kept as MSD folders
(``own/``, ``heldout/``, ``new-scanner/``) for ``fedscan client drift --data``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from fedscan.client.drift import MAX_REFERENCE, DriftThresholds, reference_profile
from fedscan.shared.config import DataConfig
from fedscan.shared.data import read_dataset
from fedscan.shared.data_stats import case_stats, js_distance, sample_cases
from fedscan.simulations.phantoms import (
    HELDOUT_PROFILE,
    SITE_PROFILES,
    ScannerProfile,
    ensure_default_federation,
    write_phantom_site,
)

#: Scans per batch for the folder-level decision.
BATCH = 5
#: A scanner no site has: stronger contrast curve, bias field and noise.
NEW_SCANNER = ScannerProfile("new-scanner", "RAS", (4.0, 4.0, 4.0), gamma=2.0,
                             bias_strength=0.4, noise_std=0.06, dtype="float32")


def write_scans(folder: Path, profile: ScannerProfile, n: int, seed: int = 7) -> Path:
    """``n`` new heads under ``profile`` as an MSD folder (labels included); their random
    streams are keyed ``drift-<profile>``, so no site's patient appears."""
    write_phantom_site(folder, f"drift-{profile.name}", profile, n, None, seed)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="drift detection and false-alarm rates")
    parser.add_argument("--scans", type=int, default=20, help="scans per profile (default 20)")
    parser.add_argument("--out", type=Path, help="keep the generated scans here")
    args = parser.parse_args(argv)
    data = DataConfig()  # the default run's preprocessing
    thresholds = DriftThresholds()
    site = read_dataset(ensure_default_federation()["site-a"], name="site-a", check=False)
    reference = sample_cases(site.cases, MAX_REFERENCE)
    mean, threshold = reference_profile(
        [case_stats(c, data, with_label=False).intensity() for c in reference])
    print(f"reference: {len(reference)} of site-a's {len(site.cases)} cases; per-scan "
          f"threshold JS {threshold:.3f}", flush=True)
    root = args.out or Path(tempfile.mkdtemp(prefix="fedscan-drift-"))
    groups = {"own": SITE_PROFILES["site-a"], "heldout": HELDOUT_PROFILE,
              "new-scanner": NEW_SCANNER}
    for name, profile in groups.items():
        folder = root / name
        if not (folder / "dataset.json").is_file():
            write_scans(folder, profile, args.scans)
        cases = read_dataset(folder, name=name, check=False).cases
        d = np.array([js_distance(case_stats(c, data, with_label=False).intensity(), mean)
                      for c in cases])
        off = d > threshold
        batches = [off[i:i + BATCH] for i in range(0, len(off) - BATCH + 1, BATCH)]
        drifted = sum(b.mean() > thresholds.max_off_share for b in batches)
        what = "false alarms" if name == "own" else "detected"
        print(f"{name:<12} {len(d)} scans: JS median {np.median(d):.3f} (range "
              f"{d.min():.3f}-{d.max():.3f}); per scan {what} {off.sum()}/{len(d)} "
              f"({100 * off.mean():.0f} %); batches of {BATCH} flagged drifted "
              f"{drifted}/{len(batches)}", flush=True)
    print(f"scans in {root}", flush=True)


if __name__ == "__main__":
    main()
