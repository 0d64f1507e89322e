"""Applying a harmonisation model to whole images, and the intensity metrics that judge it.

:func:`harmonise_volume` mirrors :func:`~fedscan.shared.inference.predict_volume`: the image
goes through the shared preprocessing, the site-to-reference generator runs as a sliding
window on the model's grid, and ``Invertd`` maps the result back to the input's own voxel
grid, so the output has exactly the input's shape and affine.

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

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import PSNRMetric, SSIMMetric
from monai.transforms import Invertd
from torch import nn

from fedscan.shared.checkpoint import load_model
from fedscan.shared.config import Config
from fedscan.shared.errors import FedscanError
from fedscan.shared.inference import (
    image_like,
    load_nifti,
    preprocess_image,
    sliding_window_logits,
)
from fedscan.shared.preprocessing import ForegroundPercentileScale
from fedscan.shared.tasks.base import resolve_device

if TYPE_CHECKING:
    from fedscan.shared.tasks.harmonisation import CycleGAN


# -- metrics --------------------------------------------------------------------------------


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
    if tuple(np.shape(a)) != tuple(np.shape(b)):
        raise ValueError(f"psnr: shapes differ, {tuple(np.shape(a))} vs {tuple(np.shape(b))}")
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
    if tuple(np.shape(a)) != tuple(np.shape(b)):
        raise ValueError(f"ssim: shapes differ, {tuple(np.shape(a))} vs {tuple(np.shape(b))}")
    metric = SSIMMetric(spatial_dims=len(np.shape(a)), data_range=data_range)
    return float(metric(_batched(a), _batched(b)).item())


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


def score_against_truth(generator: nn.Module, image_path: str | Path, truth: np.ndarray,
                        truth_affine: np.ndarray, cfg: Config,
                        device: torch.device | str = "cpu"
                        ) -> tuple[dict[str, float], nib.Nifti1Image]:
    """Raw and harmonised image against a paired ground truth, in two grids (phantoms only).

    ``grid_*``: on the model's grid. The raw image, the truth and the generator's output all
    come out of the same preprocessing (resampling, percentile scaling), so the score
    isolates what the generator changes. ``native_*``: on the input's own grid, the
    harmonised image as :func:`harmonise_volume` writes it against the stored raw image;
    for an input grid other than the model's this also charges the harmonised image for
    the resampling round trip (a blur the raw image never had), which caps the gain of any
    model on anisotropic or finer sites.

    Args:
        generator: the site-to-reference generator, in eval mode, on ``device``.
        image_path: the site's raw image.
        truth: the same anatomy in the reference domain on the image's grid
            (:func:`fedscan.simulations.phantoms.reference_truth`).
        truth_affine: its affine (the image's).
        cfg: the model's config.
        device: where the generator runs.

    Returns:
        ``{grid,native}_{psnr,ssim}_{raw,harmonised}``, and the harmonised image (the input's
        grid, as :func:`harmonise_volume` returns it).
    """
    img = load_nifti(image_path)
    if not np.allclose(img.affine, truth_affine, atol=1e-4) or img.shape[:3] != truth.shape:
        raise ValueError(f"{image_path}: the truth is not on the image's grid")
    with tempfile.TemporaryDirectory() as tmp:
        # The truth goes through exactly the pipeline's preprocessing, from a file like the
        # image, so both land on identical model grids.
        truth_path = Path(tmp) / "truth.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(truth, dtype=np.float32), truth_affine), truth_path)
        t, _ = preprocess_image(truth_path, cfg)
    x, on_grid, harmonised = _harmonise(generator, image_path, cfg, device)
    pct = cfg.data.intensity_percentiles
    grid = truth_metrics(x.as_tensor()[0].numpy(), on_grid[0].numpy(),
                         t.as_tensor()[0].numpy(), pct)
    native = truth_metrics(np.asanyarray(img.dataobj), np.asarray(harmonised.dataobj), truth,
                           pct)
    out = {f"grid_{k}": v for k, v in grid.items()}
    out.update({f"native_{k}": v for k, v in native.items()})
    return out, harmonised


# -- inference ------------------------------------------------------------------------------


def translate(generator: nn.Module, image: torch.Tensor, cfg: Config,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Run one generator over a whole preprocessed ``(C, *spatial)`` image.

    Sliding windows of ``train.patch_size`` (the size the generator was trained on, so its
    instance norm sees the statistics it learnt), Gaussian-blended with
    ``evaluate.sw_overlap``. The caller sets eval mode; this runs under ``no_grad``.

    Returns:
        ``(C, *spatial)`` plain tensor on the CPU.
    """
    with torch.no_grad():
        return sliding_window_logits(generator, image, cfg, torch.device(device)).cpu()


def harmonise_volume(generator: nn.Module, image_path: str | Path, cfg: Config,
                     device: torch.device | str = "cpu") -> nib.Nifti1Image:
    """Harmonise one image file to the reference domain, in the image's own voxel grid.

    Args:
        generator: the site-to-reference generator (``CycleGAN.g_site2ref``) on ``device``,
            in eval mode.
        image_path: a NIfTI image (any orientation, spacing, dtype).
        cfg: the config the model was trained with.
        device: where the generator runs.

    Returns:
        A ``float32`` NIfTI with the input's shape and affine (qform/sform copied), whose
        intensities are on the pipeline's normalised scale (reference tissue in about [0, 1]).

    Raises:
        FedscanError: the image is missing, unreadable or has the wrong channel count.
    """
    return _harmonise(generator, image_path, cfg, device)[2]


def _harmonise(generator: nn.Module, image_path: str | Path, cfg: Config,
               device: torch.device | str) -> tuple[MetaTensor, torch.Tensor, nib.Nifti1Image]:
    """The preprocessed image, the generator's output on the model grid, and that output
    mapped back to the input's grid as a NIfTI."""
    image_path = Path(image_path)
    img = load_nifti(image_path)
    image, pre = preprocess_image(image_path, cfg)
    out = translate(generator, image, cfg, device)
    # Bilinear back to the native grid, like predict's probabilities.
    inverter = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)
    # A copy: the grid output is returned too, and must not share memory with the inversion.
    native = inverter({"image": image, "pred": MetaTensor(out.clone())})["pred"]
    array = np.asarray(torch.as_tensor(native).numpy(), dtype=np.float32)
    array = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)  # channels last
    expected = tuple(img.shape[:3])
    if array.shape[:3] != expected:  # a broken trace must never write a misaligned image
        raise RuntimeError(f"{image_path}: harmonised shape {array.shape} != image {expected}")
    return image, out, image_like(array, img)


