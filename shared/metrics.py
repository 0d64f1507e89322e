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

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric, compute_dice, compute_hausdorff_distance
from monai.metrics.regression import compute_ssim_and_cs
from monai.networks.utils import one_hot
from nibabel.affines import voxel_sizes

from fedscan.shared.preprocessing import ForegroundPercentileScale

# -- segmentation ---------------------------------------------------------------------------


def native_spacing(img) -> tuple[float, ...]:
    """Voxel sizes in mm of a nibabel image (from its affine, right for oblique grids too)."""
    return tuple(float(s) for s in voxel_sizes(img.affine)[:3])


def case_metrics(pred: np.ndarray, label: np.ndarray, num_classes: int,
                 spacing: tuple[float, ...], *, hd95: bool = True,
                 class_names: Sequence[str] | None = None) -> dict[str, float]:
    """Dice (and HD95 in mm) of one case, per foreground class and averaged over them.

    Args:
        pred: predicted classes in the native grid.
        label: reference classes, same shape.
        num_classes: classes including background.
        spacing: voxel sizes in mm, for HD95.
        hd95: whether to compute HD95.
        class_names: every class's name, background first (per-class keys); None:
            ``class_1``, ``class_2``, ...

    Returns:
        ``{"dice": ..., "dice/<class>": ..., "hd95": ..., "hd95/<class>": ...}``. A class
        absent from both label and prediction has Dice 1, from one of them Dice 0; its HD95
        is ``nan`` unless it is in both, and ``hd95`` (the mean over the classes that have
        one) is ``nan`` if none has.
    """
    names = list(class_names or ["background", *(f"class_{i}" for i in range(1, num_classes))])
    p = one_hot(torch.as_tensor(pred, dtype=torch.long)[None, None], num_classes)
    y = one_hot(torch.as_tensor(label, dtype=torch.long)[None, None], num_classes)
    # ignore_empty=False: a class absent from both counts as 1, absent from one as 0.
    dice = compute_dice(p, y, include_background=False, ignore_empty=False)[0]
    out = {"dice": float(dice.mean())}
    out.update({f"dice/{name}": float(d) for name, d in zip(names[1:], dice, strict=True)})
    if hd95:
        both = [bool(p[0, c].any() and y[0, c].any()) for c in range(1, num_classes)]
        per_class = [float("nan")] * (num_classes - 1)
        if any(both):
            with warnings.catch_warnings():  # MONAI 1.6 warns of its own deprecated argument
                warnings.simplefilter("ignore", FutureWarning)
                hd = compute_hausdorff_distance(p, y, include_background=False, percentile=95,
                                                spacing=list(spacing))[0]
            per_class = [float(h) if ok and math.isfinite(float(h)) else float("nan")
                         for h, ok in zip(hd, both, strict=True)]
        finite = [h for h in per_class if math.isfinite(h)]
        out["hd95"] = float(np.mean(finite)) if finite else float("nan")
        out.update({f"hd95/{name}": h for name, h in zip(names[1:], per_class, strict=True)})
    return out


