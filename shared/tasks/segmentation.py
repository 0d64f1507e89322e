"""Volumetric segmentation task: MONAI UNet trained on random patches, evaluated in native grids.

Pure PyTorch/MONAI (no Flower), so federated, local and pooled runs share it. It also works
with Opacus-wrapped model, optimiser and loader (``PrivacyEngine.make_private``): the loader
is map-style with one item per case (Poisson sampling over cases), the loss is separable per
sample, and empty Poisson batches still take the noise-only step of the DP mechanism.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.nets import UNet
from monai.networks.utils import one_hot
from monai.transforms import (
    Compose,
    EnsureTyped,
    RandAdjustContrastd,
    RandBiasFieldd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
    SqueezeDimd,
)
from nibabel.affines import voxel_sizes
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedscan.shared.config import Config, DataConfig
from fedscan.shared.errors import ConfigError, DataError, FedscanError, root_cause
from fedscan.shared.inference import load_nifti, predict_volume, require_largest_component
from fedscan.shared.preprocessing import LABEL_DTYPE, preprocess_transforms
from fedscan.shared.tasks.base import (
    Case,
    EvalResult,
    MetricSpec,
    Phase,
    StepCallback,
    TrainResult,
    proximal_hook,
    shared_params,
)
from fedscan.shared.tasks.common import (
    VOLUME_CACHE,
    batch_size,
    case_loader,
    cycle,
    empty_step,
    file_key,
)

KEYS = ("image", "label")

#: Budget of the per-process cache of preprocessed training volumes (bytes).


class SegmentationTask:
    """MONAI UNet segmentation behind the :class:`~fedscan.shared.tasks.base.Task` seam.

    Args:
        cfg: the run's config (``data``, ``model``, ``train`` and ``evaluate`` keys).
    """

    name = "segmentation"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        dice = MetricSpec("dice", higher_is_better=True, low=0.0, high=1.0, per_class=True,
                          headline=True)
        hd95 = MetricSpec("hd95", higher_is_better=False, low=0.0, per_class=True, unit="mm")
        self.metrics = (dice, hd95) if cfg.evaluate.hd95 else (dice,)
        dims, patch = cfg.model.spatial_dims, cfg.train.patch_size
        factor = math.prod(cfg.model.strides)
        if any(p % factor for p in patch[:dims]):
            raise ConfigError(f"config key 'train.patch_size': the first {dims} entries must be "
                              f"multiples of {factor} (the product of model.strides)")
        if not 0.0 <= cfg.train.pos_fraction <= 1.0:
            raise ConfigError("config key 'train.pos_fraction': must be between 0 and 1")
        if cfg.data.num_classes > torch.iinfo(LABEL_DTYPE).max + 1:
            raise ConfigError("config key 'data.num_classes': at most 256 classes")
        if cfg.evaluate.largest_component:
            try:
                require_largest_component()
            except FedscanError as exc:
                raise ConfigError(f"config key 'evaluate.largest_component': {exc}") from None

    # -- model and optimiser -----------------------------------------------------------------

    def build_model(self) -> nn.Module:
        """A UNet whose initial weights depend only on ``cfg.seed`` (same on every site)."""
        m = self.cfg.model
        # Instance and group norm keep per-sample statistics, which Opacus requires.
        norm = ("INSTANCE", {"affine": True}) if m.norm == "instance" else (
            "GROUP", {"num_groups": 2})
        with torch.random.fork_rng(devices=[]):  # seed the init without touching global RNG
            torch.manual_seed(self.cfg.seed)
            return UNet(
                spatial_dims=m.spatial_dims,
                in_channels=self.cfg.data.in_channels,
                out_channels=self.cfg.data.num_classes,
                channels=m.channels,
                strides=m.strides,
                num_res_units=m.num_res_units,
                norm=norm,
                dropout=m.dropout,
            )

    def make_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """Adam, or SGD with momentum 0.9, at ``train.lr`` and ``train.weight_decay``."""
        t = self.cfg.train
        if t.optimizer == "sgd":
            return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)

    def shared_keys(self, model: nn.Module) -> list[str]:
        """Every state-dict key, except the normalisation layers' with ``model.local_norm``
        (FedBN: each site keeps its own)."""
        keys = list(model.state_dict().keys())
        if not self.cfg.model.local_norm:
            return keys
        local = {f"{name}.{k}" for name, module in model.named_modules()
                 if isinstance(module, _NORM_TYPES) for k in module.state_dict()}
        return [k for k in keys if k not in local]

    # -- training ------------------------------------------------------------------------------

    def train_transforms(self) -> Compose:
        """Random patch sampling and augmentation applied to a cached preprocessed case.

        Intensity augmentation imitates another scanner (contrast curve, bias field, gain,
        offset, blur, noise; ``train.scanner_augmentation``); spatial augmentation stays
        cheap (a left-right flip).
        """
        cfg = self.cfg
        patch = cfg.train.patch_size
        pos = cfg.train.pos_fraction
        lr_axis = next(i for i, c in enumerate(cfg.data.orientation.upper()) if c in "LR")
        steps = [
            SpatialPadd(KEYS, spatial_size=patch),
            # Negatives come from inside the body (image > 0), not the empty background.
            RandCropByPosNegLabeld(KEYS, label_key="label", spatial_size=patch, pos=pos,
                                   neg=1.0 - pos, num_samples=1, image_key="image",
                                   image_threshold=0.0),
            RandFlipd(KEYS, prob=0.5, spatial_axis=lr_axis),
        ]
        if cfg.train.scanner_augmentation:
            steps += [
                RandBiasFieldd("image", prob=0.3, coeff_range=(0.0, 0.2)),
                RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5)),
                RandScaleIntensityd("image", factors=0.15, prob=0.5),
                RandShiftIntensityd("image", offsets=0.1, prob=0.5),
                RandGaussianSmoothd("image", prob=0.15, sigma_x=(0.5, 1.0),
                                    sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
                RandGaussianNoised("image", prob=0.2, std=0.05),
            ]
        if cfg.model.spatial_dims == 2:
            steps.append(SqueezeDimd(KEYS, dim=-1))  # (C, X, Y, 1) -> (C, X, Y)
        # Plain tensors: no meta to collate, nothing unusual for Opacus' hooks.
        steps.append(EnsureTyped(KEYS, track_meta=False))
        return Compose(steps)

    def make_train_loader(self, cases: list[Case], seed: int) -> DataLoader:
        """Map-style loader: one item per case, each a fresh random patch of that case.

        Preprocessed volumes are cached per process (across rounds). Batches are
        ``{"image": (B, C, *patch), "label": (B, 1, *patch)}``.

        Raises:
            DataError: a case is missing, unreadable, or has bad labels or channels.
        """
        if not cases:
            raise DataError("no training cases")
        transform = self.train_transforms()
        transform.set_random_state(seed=seed)
        dataset = PatchDataset([_cached_volume(c, self.cfg.data) for c in cases], transform)
        return case_loader(dataset, self.cfg.train, seed)

    def train_steps(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader,
        steps: int,
        *,
        proximal_mu: float = 0.0,
        on_step: StepCallback | None = None,
    ) -> TrainResult:
        """Run exactly ``steps`` optimiser steps of Dice+CE, cycling over ``loader``.

        FedProx's ``mu/2 * ||w - w0||^2`` enters as its gradient ``mu * (w - w0)``, added
        just before the wrapped optimiser's update: under Opacus that is after clipping and
        noise, where a data-independent term belongs (a loss term would be missed by the
        per-sample gradients). The reported loss is Dice+CE without the proximal term.

        An empty batch (Poisson sampling) still counts as a step: a DP optimiser takes its
        noise-only step, a plain one has nothing to do. ``on_step`` gets the running mean
        loss.

        Returns:
            Mean loss over non-empty batches, ``len(loader.dataset)`` examples, ``steps``.
        """
        device = next(model.parameters()).device
        # batch=False keeps Dice per sample, so the loss stays separable for per-sample clipping.
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        model.train()
        hook = (proximal_hook(optimizer, proximal_mu, shared_params(self, model))
                if proximal_mu > 0 else None)
        losses: list[float] = []
        batches = cycle(loader)
        try:
            for step in range(1, steps + 1):
                batch = next(batches)
                optimizer.zero_grad(set_to_none=True)
                if batch_size(batch) == 0:
                    empty_step(optimizer)
                else:
                    image = batch["image"].to(device, non_blocking=True)
                    label = batch["label"].to(device, non_blocking=True)
                    loss = loss_fn(model(image), label)
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.item())
                if on_step is not None:
                    on_step(step, steps, float(np.mean(losses)) if losses else float("nan"))
        finally:
            optimizer.zero_grad(set_to_none=True)
            if hook is not None:
                hook.remove()
        mean = float(np.mean(losses)) if losses else float("nan")
        return TrainResult(loss=mean, num_examples=len(loader.dataset), steps=steps)

    def phases(self, model: nn.Module) -> list[Phase]:
        """One phase, ``unet``: every parameter, per-case Dice+CE.

        The mean of the per-case losses is :meth:`train_steps`' batch loss (Dice per sample,
        cross-entropy over equally many voxels per case), so DP-SGD on this phase follows
        the same objective.
        """
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

        def loss(net: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            image, label = batch["image"], batch["label"]
            if image.shape[0] == 0:
                return image.new_zeros(0)
            pred = net(image)
            return torch.stack([loss_fn(pred[i:i + 1], label[i:i + 1])
                                for i in range(pred.shape[0])])

        return [Phase("unet", [p for p in model.parameters() if p.requires_grad], loss)]

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, cases: list[Case]) -> EvalResult:
        """Dice (and HD95 in mm) of whole-volume predictions in each case's native grid.

        Prediction is :func:`~fedscan.shared.inference.predict_volume`, the same as the CLI's
        predict. Dice is the mean over foreground classes (1 when a class is absent from both
        label and prediction). HD95 is undefined when a class is absent from either; such
        classes are left out of a case's mean, a case with none defined gets ``nan`` and is
        left out of the mean over cases (``nan`` when no case has one).

        Returns:
            Mean ``dice`` (and ``hd95``) over cases, ``len(cases)``, per-case metrics.
        """
        if not cases:
            return EvalResult(metrics={}, num_examples=0, per_case={})
        cfg = self.cfg
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        per_case: dict[str, dict[str, float]] = {}
        try:
            with torch.no_grad():
                for case in cases:
                    pred, img = predict_volume(model, case["image"], cfg, device,
                                               largest_component=cfg.evaluate.largest_component)
                    label = read_label(case["label"], pred.shape, cfg.data.num_classes)
                    spacing = native_spacing(img)
                    per_case[case_id(case)] = case_metrics(
                        pred, label, cfg.data.num_classes, spacing, hd95=cfg.evaluate.hd95)
        finally:
            model.train(was_training)
        metrics = {"dice": float(np.mean([m["dice"] for m in per_case.values()]))}
        if cfg.evaluate.hd95:
            hd = [m["hd95"] for m in per_case.values() if math.isfinite(m["hd95"])]
            metrics["hd95"] = float(np.mean(hd)) if hd else float("nan")
        return EvalResult(metrics=metrics, num_examples=len(cases), per_case=per_case)


# -- training data ---------------------------------------------------------------------------


#: Layers FedBN keeps local (instance and group norm: the ones Opacus accepts).
_NORM_TYPES = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm)


class PatchDataset(Dataset):
    """One item per case: ``transform`` applied to a copy of its preprocessed volume.

    Args:
        volumes: preprocessed ``{"image", "label"}`` tensors, one per case.
        transform: random patch sampling and augmentation (:meth:`train_transforms`).
    """

    def __init__(self, volumes: list[dict[str, torch.Tensor]], transform: Compose) -> None:
        self.volumes = volumes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        # Copy, so no transform can ever write into the shared cache.
        item = self.transform({k: v.clone() for k, v in self.volumes[index].items()})
        return item[0] if isinstance(item, list) else item  # num_samples=1 gives a list


def _cached_volume(case: Case, data: DataConfig) -> dict[str, torch.Tensor]:
    """The preprocessed ``{"image", "label"}`` of a case (checked), from the cache if there."""
    key = (file_key(case["image"], "image"), file_key(case["label"], "label"),
           json.dumps(asdict(data), sort_keys=True))
    hit = VOLUME_CACHE.get(key)
    if hit is not None:
        return hit
    for k in KEYS:
        load_nifti(case[k], k)  # header check: a one-line error naming the file
    try:
        out = preprocess_transforms(data, KEYS)({k: case[k] for k in KEYS})
    except Exception as exc:  # MONAI wraps reader errors in RuntimeError chains
        raise DataError(_preprocess_failure(case, exc)) from None
    image, label = out["image"].as_tensor(), out["label"].as_tensor()
    if image.shape[0] != data.in_channels:
        raise DataError(f"{case['image']}: has {image.shape[0]} channel(s), data.in_channels is "
                        f"{data.in_channels}")
    if label.shape[0] != 1 or label.shape[1:] != image.shape[1:]:
        raise DataError(f"{case['label']}: grid {tuple(label.shape[1:])} does not match its "
                        f"image's {tuple(image.shape[1:])} after resampling")
    if int(label.max()) >= data.num_classes:
        raise DataError(f"{case['label']}: label value {int(label.max())} is not below "
                        f"data.num_classes ({data.num_classes})")
    value = {"image": image.contiguous(), "label": label.contiguous()}
    VOLUME_CACHE.put(key, value)
    return value


def _preprocess_failure(case: Case, exc: Exception) -> str:
    """One line naming the file that broke preprocessing (read failures are checked first)."""
    for k in KEYS:
        try:
            np.asanyarray(load_nifti(case[k], k).dataobj)
        except Exception as read_exc:  # truncated or corrupt data only fails when read
            return f"{case[k]}: not a readable NIfTI {k} ({type(read_exc).__name__})"
    root = root_cause(exc)
    why = str(root).strip().splitlines()
    return (f"{case['image']} / {case['label']}: could not be preprocessed "
            f"({type(root).__name__}{': ' + why[0] if why else ''})")


# -- evaluation helpers -------------------------------------------------------------------


def case_id(case: Case) -> str:
    """The case's id, or its image file name without the NIfTI suffix."""
    if case.get("case"):
        return str(case["case"])
    name = Path(case["image"]).name
    return name.removesuffix(".gz").removesuffix(".nii")


def native_spacing(img) -> tuple[float, ...]:
    """Voxel sizes in mm of a nibabel image (from its affine, right for oblique grids too)."""
    return tuple(float(s) for s in voxel_sizes(img.affine)[:3])


def read_label(path: str, shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    """A native-grid label map as integer classes, checked against its image's shape.

    Raises:
        DataError: unreadable, wrong shape, or values outside ``0 .. num_classes - 1``.
    """
    try:
        img = load_nifti(path, "label")
        arr = np.asanyarray(img.dataobj)
    except FedscanError as exc:
        raise DataError(str(exc)) from None
    except Exception as exc:  # truncated data only fails when read
        raise DataError(f"{path}: not a readable NIfTI label ({type(exc).__name__})") from None
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.shape != tuple(shape):
        raise DataError(f"{path}: shape {arr.shape} differs from its image's {tuple(shape)}")
    arr = np.rint(arr).astype(np.int64)
    if arr.min() < 0 or arr.max() >= num_classes:
        raise DataError(f"{path}: label values {arr.min()}..{arr.max()} outside "
                        f"0..{num_classes - 1} (data.num_classes)")
    return arr


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
