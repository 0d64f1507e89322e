"""Voxelwise uncertainty of a segmentation: where a radiologist should look.

``N`` stochastic passes of the model over one scan are averaged into class probabilities;
their predictive entropy (normalised by ``log(num_classes)``, so 0 is certain and 1 is a
uniform guess) is the uncertainty map, on the input's own grid like the label map. The
passes are Monte-Carlo dropout when the model was trained with dropout (``model.dropout`` >
0: dropout stays on at inference), else test-time augmentation: scanner-like intensity
changes (MONAI's random gain, contrast curve and noise) and, where the label set allows it
(:func:`~fedscan.shared.tasks.augmentation.lateral_swap`), a left-right flip whose output is
flipped back with the mirrored classes swapped. Intensity changes need no inversion, so the
one preprocessing and its inversion are shared by all passes (MONAI's
``TestTimeAugmentation`` would rerun and invert the whole pipeline per pass, and returns the
spread of argmax labels rather than probabilities).

A scan's score is the mean over foreground classes of the mean uncertainty of the voxels
labelled that class (:func:`scan_score`): scans the model is unsure of score high.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandGaussianNoise,
    RandScaleIntensity,
)
from torch import nn

from fedscan.shared.config import Config
from fedscan.shared.data import load_nifti
from fedscan.shared.inference import (
    image_like,
    load_segmentation_model,
    preprocess_image,
    sliding_window,
    to_native,
)
from fedscan.shared.tasks.augmentation import lateral_axis, lateral_swap


@dataclass
class UncertainPrediction:
    """One scan's prediction with its uncertainty, on the input's grid.

    Attributes:
        labels: ``uint8`` classes (argmax of the mean probabilities).
        uncertainty: ``float32`` normalised predictive entropy in [0, 1].
        score: :func:`scan_score`.
        method: ``mc-dropout`` or ``tta``.
        image: the input as a nibabel image (its geometry).
    """

    labels: np.ndarray
    uncertainty: np.ndarray
    score: float
    method: str
    image: nib.spatialimages.SpatialImage


def _dropout_on(model: nn.Module) -> int:
    """Put only the dropout layers in train mode; returns how many there are."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    for layer in layers:
        layer.train()
    return len(layers)


def _tta_pass(model: nn.Module, image: torch.Tensor, cfg: Config, device: torch.device | str,
              index: int, seed: int) -> torch.Tensor:
    """Softmax of one augmented pass, on the preprocessed grid."""
    augment = Compose([RandScaleIntensity(factors=0.1, prob=1.0),
                       RandAdjustContrast(prob=1.0, gamma=(0.8, 1.25)),
                       RandGaussianNoise(prob=1.0, std=0.03)])
    augment.set_random_state(seed=seed + index)
    x = torch.as_tensor(augment(image.as_tensor().clone()))
    swap = lateral_swap(cfg.data)
    flip = swap is not None and index % 2 == 1
    axis = lateral_axis(cfg.data.orientation) + 1
    if flip:
        x = x.flip(axis)
    probs = torch.softmax(sliding_window(model, x, cfg, device), 0)
    if flip:
        probs = probs.flip(axis)
        order = list(range(probs.shape[0]))
        for a, b in (swap or {}).items():
            order[a] = b  # the flipped image's class b is the original's class a
        probs = probs[order]
    return probs


