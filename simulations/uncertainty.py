"""Does the uncertainty mean something? Wrong voxels against correct ones, and scans ranked.

    python -m fedscan.simulations.uncertainty --model RUN/final_model.pt --data HELDOUT [...]
        [--validation SITE ...] [--passes 8]

For every case of the ``--data`` MSD folders (and the validation cases of the
``--validation`` ones), predicts with ``--passes``
stochastic passes (:func:`~fedscan.shared.uncertainty.predict_with_uncertainty`), then prints
per case its Dice (mean over foreground classes), uncertainty score and the mean uncertainty
of its wrong and correct voxels (inside prediction or reference foreground); then the pooled
wrong/correct ratio (> 1: the map points at the errors) and the Spearman rank correlation of
Dice and score over the cases (< 0: lower Dice, higher score).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from scipy.stats import spearmanr

from fedscan.shared.data import case_id, read_dataset, read_label, read_test_set
from fedscan.shared.inference import load_segmentation_model
from fedscan.shared.metrics import case_metrics
from fedscan.shared.uncertainty import error_uncertainty, predict_with_uncertainty


def study(model_path: Path, folders: list[Path], passes: int, device: str = "auto",
          validation: list[Path] | None = None) -> list[dict[str, float | str]]:
    """One row per case: ``case``, ``dice``, ``score``, ``wrong``/``correct`` (mean
    uncertainty) and their voxel counts ``n_wrong``/``n_correct``.

    Args:
        model_path: a saved segmentation model.
        folders: MSD folders whose every case is scored (held-out scanners).
        passes: stochastic passes per scan.
        device: ``auto``, ``cpu``, ``cuda``.
        validation: MSD folders whose validation cases only are scored (training sites).
    """
    cfg, model, dev = load_segmentation_model(model_path, device)
    n, c = cfg.data.num_classes, cfg.data.in_channels
    cases = [case for folder in folders
             for case in read_test_set(folder, num_classes=n, in_channels=c, check=False)]
    cases += [case for folder in validation or []
              for case in read_dataset(folder, num_classes=n, in_channels=c, check=False,
                                       val_fraction=cfg.data.val_fraction,
                                       split_seed=cfg.data.split_seed).validation]
    rows = []
    for case in cases:
        started = time.time()
        result = predict_with_uncertainty(model, case["image"], cfg, dev, passes)
        reference = read_label(case["label"], cfg.data.num_classes, result.labels.shape)
        dice = case_metrics(result.labels, reference, cfg.data.num_classes, (1, 1, 1),
                            hd95=False)["dice"]
        wrong, right, n_wrong, n_right = error_uncertainty(result.labels, reference,
                                                           result.uncertainty)
        rows.append({"case": case_id(case), "dice": dice, "score": result.score,
                     "wrong": wrong, "correct": right, "n_wrong": n_wrong,
                     "n_correct": n_right, "method": result.method})
        print(f"{rows[-1]['case']}: dice {dice:.4f} score {result.score:.4f} "
              f"wrong {wrong:.4f} correct {right:.4f} ({time.time() - started:.0f}s)",
              flush=True)
    return rows


def summarise(rows: list[dict]) -> str:
    """Pooled wrong/correct ratio and the Spearman correlation of Dice and score."""
    n_wrong = sum(r["n_wrong"] for r in rows)
    n_right = sum(r["n_correct"] for r in rows)
    wrong = sum(r["wrong"] * r["n_wrong"] for r in rows if r["n_wrong"]) / max(n_wrong, 1)
    right = sum(r["correct"] * r["n_correct"] for r in rows if r["n_correct"]) / max(n_right, 1)
    rho = spearmanr([r["dice"] for r in rows], [r["score"] for r in rows]).statistic \
        if len(rows) > 2 else float("nan")
    per_case = [r["wrong"] / r["correct"] for r in rows
                if r["n_wrong"] and r["correct"] and math.isfinite(r["wrong"])]
    return (f"{len(rows)} cases, {rows[0]['method'] if rows else '-'} passes\n"
            f"mean uncertainty of wrong voxels {wrong:.4f} ({n_wrong}), of correct voxels "
            f"{right:.4f} ({n_right}): error/correct ratio {wrong / right:.2f} "
            f"(per case {min(per_case, default=float('nan')):.2f}-"
            f"{max(per_case, default=float('nan')):.2f})\n"
            f"Spearman rank correlation of Dice and uncertainty score: {rho:.3f} "
            f"(negative: lower Dice, higher score)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedscan.simulations.uncertainty",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, nargs="+", required=True,
                        help="MSD folders (every case is scored)")
    parser.add_argument("--validation", type=Path, nargs="*", default=[],
                        help="MSD folders whose validation cases are scored")
    parser.add_argument("--passes", type=int, default=8)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    rows = study(args.model, args.data, args.passes, args.device, args.validation)
    print(summarise(rows))


if __name__ == "__main__":
    main()
