"""Applying a model to whole images in their native grid: predict (segment) and harmonise.

The image goes through the shared preprocessing, the network runs as a sliding window on the
model's grid, and :func:`to_native` maps the output back to the input's voxel grid with
MONAI's ``Invertd``, so every output has exactly the input's shape and affine. Segmentation
inverts class probabilities (bilinear) and takes the argmax there, which gives smoother
boundaries than inverting labels when the native grid is finer than the model's;
harmonisation inverts the generator's image. Evaluation uses the same functions, so reported
and reproduced numbers agree.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Compose, Invertd, KeepLargestConnectedComponent
from monai.utils import optional_import
from torch import nn

from fedscan.shared.checkpoint import load_model
from fedscan.shared.config import Config
from fedscan.shared.data import load_nifti
from fedscan.shared.errors import DataError, FedscanError
from fedscan.shared.preprocessing import ForegroundPercentileScaled, preprocess_case
from fedscan.shared.tasks import build_task
from fedscan.shared.tasks.base import resolve_device

if TYPE_CHECKING:
    from fedscan.shared.tasks.harmonisation import CycleGAN


def require_largest_component() -> None:
    """Raise a one-line error when MONAI's connected components (scikit-image) are missing."""
    if not optional_import("skimage.measure")[1]:
        raise FedscanError("largest_component needs scikit-image (pip install scikit-image)")


