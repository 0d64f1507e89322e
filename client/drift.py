"""``fedscan client drift``: have a site's new scans drifted from the data its model saw?

Everything runs at the site; nothing is sent. The reference is recomputed from the site's
configured data folder (site.yaml ``data``: the cases the site trained on) with the
preprocessing stored in the model file, so it needs no extra state and cannot go stale.

Per scan: the Jensen-Shannon distance of its preprocessed intensity histogram
(:mod:`fedscan.shared.data_stats`) to the mean histogram of the reference cases. The scan
is *off* when the distance is above the site's own threshold: the largest leave-one-out
distance of its reference cases to the others' mean, times :data:`MARGIN`, so the threshold
adapts to how varied the site's own scanner is. The folder has *drifted* when more than
``max_off_share`` of its scans are off, or, where the folder has labels, when the model's
Dice on them is more than ``max_dice_drop`` below its Dice on the site's own validation
cases, or, without labels, when predict's mean uncertainty score
(:mod:`fedscan.shared.uncertainty`) is more than ``max_uncertainty_ratio`` times the one on
the validation cases.

Exit codes: 0 no drift, 1 drift, 2 error (``fedscan/deploy_cli.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedscan.shared.checkpoint import load_model
from fedscan.shared.config import Config, SiteConfig
from fedscan.shared.data import (
    DATASET_JSON,
    NIFTI_SUFFIXES,
    Case,
    case_id,
    read_site,
    read_test_set,
)
from fedscan.shared.data_stats import case_stats, js_distance, sample_cases
from fedscan.shared.errors import DataError

#: Factor on the largest leave-one-out distance of the site's own cases.
MARGIN = 1.1
#: Most reference cases preprocessed.
MAX_REFERENCE = 40


@dataclass
class DriftThresholds:
    """When a folder counts as drifted (see the module docstring)."""

    max_off_share: float = 0.25
    max_dice_drop: float = 0.1
    max_uncertainty_ratio: float = 1.5


@dataclass
class DriftResult:
    """The numbers behind a drift decision (aggregates over the new folder only)."""

    scans: int
    reference_cases: int
    threshold: float
    distances: list[float]
    off: int
    off_share: float
    dice_new: float | None = None
    dice_reference: float | None = None
    uncertainty_new: float | None = None
    uncertainty_reference: float | None = None
    reasons: list[str] = field(default_factory=list)

    @property
    def drifted(self) -> bool:
        return bool(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "drifted": self.drifted}


def reference_profile(histograms: Sequence[np.ndarray], margin: float = MARGIN
                      ) -> tuple[np.ndarray, float]:
    """The mean histogram of a site's own cases and the per-scan threshold.

    Returns:
        (mean histogram, threshold: ``margin`` times the largest distance of one case to
        the mean of the others).

    Raises:
        ValueError: fewer than 3 cases.
    """
    hists = np.stack(histograms)
    if len(hists) < 3:
        raise ValueError("drift needs at least 3 reference cases")
    total = hists.sum(axis=0)
    loo = [js_distance(h, (total - h) / (len(hists) - 1)) for h in hists]
    return total / len(hists), float(margin * max(loo))


def folder_cases(folder: str | Path, cfg: Config) -> tuple[list[Case], bool]:
    """The new scans: an MSD folder (dataset.json, with labels) or a folder of NIfTI images.

    Returns:
        (cases, whether they have labels).
    """
    folder = Path(folder)
    if (folder / DATASET_JSON).is_file():
        cases = read_test_set(folder, name=folder.name, num_classes=cfg.data.num_classes,
                              in_channels=cfg.data.in_channels, check=False)
        return cases, True
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    images = sorted(p for p in folder.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
    if not images:
        raise DataError(f"{folder}: no dataset.json and no .nii/.nii.gz images")
    return [{"image": str(p), "label": "", "case": case_id(p)} for p in images], False


def _intensities(cases: Sequence[Case], cfg: Config,
                 on_case: Callable[[str], None] | None) -> list[np.ndarray]:
    out = []
    for case in cases:
        out.append(case_stats(case, cfg.data, with_label=False).intensity())
        if on_case is not None:
            on_case(case["case"])
    return out


def _mean_uncertainty(model: Any, cases: Sequence[Case], cfg: Config, device: Any) -> float:
    from fedscan.shared.uncertainty import predict_with_uncertainty

    return float(np.mean([predict_with_uncertainty(model, c["image"], cfg, device, passes=2).score
                          for c in cases]))


def detect_drift(site: SiteConfig, model_path: str | Path, new_folder: str | Path,
                 thresholds: DriftThresholds | None = None, use_model: bool = True,
                 on_case: Callable[[str], None] | None = None) -> DriftResult:
    """Compare a folder of new scans with the site's own data (and the model's results).

    Args:
        site: the site (its configured data folder is the reference).
        model_path: the model the site uses (its preprocessing is applied to both).
        new_folder: the new scans.
        thresholds: when it counts as drift.
        use_model: also compare the model's Dice (labelled folder) or uncertainty.
        on_case: called with each case id preprocessed (progress).

    Raises:
        DataError / FedscanError: unreadable data or model.
    """
    thresholds = thresholds or DriftThresholds()
    cfg, state, _ = load_model(model_path)
    own = read_site(site, cfg.data, check=False)
    reference = sample_cases(own.cases, MAX_REFERENCE)
    mean, threshold = reference_profile(_intensities(reference, cfg, on_case))
    cases, labelled = folder_cases(new_folder, cfg)
    distances = [js_distance(h, mean) for h in _intensities(cases, cfg, on_case)]
    off = sum(d > threshold for d in distances)
    result = DriftResult(scans=len(cases), reference_cases=len(reference),
                         threshold=round(threshold, 4),
                         distances=[round(d, 4) for d in distances], off=int(off),
                         off_share=round(off / len(cases), 4))
    if result.off_share > thresholds.max_off_share:
        result.reasons.append(f"{off} of {len(cases)} scans have intensities unlike this "
                              f"site's ({100 * result.off_share:.0f} % > "
                              f"{100 * thresholds.max_off_share:g} %)")
    if use_model and cfg.task == "segmentation":
        from fedscan.shared.inference import segmentation_model

        model, device = segmentation_model(cfg, state, model_path)
        _model_checks(result, cfg, model, device, own.validation or own.train[-5:], cases,
                      labelled, thresholds)
    return result


def _model_checks(result: DriftResult, cfg: Config, model: Any, device: Any,
                  validation: list[Case], cases: list[Case], labelled: bool,
                  thresholds: DriftThresholds) -> None:
    from fedscan.shared.tasks import build_task

    task = build_task(cfg)
    if labelled:
        result.dice_reference = round(float(task.evaluate(model, validation).metrics["dice"]), 4)
        result.dice_new = round(float(task.evaluate(model, cases).metrics["dice"]), 4)
        drop = result.dice_reference - result.dice_new
        if drop > thresholds.max_dice_drop:
            result.reasons.append(f"Dice {result.dice_new:.3f} on the new scans, "
                                  f"{result.dice_reference:.3f} on this site's validation "
                                  f"cases (drop {drop:.3f} > {thresholds.max_dice_drop:g})")
    else:
        result.uncertainty_reference = round(_mean_uncertainty(model, validation, cfg, device), 4)
        result.uncertainty_new = round(_mean_uncertainty(model, cases, cfg, device), 4)
        ratio = result.uncertainty_new / max(result.uncertainty_reference, 1e-6)
        if ratio > thresholds.max_uncertainty_ratio:
            result.reasons.append(f"uncertainty {result.uncertainty_new:.4f} on the new scans, "
                                  f"{result.uncertainty_reference:.4f} on this site's "
                                  f"validation cases ({ratio:.2f}x > "
                                  f"{thresholds.max_uncertainty_ratio:g}x)")


def format_drift(result: DriftResult, thresholds: DriftThresholds) -> str:
    """What ``fedscan client drift`` prints."""
    d = np.asarray(result.distances)
    lines = [f"intensity: {result.scans} new scans vs {result.reference_cases} of this site's "
             f"cases; JS distance median {np.median(d):.3f}, max {d.max():.3f}; per-scan "
             f"threshold {result.threshold:.3f}; {result.off} scan(s) off "
             f"({100 * result.off_share:.0f} %, drift above "
             f"{100 * thresholds.max_off_share:g} %)"]
    if result.dice_new is not None:
        lines.append(f"Dice: {result.dice_new:.3f} on the new scans, {result.dice_reference:.3f} "
                     f"on this site's validation cases (drift when it drops more than "
                     f"{thresholds.max_dice_drop:g})")
    if result.uncertainty_new is not None:
        lines.append(f"uncertainty: {result.uncertainty_new:.4f} on the new scans, "
                     f"{result.uncertainty_reference:.4f} on this site's validation cases "
                     f"(drift above {thresholds.max_uncertainty_ratio:g}x)")
    if result.drifted:
        lines += ["DRIFT: " + r for r in result.reasons]
    else:
        lines.append("no drift")
    return "\n".join(lines)


def write_json(result: DriftResult, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result.to_dict(), indent=1))
