"""What the tasks measure: segmentation overlap and boundary distance, image similarity.

Pure functions of arrays (MONAI's metrics underneath); the tasks declare which of them they
report (:class:`~fedscan.shared.tasks.base.MetricSpec`) and average them over cases.

Comparing intensities across scanners needs a common scale, because stored values differ by
gain, offset and dtype (``uint16`` x 3000 + 100 at one site, ``float32`` in [0, 1] at
another). :func:`normalise_intensity` maps every image, raw, harmonised or ground truth, to
[0, 1] with the same foreground-percentile scaling the pipeline applies before the network
(``data.intensity_percentiles`` of the voxels above the image minimum, clipped). It removes
only a global linear scale, which no scanner difference should be judged on, and treats all
three images alike; what is left (contrast curve, bias field, noise) is what harmonisation
must fix.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric, compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot
from nibabel.affines import voxel_sizes

from fedscan.shared.preprocessing import ForegroundPercentileScale

# -- segmentation ---------------------------------------------------------------------------


def native_spacing(img) -> tuple[float, ...]:
    """Voxel sizes in mm of a nibabel image (from its affine, right for oblique grids too)."""
    return tuple(float(s) for s in voxel_sizes(img.affine)[:3])


def case_metrics(pred: np.ndarray, label: np.ndarray, num_classes: int,
                 spacing: tuple[float, ...], *, hd95: bool = True) -> dict[str, float]:
    """Dice (and HD95 in mm) of one case, averaged over foreground classes.

    Args:
        pred: predicted classes in the native grid.
        label: reference classes, same shape.
        num_classes: classes including background.
        spacing: voxel sizes in mm, for HD95.
        hd95: whether to compute HD95.

    Returns:
        ``{"dice": ..., "hd95": ...}``; ``hd95`` is ``nan`` if no class has it defined.
    """
    p = one_hot(torch.as_tensor(pred, dtype=torch.long)[None, None], num_classes)
    y = one_hot(torch.as_tensor(label, dtype=torch.long)[None, None], num_classes)
    # ignore_empty=False: a class absent from both counts as 1, absent from one as 0.
    dice = compute_dice(p, y, include_background=False, ignore_empty=False)
    out = {"dice": float(dice.mean())}
    if hd95:
        if p[:, 1:].any() and y[:, 1:].any():
            hd = compute_hausdorff_distance(p, y, include_background=False, percentile=95,
                                            spacing=list(spacing))
            finite = hd[torch.isfinite(hd)]
            out["hd95"] = float(finite.mean()) if finite.numel() else float("nan")
        else:
            out["hd95"] = float("nan")
    return out


# -- image similarity -----------------------------------------------------------------------


def normalise_intensity(image: np.ndarray | torch.Tensor,
                        percentiles: tuple[float, float] | list[float] = (0.5, 99.5)
                        ) -> np.ndarray:
    """Map an image to [0, 1] like the pipeline does, for comparisons across scanners.

    Args:
        image: any-dtype array (one channel, any number of dimensions).
        percentiles: lower and upper percentile of the non-background voxels mapped to 0 and
            1 (``data.intensity_percentiles``); values outside are clipped.

    Returns:
        ``float32`` array of the same shape in [0, 1].
    """
    lower, upper = percentiles
    scale = ForegroundPercentileScale(lower, upper, b_min=0.0, b_max=1.0, clip=True)
    out = scale(torch.as_tensor(np.asarray(image, dtype=np.float32)))
    return np.asarray(torch.as_tensor(out).numpy(), dtype=np.float32)


def _batched(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(1, 1, *spatial)`` float tensor for MONAI's metrics."""
    return torch.as_tensor(np.asarray(a, dtype=np.float32))[None, None]


def _same_shape(what: str, a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> None:
    if tuple(np.shape(a)) != tuple(np.shape(b)):
        raise ValueError(f"{what}: shapes differ, {tuple(np.shape(a))} vs {tuple(np.shape(b))}")


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor,
         data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of two same-shape single-channel images.

    Args:
        a: image (2D or 3D).
        b: reference image, same shape.
        data_range: the intensity range the peak stands for (1 for normalised images).

    Returns:
        PSNR (``inf`` for identical images).
    """
    _same_shape("psnr", a, b)
    return float(PSNRMetric(max_val=data_range)(_batched(a), _batched(b)).item())


def ssim(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor,
         data_range: float = 1.0) -> float:
    """Structural similarity (Gaussian window 11, sigma 1.5) of two same-shape images.

    Args:
        a: image (2D or 3D; every side at least 11 voxels).
        b: reference image, same shape.
        data_range: the intensity range (1 for normalised images).

    Returns:
        Mean SSIM over the image, 1 for identical images.
    """
    _same_shape("ssim", a, b)
    metric = SSIMMetric(spatial_dims=len(np.shape(a)), data_range=data_range)
    return float(metric(_batched(a), _batched(b)).item())


def cycle_metrics(x: torch.Tensor, reconstructed: torch.Tensor, harmonised: torch.Tensor,
                  *, per_slice: bool = False) -> dict[str, float]:
    """How well a CycleGAN maps one image there and back, which needs no paired truth.

    Args:
        x: the preprocessed image ``(C, *spatial)`` (the first channel is scored).
        reconstructed: ``x`` mapped to the reference domain and back, same shape.
        harmonised: ``x`` mapped to the reference domain, same shape.
        per_slice: score SSIM per slice along the last axis (2D runs, thin volumes).

    Returns:
        ``cycle_psnr`` and ``cycle_ssim`` of the reconstruction (clipped to [0, 1], data
        range 1) and ``change``, the mean absolute difference of ``x`` and ``harmonised``.
    """
    a = x[0].clamp(0, 1).numpy()
    b = reconstructed[0].clamp(0, 1).numpy()
    if per_slice or min(a.shape) < 11:  # SSIM's window is 11 voxels wide
        s = float(np.mean([ssim(a[..., k], b[..., k]) for k in range(a.shape[-1])]))
    else:
        s = ssim(a, b)
    return {"cycle_psnr": psnr(b, a), "cycle_ssim": s,
            "change": float((harmonised - x).abs().mean())}


def truth_metrics(raw: np.ndarray, harmonised: np.ndarray, truth: np.ndarray,
                  percentiles: tuple[float, float] | list[float] = (0.5, 99.5)
                  ) -> dict[str, float]:
    """PSNR and SSIM against a paired ground truth, before and after harmonisation.

    All three images share one voxel grid and are normalised alike
    (:func:`normalise_intensity`), so the gain measures contrast, bias and noise only.

    Args:
        raw: the site's image as stored.
        harmonised: the harmonised image on the same grid.
        truth: the same anatomy in the reference domain on the same grid.
        percentiles: ``data.intensity_percentiles``.

    Returns:
        ``psnr_raw``, ``psnr_harmonised``, ``ssim_raw``, ``ssim_harmonised``.
    """
    r, h, t = (normalise_intensity(np.squeeze(x), percentiles) for x in (raw, harmonised, truth))
    return {"psnr_raw": psnr(r, t), "psnr_harmonised": psnr(h, t),
            "ssim_raw": ssim(r, t), "ssim_harmonised": ssim(h, t)}