def predict_with_uncertainty(model: nn.Module, image_path: str | Path, cfg: Config,
                             device: torch.device | str, passes: int, *,
                             seed: int = 0) -> UncertainPrediction:
    """Segment one scan with ``passes`` stochastic passes and map their entropy.

    Args:
        model: the segmentation network on ``device`` (its mode is restored after).
        image_path: a NIfTI image (any orientation, spacing, channels as trained).
        cfg: the model's config.
        device: where the network runs.
        passes: stochastic passes (at least 2).
        seed: seeds the augmentation (TTA); dropout draws from torch's global generator.

    Returns:
        Labels, uncertainty map, score and method, on the input's grid.

    Raises:
        ValueError: ``passes`` below 2.
        DataError: the image is missing, unreadable or has the wrong channel count.
    """
    if passes < 2:
        raise ValueError("uncertainty needs at least 2 passes")
    image, pre = preprocess_image(image_path, cfg)
    img = load_nifti(image_path, header_only=True)
    was_training = model.training
    model.eval()
    try:
        mc = cfg.model.dropout > 0 and _dropout_on(model) > 0
        total = None
        for index in range(passes):
            probs = (torch.softmax(sliding_window(model, image, cfg, device), 0) if mc
                     else _tta_pass(model, image, cfg, device, index, seed))
            total = probs if total is None else total + probs
    finally:
        model.train(was_training)
    mean = total / passes
    entropy = -(mean * torch.log(mean.clamp_min(1e-12))).sum(0, keepdim=True)
    entropy = entropy / math.log(mean.shape[0])
    # One inversion for probabilities and entropy together (bilinear, then argmax).
    native = to_native(torch.cat([mean, entropy]), image, pre, img)
    labels = native[:-1].argmax(0).numpy().astype(np.uint8)
    uncertainty = native[-1].clamp(0.0, 1.0).numpy().astype(np.float32)
    return UncertainPrediction(labels=labels, uncertainty=uncertainty,
                               score=scan_score(labels, uncertainty),
                               method="mc-dropout" if mc else "tta", image=img)


def scan_score(labels: np.ndarray, uncertainty: np.ndarray) -> float:
    """A scan's uncertainty: the mean over foreground classes of the mean uncertainty of the
    voxels labelled that class (all voxels when none is labelled foreground).

    Class-balanced like the headline Dice (a mean over classes), so a small structure the
    model is unsure of weighs as much as a large one it is sure of.
    """
    classes = [c for c in np.unique(labels) if c > 0]
    if not classes:
        return float(uncertainty.mean())
    return float(np.mean([uncertainty[labels == c].mean() for c in classes]))


def error_uncertainty(labels: np.ndarray, reference: np.ndarray, uncertainty: np.ndarray,
                      region: np.ndarray | None = None) -> tuple[float, float, int, int]:
    """Mean uncertainty of wrongly and of correctly labelled voxels.

    Args:
        labels: predicted classes.
        reference: reference classes, same shape.
        uncertainty: the uncertainty map, same shape.
        region: voxels to count (None: where prediction or reference is foreground; the
            air the model rightly ignores would otherwise swamp the "correct" mean).

    Returns:
        ``(mean over wrong voxels, mean over correct voxels, wrong count, correct count)``
        (``nan`` for a mean over no voxels).
    """
    if region is None:
        region = (labels > 0) | (reference > 0)
    wrong = (labels != reference) & region
    right = (labels == reference) & region

    def mean(mask: np.ndarray) -> float:
        return float(uncertainty[mask].mean()) if mask.any() else float("nan")

    return mean(wrong), mean(right), int(wrong.sum()), int(right.sum())


def uncertainty_path(out_path: str | Path) -> Path:
    """Where the uncertainty map of a label file goes: ``mask.nii.gz`` ->
    ``mask_uncertainty.nii.gz`` (beside it)."""
    out_path = Path(out_path)
    for suffix in (".nii.gz", ".nii"):
        if out_path.name.endswith(suffix):
            return out_path.with_name(out_path.name[: -len(suffix)] + "_uncertainty" + suffix)
    return out_path.with_name(out_path.name + "_uncertainty.nii.gz")


def predict_file_with_uncertainty(model_path: str | Path, image_path: str | Path,
                                  out_path: str | Path, passes: int, *,
                                  device: str = "auto") -> tuple[Path, Path, UncertainPrediction]:
    """Segment a scan with a saved model and write its label map and uncertainty map.

    Returns:
        ``(label file, uncertainty file, prediction)``; both files have the input's shape and
        affine.
    """
    cfg, model, dev = load_segmentation_model(model_path, device)
    result = predict_with_uncertainty(model, image_path, cfg, dev, passes)
    out_path, map_path = Path(out_path), uncertainty_path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    image_like(result.labels, result.image, np.uint8).to_filename(out_path)
    image_like(result.uncertainty, result.image, np.float32).to_filename(map_path)
    return out_path, map_path, result
