"""Background robustness: Dice without post-processing on a scanner with a noisy background.

    python -m fedscan.simulations.background --out runs/background [--rounds 3]

Writes a held-out phantom scanner the federation never sees, whose background is what real
scans show around the head: a high Rician noise floor, an N/2 ghost of the head along the
phase-encode axis, and coil hot spots in the air (:data:`NOISY_PROFILE`,
:func:`air_artefacts`). Then trains the default phantom federation twice, without and
with ``train.background_augmentation`` (everything else equal), and prints each model's Dice
on the default held-out scanner and on the noisy one, raw (no post-processing) beside the
largest-connected-component figure. ``--reuse`` evaluates models already trained in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

from fedscan.shared.data import read_label, read_test_set
from fedscan.shared.inference import load_segmentation_model, predict_volume
from fedscan.shared.metrics import case_metrics, native_spacing
from fedscan.simulations.phantoms import (
    ScannerProfile,
    case_rngs,
    ensure_default_federation,
    render,
    sample_anatomy,
    write_dataset,
)

#: A scanner unlike the training sites': another orientation, spacing and field of view
#: (more air), stronger bias, a noise floor 1.3-4x theirs, stored as int16.
NOISY_PROFILE = ScannerProfile("noisy", "RPI", (4.0, 3.8, 4.2), fov_mm=(256.0, 256.0, 240.0),
                               gamma=1.1, bias_strength=0.3, noise_std=0.08, scale=2000.0,
                               dtype="int16")


def air_artefacts(ghost: float = 0.15, hot_spots: int = 2, hot_level: float = 0.7
                         ) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """Artefacts that put signal into the air around a head, for :func:`render`.

    Args:
        ghost: amplitude of the N/2 ghost (the head shifted by half the field of view along
            voxel axis 1, the phase-encode axis, wrapping around), relative to the head.
        hot_spots: Gaussian blobs of coil signal near the corners of the field of view.
        hot_level: their peak, relative to the head's brightest tissue (about 1).

    Returns:
        ``artefacts(signal, rng) -> signal``.
    """
    def add(signal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = signal + ghost * np.roll(signal, signal.shape[1] // 2, axis=1)
        grid = np.meshgrid(*(np.arange(n) for n in signal.shape), indexing="ij")
        for _ in range(hot_spots):
            # A corner of the field of view (air), 5-15 % in from its edges.
            centre = [rng.uniform(0.05, 0.15) * n if rng.random() < 0.5
                      else rng.uniform(0.85, 0.95) * n for n in signal.shape]
            sigma = rng.uniform(2.0, 4.0)  # voxels
            dist2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
            out = out + hot_level * rng.uniform(0.7, 1.0) * np.exp(-dist2 / (2 * sigma**2))
        return out

    return add


def write_noisy_heldout(folder: Path, n_cases: int = 4, seed: int = 0) -> Path:
    """Write the noisy-background held-out scanner (:data:`NOISY_PROFILE`) as an MSD folder.

    Returns:
        ``folder``.
    """
    folder = Path(folder)
    if (folder / "dataset.json").is_file():
        return folder
    cases = []
    for index in range(n_cases):
        anatomy_rng, scanner_rng = case_rngs(seed, "noisy", index)
        image, label, affine = render(sample_anatomy(anatomy_rng), NOISY_PROFILE, scanner_rng,
                                      artefacts=air_artefacts())
        cases.append((f"noisy_{index:03d}", image, label, affine))
    write_dataset(folder, cases, None, "Head phantoms from an unseen scanner with a noisy "
                  "background: Rician noise floor, N/2 ghost, coil hot spots")
    return folder


def score(model_path: Path, folder: Path) -> dict[str, float]:
    """Mean Dice over a test set's cases, raw and with the largest connected component."""
    cfg, model, device = load_segmentation_model(model_path, "cpu")
    n = cfg.data.num_classes
    raw, largest = [], []
    for case in read_test_set(folder, num_classes=n, in_channels=cfg.data.in_channels,
                              check=False):
        for keep, scores in ((False, raw), (True, largest)):
            pred, img = predict_volume(model, case["image"], cfg, device,
                                       largest_component=keep)
            label = read_label(case["label"], n, pred.shape)
            scores.append(case_metrics(pred, label, n, native_spacing(img), hd95=False)["dice"])
    return {"raw": float(np.mean(raw)), "largest_component": float(np.mean(largest)),
            "worst_raw": float(np.min(raw))}


def train(out: Path, robust: bool, rounds: int, local_steps: int) -> Path:
    """Train the default phantom federation into ``out`` and return its final model: with
    ``robust``, ``train.background_augmentation`` (else the training before it)."""
    from fedscan.simulations.run import simulate

    config = out / "input.yaml"
    out.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump({
        "rounds": rounds, "evaluate": {"hd95": False},
        "train": {"local_steps": local_steps, "background_augmentation": robust}}))
    simulate(config, None, out / "run")
    return out / "run" / "final_model.pt"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedscan.simulations.background",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="destination folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=50)
    parser.add_argument("--cases", type=int, default=4, help="noisy held-out cases")
    parser.add_argument("--reuse", action="store_true",
                        help="evaluate the models already trained in --out")
    args = parser.parse_args(argv)
    started = time.time()
    sets = {"heldout": ensure_default_federation()["heldout"],
            "noisy": write_noisy_heldout(args.out / "noisy-heldout", args.cases)}
    rows = []
    for name, robust in (("before", False), ("after", True)):
        model = args.out / name / "run" / "final_model.pt"
        if not (args.reuse and model.is_file()):
            print(f"== training '{name}' (background_augmentation: "
                  f"{robust}; {args.rounds} rounds x {args.local_steps} steps)", flush=True)
            model = train(args.out / name, robust, args.rounds, args.local_steps)
        for test, folder in sets.items():
            rows.append({"model": name, "test_set": test, **score(model, folder)})
    lines = [f"{'model':8} {'test set':9} {'dice raw':>9} {'largest comp.':>14} {'worst raw':>10}"]
    lines += [f"{r['model']:8} {r['test_set']:9} {r['raw']:9.4f} {r['largest_component']:14.4f} "
              f"{r['worst_raw']:10.4f}" for r in rows]
    table = "\n".join(lines)
    (args.out / "background.json").write_text(json.dumps(rows, indent=1))
    (args.out / "background.txt").write_text(table + "\n")
    print(table, f"\n({time.time() - started:.0f} s; {args.out / 'background.txt'})", flush=True)


if __name__ == "__main__":
    main()