def _predictor(model: nn.Module, spatial_dims: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network as ``sliding_window_inference`` calls it on ``(B, C, X, Y, Z)`` windows.

    A 2D network sees ``(X, Y, 1)`` windows with the singleton slice axis squeezed away.
    """
    if spatial_dims == 3:
        return model
    return lambda x: model(x.squeeze(-1)).unsqueeze(-1)


def sliding_window(model: nn.Module, image: torch.Tensor, cfg: Config,
                   device: torch.device | str) -> torch.Tensor:
    """The network's output ``(C_out, *spatial)`` for a preprocessed ``(C, *spatial)`` image.

    Windows are ``train.patch_size`` (what the network was trained on, so its instance norm
    sees the statistics it learnt; padded if the image is smaller), Gaussian-blended with
    ``evaluate.sw_overlap``. The caller sets eval mode; this runs under ``no_grad`` and
    returns a plain tensor on the CPU.
    """
    # The network sees plain tensors; the meta stays with ``image`` for the inversion.
    x = image.as_tensor() if isinstance(image, MetaTensor) else image
    with torch.no_grad():
        out = sliding_window_inference(
            x[None].to(torch.device(device)),
            roi_size=list(cfg.train.patch_size),
            sw_batch_size=cfg.evaluate.sw_batch_size,
            predictor=_predictor(model, cfg.model.spatial_dims),
            overlap=cfg.evaluate.sw_overlap,
            mode="gaussian",
        )
    return out[0].cpu()


def preprocess_image(image_path: str | Path, cfg: Config) -> tuple[MetaTensor, Compose]:
    """The preprocessed ``(C, *spatial)`` image and the transform that made it (to invert).

    Raises:
        DataError: one line naming the file when it is missing, unreadable, not 3D, cannot
            be preprocessed or has the wrong channel count.
    """
    if len(load_nifti(image_path, header_only=True).shape) < 3:
        raise DataError(f"{image_path}: expected a 3D image (2D NIfTI files are not supported)")
    out, pre = preprocess_case({"image": str(image_path)}, cfg.data, ("image",))
    return out["image"], pre


def to_native(output: torch.Tensor, image: MetaTensor, pre: Compose,
              like: nib.spatialimages.SpatialImage) -> torch.Tensor:
    """Map a model-grid output ``(C, *grid)`` back to the grid of the file ``image`` came from.

    ``Invertd`` gives the output the image's trace and undoes resampling and reorientation
    (bilinear; a plain tensor would be skipped with only a warning).

    Args:
        output: on the preprocessed ``image``'s grid (CPU).
        image: the preprocessed image (carries the trace).
        pre: the transform that preprocessed it.
        like: the input file's nibabel image (the shape to land on).

    Returns:
        ``(C, *native)`` plain tensor with exactly ``like``'s spatial shape.
    """
    inverter = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)
    native = torch.as_tensor(inverter({"image": image, "pred": MetaTensor(output)})["pred"])
    expected = tuple(like.shape[:3])
    if tuple(native.shape[1:4]) != expected:  # a broken trace must never write a misaligned file
        raise RuntimeError(f"{like.get_filename()}: output shape {tuple(native.shape[1:])} != "
                           f"image {expected}")
    return native


def predict_volume(
    model: nn.Module,
    image_path: str | Path,
    cfg: Config,
    device: torch.device | str,
    *,
    largest_component: bool = False,
) -> tuple[np.ndarray, nib.spatialimages.SpatialImage]:
    """Segment one image file in its own voxel grid.

    The caller puts ``model`` in eval mode (evaluation does).

    Args:
        model: the task network, already on ``device``.
        image_path: a NIfTI image (any orientation, spacing, dtype).
        cfg: the config the model was trained with (preprocessing, patch, evaluation keys).
        device: where the network runs.
        largest_component: keep only the largest connected foreground component
            (all foreground classes together).

    Returns:
        ``(labels, image)``: integer class labels with exactly the image's spatial shape in
        the image's voxel order (``uint8``), and the input as a nibabel image.

    Raises:
        DataError: the image is missing, unreadable or has the wrong channel count.
    """
    image, pre = preprocess_image(image_path, cfg)
    img = load_nifti(image_path, header_only=True)
    probs = torch.softmax(sliding_window(model, image, cfg, device), 0)
    labels = to_native(probs, image, pre, img).argmax(0, keepdim=True)
    if largest_component:
        require_largest_component()
        foreground = list(range(1, cfg.data.num_classes))
        keep = KeepLargestConnectedComponent(applied_labels=foreground, independent=False)
        labels = keep(labels)
    return np.asarray(torch.as_tensor(labels)[0].numpy(), dtype=np.uint8), img


def intensity_ranges(pre: Compose) -> list[tuple[float, float]]:
    """The ``(a_min, a_max)`` per channel that ``pre``'s intensity scaling last mapped to
    [0, 1] (:class:`~fedscan.shared.preprocessing.ForegroundPercentileScale`)."""
    scaling = next(t for t in pre.transforms if isinstance(t, ForegroundPercentileScaled))
    return list(scaling.scaler.ranges)


def native_scaled(img: nib.spatialimages.SpatialImage,
                  ranges: list[tuple[float, float]]) -> torch.Tensor:
    """A file's image ``(C, *native)`` in its own voxel order, each channel mapped from its
    ``ranges`` entry to [0, 1] (clipped), non-finite voxels to 0.

    With the ranges of the image's preprocessing (:func:`intensity_ranges`), a voxel gets the
    value it has on the model grid, so a per-voxel map learnt there applies here unchanged.
    """
    array = np.asarray(img.dataobj, dtype=np.float32)
    array = array.reshape(*array.shape[:3], -1)  # 3D, 4D and (X, Y, Z, 1, C) alike
    if array.shape[-1] != len(ranges):
        raise ValueError(f"{array.shape[-1]} channels, {len(ranges)} intensity ranges")
    x = torch.from_numpy(np.moveaxis(array, -1, 0).copy())
    low, high = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1, 1)
                 for v in zip(*ranges, strict=True))
    x = torch.where(torch.isfinite(x), x, low)
    return ((x - low) / (high - low).clamp(min=1e-12)).clamp(0.0, 1.0)


def _combine(generator: nn.Module, x: torch.Tensor, correction: torch.Tensor,
             device: torch.device | str, slab: int = 8) -> torch.Tensor:
    """``generator.combine`` over slabs of the last axis: the curve holds a (voxels x
    knots) tensor, which on a whole fine-grid scan would take gigabytes."""
    with torch.no_grad():
        return torch.cat([generator.combine(x[..., i:i + slab].to(device),
                                            correction[..., i:i + slab].to(device)).cpu()
                          for i in range(0, x.shape[-1], slab)], dim=-1)


def harmonise_on_grids(generator: nn.Module, image_path: str | Path, cfg: Config,
                       device: torch.device | str
                       ) -> tuple[MetaTensor, torch.Tensor, nib.Nifti1Image]:
    """The preprocessed image, the generator's output on the model grid, and the harmonised
    scan on the input's own grid as a ``float32`` NIfTI (channels last).

    A generator with a separate correction (``harmonisation.residual``, the default) never
    sends the scan's own detail through the model grid: the UNet's correction (bias field,
    noise) is computed there and mapped back, and the per-voxel intensity curve is applied
    to the scan on its own grid, ``clamp0(curve(x_native) + correction_native)``. A scan
    finer than the model grid keeps its resolution; on the model grid both are the same
    output. Otherwise the generator's model-grid output is mapped back.
    """
    image, pre = preprocess_image(image_path, cfg)
    if getattr(generator, "head", None) is None:
        img = load_nifti(image_path, header_only=True)  # only the grid to land on
        out = sliding_window(generator, image, cfg, device)
        # A copy: the grid output is returned too, and must not share the inversion's memory.
        native = to_native(out.clone(), image, pre, img)
    else:
        img = load_nifti(image_path)  # the voxels too: the curve applies to them
        correction = sliding_window(generator.correction, image, cfg, device)
        out = _combine(generator, image.as_tensor(), correction, device)
        native = _combine(generator, native_scaled(img, intensity_ranges(pre)),
                          to_native(correction, image, pre, img), device)
    array = native.numpy().astype(np.float32)
    array = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    return image, out, image_like(array, img)


def harmonise_volume(generator: nn.Module, image_path: str | Path, cfg: Config,
                     device: torch.device | str = "cpu") -> nib.Nifti1Image:
    """Harmonise one image file to the reference domain, in the image's own voxel grid.

    Args:
        generator: the site-to-reference generator on ``device``, in eval mode.
        image_path: a NIfTI image (any orientation, spacing, dtype).
        cfg: the config the model was trained with.
        device: where the generator runs.

    Returns:
        A ``float32`` NIfTI with the input's shape and affine (qform/sform copied), whose
        intensities are on the pipeline's normalised scale (reference tissue in about [0, 1]).

    Raises:
        DataError: the image is missing, unreadable or has the wrong channel count.
    """
    return harmonise_on_grids(generator, image_path, cfg, device)[2]


def image_like(array: np.ndarray, like: nib.spatialimages.SpatialImage,
               dtype: type = np.float32) -> nib.Nifti1Image:
    """A NIfTI of ``array`` as ``dtype`` with the geometry (qform, sform, units) of ``like``."""
    out = nib.Nifti1Image(array.astype(dtype), like.affine)
    out.set_data_dtype(dtype)
    header = like.header
    if hasattr(header, "get_qform"):
        # Copy both transforms and their codes, so viewers that prefer either agree.
        qform, qcode = header.get_qform(coded=True)
        sform, scode = header.get_sform(coded=True)
        out.set_qform(qform if qform is not None else like.affine, code=int(qcode))
        out.set_sform(sform if sform is not None else like.affine, code=int(scode))
        out.header.set_xyzt_units(*header.get_xyzt_units())
    return out


def _write(image: nib.Nifti1Image, out_path: str | Path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    image.to_filename(out_path)
    return out_path


def load_segmentation_model(model_path: str | Path, device: str = "auto"
                            ) -> tuple[Config, nn.Module, torch.device]:
    """A saved segmentation model in eval mode on ``device`` (``auto``: CUDA when present).

    Raises:
        FedscanError: not a segmentation model, or weights that do not fit its config.
    """
    cfg, state_dict, _ = load_model(model_path)
    model, dev = segmentation_model(cfg, state_dict, model_path, device)
    return cfg, model, dev


def segmentation_model(cfg: Config, state_dict: dict[str, torch.Tensor], where: str | Path,
                       device: str = "auto") -> tuple[nn.Module, torch.device]:
    """The segmentation model ``cfg`` describes with ``state_dict``, in eval mode on
    ``device``, for a model file already read (``where`` names it in errors).

    Raises:
        FedscanError: not a segmentation model, or weights that do not fit its config.
    """
    if cfg.task != "segmentation":
        raise FedscanError(f"{where}: a {cfg.task} model; predict applies segmentation models")
    model = build_task(cfg).build_model()
    try:
        model.load_state_dict(state_dict)
    except RuntimeError:
        raise FedscanError(f"{where}: weights do not match the model its config "
                           "describes") from None
    dev = resolve_device(device)
    return model.to(dev).eval(), dev


def predict_file(
    model_path: str | Path,
    image_path: str | Path,
    out_path: str | Path,
    *,
    largest_component: bool | None = None,
    device: str = "auto",
) -> Path:
    """Segment ``image_path`` with a saved model and write the label NIfTI to ``out_path``.

    Args:
        model_path: a model file written by :func:`fedscan.shared.checkpoint.save_model`.
        image_path: the NIfTI image to segment.
        out_path: where the ``uint8`` label NIfTI goes (same shape and affine as the input).
        largest_component: keep only the largest foreground component; ``None`` uses the
            model config's ``evaluate.largest_component``.
        device: ``auto``, ``cpu``, ``cuda``...

    Returns:
        ``out_path``.

    Raises:
        FedscanError: one line naming the model or image file at fault.
    """
    cfg, model, dev = load_segmentation_model(model_path, device)
    keep = cfg.evaluate.largest_component if largest_component is None else largest_component
    labels, img = predict_volume(model, image_path, cfg, dev, largest_component=keep)
    return _write(image_like(labels, img, np.uint8), out_path)


def score_prediction(model_path: str | Path, prediction: str | Path, reference: str | Path,
                     *, hd95: bool = True) -> tuple[dict[str, float], list[str]]:
    """Dice (and HD95) per class of a predicted label map against a reference label map.

    Args:
        model_path: the model file that made ``prediction`` (its class count and names).
        prediction: the label NIfTI predict wrote.
        reference: the reference label NIfTI of the same scan (same grid).
        hd95: also compute HD95 (mm, from the reference's affine).

    Returns:
        ``(metrics, class_names)``: :func:`~fedscan.shared.metrics.case_metrics`' keys, and
        every class's name, background first.

    Raises:
        DataError: a file is unreadable, its values are not the model's classes, or the grids
            differ; the message names the file.
    """
    from fedscan.shared.config import class_names
    from fedscan.shared.data import AFFINE_ATOL, read_label
    from fedscan.shared.metrics import case_metrics, native_spacing

    cfg, _, _ = load_model(model_path)
    n = cfg.data.num_classes
    pred = read_label(prediction, n)
    label = read_label(reference, n, pred.shape)
    ref_img, pred_img = load_nifti(reference, "label"), load_nifti(prediction, "label")
    if not np.allclose(ref_img.affine, pred_img.affine, rtol=0.0, atol=AFFINE_ATOL):
        raise DataError(f"{reference}: its affine differs from the prediction's ({prediction}):"
                        " the reference must be on the scan's own grid")
    names = class_names(cfg.data)
    return case_metrics(pred, label, n, native_spacing(ref_img), hd95=hd95,
                        class_names=names), names


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
    return _write(harmonise_volume(generator, image_path, cfg, dev), out_path)