def load_cyclegan(model_path: str | Path) -> tuple[Config, CycleGAN]:
    """A harmonisation model file as ``(config, CycleGAN)`` with its generators loaded.

    The federation's ``final_model.pt`` holds only what it shares (the generators' UNets):
    the intensity curves then stay the identity, and the discriminators are not needed to
    harmonise. A site's own ``site_model.pt`` adds its curves, heads and the generator's
    moving average, which :meth:`CycleGAN.harmoniser` then returns.

    Raises:
        FedscanError: one line naming the file when it is not a harmonisation model or lacks
            the site-to-reference generator's weights.
    """
    from fedscan.shared.tasks import build_task  # the task imports this module

    cfg, state_dict, _ = load_model(model_path)
    if cfg.task != "harmonisation":
        raise FedscanError(f"{model_path}: a {cfg.task} model, not a harmonisation model")
    task = build_task(cfg)
    model = task.build_model()
    expected = [k for k in task.shared_keys(model) if k.startswith("g_site2ref.")]
    missing = [k for k in expected if k not in state_dict]
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError:  # shape mismatch
        raise FedscanError(f"{model_path}: weights do not match the model its config "
                           "describes") from None
    if missing or result.unexpected_keys:
        raise FedscanError(f"{model_path}: weights do not match the model its config "
                           f"describes ({len(missing)} of {len(expected)} site-to-reference "
                           f"generator weights missing, {len(result.unexpected_keys)} "
                           "unexpected)")
    return cfg, model


def harmonise_file(model_path: str | Path, image_path: str | Path, out_path: str | Path,
                   *, device: str = "auto") -> Path:
    """Harmonise ``image_path`` with a saved model and write the NIfTI to ``out_path``.

    Args:
        model_path: a harmonisation model written by :func:`~fedscan.shared.checkpoint.save_model`
            (the generators at least).
        image_path: the NIfTI image to harmonise.
        out_path: where the ``float32`` NIfTI goes (same shape and affine as the input).
        device: ``auto``, ``cpu``, ``cuda``...

    Returns:
        ``out_path``.

    Raises:
        FedscanError: one line naming the model or image file at fault.
    """
    cfg, model = load_cyclegan(model_path)
    dev = resolve_device(device)
    generator = model.harmoniser().to(dev).eval()
    out = harmonise_volume(generator, image_path, cfg, dev)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out.to_filename(out_path)
    return out_path
