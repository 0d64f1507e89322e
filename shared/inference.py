"""Whole-volume prediction in the input's native grid (used by evaluate and the CLI's predict).

The image goes through the shared preprocessing, a sliding-window pass on the model's grid,
then ``Invertd`` maps the class probabilities back to the input's voxel grid, where they are
turned into labels. Inverting probabilities (bilinear) rather than labels (nearest) gives
smoother boundaries when the native grid is finer than the model's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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
from fedscan.shared.errors import DataError, FedscanError, root_cause
from fedscan.shared.preprocessing import preprocess_transforms
from fedscan.shared.tasks import build_task
from fedscan.shared.tasks.base import resolve_device


def load_nifti(path: str | Path, what: str = "image") -> nib.spatialimages.SpatialImage:
    """Open a NIfTI header (lazily) or raise a one-line :class:`DataError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises many types for a bad file
        raise DataError(f"{path}: not a readable NIfTI {what} ({_why(exc)})") from None
    if len(img.shape) < 3:
        raise DataError(f"{path}: expected a 3D {what}, got shape {tuple(img.shape)}")
    return img


def require_largest_component() -> None:
    """Raise a one-line error when MONAI's connected components (scikit-image) are missing."""
    if not optional_import("skimage.measure")[1]:
        raise FedscanError("largest_component needs scikit-image (pip install scikit-image)")


def _why(exc: Exception) -> str:
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0]}" if first else type(exc).__name__


def _predictor(model: nn.Module, spatial_dims: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network as ``sliding_window_inference`` calls it on ``(B, C, X, Y, Z)`` windows.

    A 2D network sees ``(X, Y, 1)`` windows with the singleton slice axis squeezed away.
    """
    if spatial_dims == 3:
        return model
    return lambda x: model(x.squeeze(-1)).unsqueeze(-1)


def sliding_window_logits(model: nn.Module, image: torch.Tensor, cfg: Config,
                          device: torch.device) -> torch.Tensor:
    """Logits ``(num_classes, *spatial)`` for a preprocessed ``(C, *spatial)`` image."""
    # The network sees plain tensors; the meta stays with ``image`` for the inversion.
    x = image.as_tensor() if isinstance(image, MetaTensor) else image
    logits = sliding_window_inference(
        x[None].to(device),
        roi_size=list(cfg.train.patch_size),  # windows are training patches (padded if larger)
        sw_batch_size=cfg.evaluate.sw_batch_size,
        predictor=_predictor(model, cfg.model.spatial_dims),
        overlap=cfg.evaluate.sw_overlap,
        mode="gaussian",
    )
    return logits[0]


def preprocess_image(image_path: str | Path, cfg: Config) -> tuple[MetaTensor, Compose]:
    """The preprocessed ``(C, *spatial)`` image and the transform that made it (to invert).

    Raises:
        DataError: one line naming the file when it is missing, unreadable, cannot be
            preprocessed or has the wrong channel count.
    """
    image_path = Path(image_path)
    load_nifti(image_path)  # header check: missing or corrupt files named on one line
    pre = preprocess_transforms(cfg.data, keys=("image",))
    try:
        image = pre({"image": str(image_path)})["image"]
    except Exception as exc:  # MONAI wraps reader errors in RuntimeError chains
        raise DataError(f"{image_path}: could not be read or preprocessed "
                           f"({_why(root_cause(exc))})") from None
    if image.shape[0] != cfg.data.in_channels:
        raise DataError(f"{image_path}: has {image.shape[0]} channel(s), the model expects "
                           f"{cfg.data.in_channels} (data.in_channels)")
    return image, pre


def predict_volume(
    model: nn.Module,
    image_path: str | Path,
    cfg: Config,
    device: torch.device | str,
    *,
    largest_component: bool = False,
) -> tuple[np.ndarray, nib.spatialimages.SpatialImage]:
    """Segment one image file in its own voxel grid.

    The caller puts ``model`` in eval mode (evaluation does); this function only runs it
    under ``torch.no_grad``.

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
        FedscanError: the image is missing, unreadable or has the wrong channel count.
    """
    image_path = Path(image_path)
    img = load_nifti(image_path)
    image, pre = preprocess_image(image_path, cfg)

    with torch.no_grad():
        probs = torch.softmax(sliding_window_logits(model, image, cfg, torch.device(device)), 0)
    # Invertd gives the MetaTensor the image's trace and undoes Spacing and Orientation
    # (a plain tensor would be skipped with only a warning).
    inverter = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)
    native = inverter({"image": image, "pred": MetaTensor(probs.cpu())})["pred"]
    labels = native.argmax(0, keepdim=True)
    if largest_component:
        require_largest_component()
        foreground = list(range(1, cfg.data.num_classes))
        keep = KeepLargestConnectedComponent(applied_labels=foreground, independent=False)
        labels = keep(labels)
    labels = np.asarray(torch.as_tensor(labels)[0].numpy(), dtype=np.uint8)
    expected = tuple(img.shape[:3])
    if labels.shape != expected:  # a broken trace must never write a misaligned mask
        raise RuntimeError(f"{image_path}: prediction shape {labels.shape} != image {expected}")
    return labels, img


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
    cfg, state_dict, _ = load_model(model_path)
    task = build_task(cfg)
    model = task.build_model()
    try:
        model.load_state_dict(state_dict)
    except RuntimeError:
        raise FedscanError(f"{model_path}: weights do not match the model its config "
                           "describes") from None
    dev = resolve_device(device)
    model.to(dev).eval()
    keep = cfg.evaluate.largest_component if largest_component is None else largest_component
    labels, img = predict_volume(model, image_path, cfg, dev, largest_component=keep)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    image_like(labels, img, np.uint8).to_filename(out_path)
    return out_path