def mean_over_cases(per_case: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Each key's mean over the cases where it is finite (``nan`` where it is in none)."""
    per_case = list(per_case)
    keys = list(dict.fromkeys(k for m in per_case for k in m))
    out = {}
    for key in keys:
        values = [m[key] for m in per_case if key in m and math.isfinite(m[key])]
        out[key] = float(np.mean(values)) if values else float("nan")
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


#: SSIM's Gaussian window (MONAI's defaults): 11 voxels wide, sigma 1.5.
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5


def masked_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray,
                data_range: float = 1.0) -> float:
    """PSNR in dB of ``a`` against ``b`` over the voxels of ``mask`` (``inf`` if equal
    there, ``nan`` for an empty mask)."""
    _same_shape("psnr", a, b)
    _same_shape("psnr mask", a, mask)
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return float("nan")
    mse = float(np.mean((np.asarray(a, np.float64)[mask] - np.asarray(b, np.float64)[mask]) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range ** 2 / mse)


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """SSIM of every window lying inside the image (:func:`ssim` is its mean), so one map
    serves every region scored on a pair (:func:`region_ssim`).

    Returns:
        The map, each side ``SSIM_WINDOW - 1`` voxels shorter than the image.
    """
    _same_shape("ssim", a, b)
    dims = len(np.shape(a))
    m, _ = compute_ssim_and_cs(_batched(a), _batched(b), spatial_dims=dims,
                               kernel_size=[SSIM_WINDOW] * dims,
                               kernel_sigma=[SSIM_SIGMA] * dims, data_range=data_range)
    return m[0, 0].numpy()


def region_ssim(ssim_values: np.ndarray, mask: np.ndarray | None) -> float:
    """Mean of an :func:`ssim_map` over the windows centred on ``mask``'s voxels (all of
    them for None; a band of half a window at the border has no window, as in
    :func:`ssim`). ``nan`` if no window is centred on the mask."""
    if mask is None:
        return float(ssim_values.mean())
    half = SSIM_WINDOW // 2
    inner = np.asarray(mask, dtype=bool)[tuple(slice(half, n - half) for n in np.shape(mask))]
    if not inner.any():
        return float("nan")
    return float(ssim_values[inner].mean())


def region_similarity(image: np.ndarray, truth: np.ndarray,
                      regions: dict[str, np.ndarray | None],
                      percentiles: tuple[float, float] | list[float] = (0.5, 99.5)
                      ) -> dict[str, dict[str, float]]:
    """PSNR and SSIM of an image against its paired truth in several regions, both
    normalised alike (:func:`normalise_intensity`, each channel on its own; the whole image
    first, so a region is judged on the same scale as the whole), averaged over channels.
    One SSIM map per channel serves every region (the dense 3D SSIM is most of a study's
    scoring time).

    Args:
        image: 3D, or 4D channels first ``(C, X, Y, Z)``.
        truth: the same shape.
        regions: name -> spatial boolean mask (None: the whole image).
        percentiles: ``data.intensity_percentiles``.

    Returns:
        name -> ``{"psnr", "ssim"}``.
    """
    _same_shape("similarity", image, truth)
    image, truth = np.asarray(image), np.asarray(truth)
    if image.ndim < 4:
        image, truth = image[None], truth[None]
    for mask in regions.values():
        if mask is not None:
            _same_shape("similarity mask", image[0], mask)
    scores: dict[str, list[tuple[float, float]]] = {name: [] for name in regions}
    for a, t in zip(image, truth, strict=True):
        a, t = normalise_intensity(a, percentiles), normalise_intensity(t, percentiles)
        values = ssim_map(a, t)
        for name, mask in regions.items():
            scores[name].append((psnr(a, t) if mask is None else masked_psnr(a, t, mask),
                                 region_ssim(values, mask)))
    return {name: {"psnr": float(np.mean([p for p, _ in s])),
                   "ssim": float(np.mean([q for _, q in s]))} for name, s in scores.items()}


def truth_metrics(raw: np.ndarray, harmonised: np.ndarray, truth: np.ndarray,
                  percentiles: tuple[float, float] | list[float] = (0.5, 99.5),
                  mask: np.ndarray | None = None) -> dict[str, float]:
    """PSNR and SSIM against a paired ground truth, before and after harmonisation.

    All three images share one voxel grid and are normalised alike
    (:func:`region_similarity`), so the gain measures contrast, bias and noise only.

    Args:
        raw: the site's image as stored (3D, or 4D channels first).
        harmonised: the harmonised image on the same grid.
        truth: the same anatomy in the reference domain on the same grid.
        percentiles: ``data.intensity_percentiles``.
        mask: score only inside it (spatial, boolean); None: the whole image.

    Returns:
        ``psnr_raw``, ``psnr_harmonised``, ``ssim_raw``, ``ssim_harmonised``.
    """
    return region_truth_metrics(raw, harmonised, truth, {"": mask}, percentiles)[""]


def region_truth_metrics(raw: np.ndarray, harmonised: np.ndarray, truth: np.ndarray,
                         regions: dict[str, np.ndarray | None],
                         percentiles: tuple[float, float] | list[float] = (0.5, 99.5)
                         ) -> dict[str, dict[str, float]]:
    """:func:`truth_metrics` in several regions (:func:`region_similarity`).

    Returns:
        name -> ``psnr_raw``, ``psnr_harmonised``, ``ssim_raw``, ``ssim_harmonised``.
    """
    r, h = (region_similarity(x, truth, regions, percentiles) for x in (raw, harmonised))
    return {name: {"psnr_raw": r[name]["psnr"], "psnr_harmonised": h[name]["psnr"],
                   "ssim_raw": r[name]["ssim"], "ssim_harmonised": h[name]["ssim"]}
            for name in regions}
