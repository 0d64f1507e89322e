"""Volumetric segmentation task: MONAI UNet trained on random patches, evaluated in native grids.

Pure PyTorch/MONAI (no Flower), so federated, local and pooled runs share it, and fit for
DP-SGD at a site (``client/privacy.py``): the loader is map-style with one item per case
(Poisson sampling over cases), the loss is separable per sample, and the norms keep
per-sample statistics.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import (
    BorderPadd,
    Compose,
    EnsureTyped,
    RandAdjustContrastd,
    RandBiasFieldd,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
    SqueezeDimd,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedscan.shared.config import Config, class_names
from fedscan.shared.data import case_id, load_nifti, read_label
from fedscan.shared.errors import ConfigError, DataError, FedscanError
from fedscan.shared.inference import predict_volume, require_largest_component
from fedscan.shared.metrics import case_metrics, mean_over_cases, native_spacing
from fedscan.shared.preprocessing import LABEL_DTYPE, cached_case
from fedscan.shared.tasks.augmentation import (
    background_artefacts,
    lateral_axis,
    lateral_flip,
    lateral_swap,
)
from fedscan.shared.tasks.base import Case, EvalResult, MetricSpec, Phase, evaluating
from fedscan.shared.tasks.loop import case_loader

KEYS = ("image", "label")


class SegmentationTask:
    """MONAI UNet segmentation behind the :class:`~fedscan.shared.tasks.base.Task` seam.

    Args:
        cfg: the run's config (``data``, ``model``, ``train`` and ``evaluate`` keys).
    """

    name = "segmentation"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        dice = MetricSpec("dice", higher_is_better=True, low=0.0, high=1.0, per_class=True,
                          headline=True, description="overlap between predicted and reference "
                          "segmentation, mean over foreground classes (1 is perfect)")
        hd95 = MetricSpec("hd95", higher_is_better=False, low=0.0, per_class=True, unit="mm",
                          description="95th-percentile distance between predicted and "
                          "reference boundaries")
        self.metrics = (dice, hd95) if cfg.evaluate.hd95 else (dice,)
        dims, patch = cfg.model.spatial_dims, cfg.train.patch_size
        factor = math.prod(cfg.model.strides)
        if any(p % factor for p in patch[:dims]):
            raise ConfigError(f"config key 'train.patch_size': the first {dims} entries must be "
                              f"multiples of {factor} (the product of model.strides)")
        if not 0.0 <= cfg.train.pos_fraction <= 1.0:
            raise ConfigError("config key 'train.pos_fraction': must be between 0 and 1")
        #: Patch centres split equally over the foreground classes (``train.class_balanced``;
        #: by default when there is more than one).
        self.class_balanced = (cfg.data.num_classes > 2 if cfg.train.class_balanced is None
                               else cfg.train.class_balanced)
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

        Patch centres are foreground with probability ``train.pos_fraction``, split equally
        over the foreground classes with ``train.class_balanced``.
        Intensity augmentation imitates another scanner (contrast curve, bias field, gain,
        offset, blur, noise; ``train.scanner_augmentation``), and puts a noise floor and hot
        spots into the background only, with negative patches drawn from the whole field of
        view (``train.background_augmentation``). The only spatial augmentation
        is a left-right flip, and only where the labels allow it
        (:func:`~fedscan.shared.tasks.augmentation.lateral_swap`: declared mirror pairs are
        swapped with it, or the label set is declared symmetric).
        """
        cfg = self.cfg
        patch = cfg.train.patch_size
        pos = cfg.train.pos_fraction
        background = cfg.train.background_augmentation
        # Negatives come from the whole field of view when the background gets artefacts
        # (air is where unseen scanners put noise); else from inside the body (image > 0).
        negatives_in = None if background else "image"
        steps = [SpatialPadd(KEYS, spatial_size=patch)]
        if background:
            # Air around the scan, half a patch deep: patches then also see what windows at
            # the edge of a larger field of view see (mostly air, which instance norm would
            # otherwise amplify), and the background artefacts fill it with noise.
            steps.append(BorderPadd(KEYS, spatial_border=[p // 2 for p in patch[:3]]))
        if self.class_balanced:
            foreground = cfg.data.num_classes - 1
            steps.append(RandCropByLabelClassesd(
                KEYS, label_key="label", spatial_size=patch,
                ratios=[1.0 - pos, *[pos / foreground] * foreground],
                num_classes=cfg.data.num_classes, num_samples=1, image_key=negatives_in,
                image_threshold=0.0, warn=False))  # a class absent from a case: ratio 0
        else:
            steps.append(RandCropByPosNegLabeld(
                KEYS, label_key="label", spatial_size=patch, pos=pos, neg=1.0 - pos,
                num_samples=1, image_key=negatives_in, image_threshold=0.0))
        swap = lateral_swap(cfg.data)
        if swap is not None:
            steps.append(lateral_flip(KEYS, "label", lateral_axis(cfg.data.orientation), swap))
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
        if background:
            # After the contrast changes: noise and hot spots are added at acquisition.
            steps.append(background_artefacts(["image"], "label", patch[:3]))
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
        dataset = PatchDataset([cached_case(c, self.cfg.data, KEYS) for c in cases], transform)
        return case_loader(dataset, self.cfg.train, seed)

    def phases(self, model: nn.Module) -> list[Phase]:
        """One phase, ``unet``: every parameter, per-case Dice+CE.

        The mean of the per-case losses is the batch's Dice+CE (Dice per sample,
        cross-entropy over equally many voxels per case), so plain and DP-SGD training
        follow the same objective.
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
        left out of the mean over cases (``nan`` when no case has one). Each foreground
        class also gets ``dice/<class>`` (and ``hd95/<class>``), named from ``data.labels``
        (:func:`~fedscan.shared.config.class_names`), so every site sends the same keys.

        Returns:
            Mean ``dice`` (and ``hd95``) and per-class means over cases, ``len(cases)``,
            per-case metrics.
        """
        if not cases:
            return EvalResult(metrics={}, num_examples=0, per_case={})
        cfg = self.cfg
        device = next(model.parameters()).device
        names = class_names(cfg.data)
        per_case: dict[str, dict[str, float]] = {}
        with evaluating(model):
            for case in cases:
                pred, img = predict_volume(model, case["image"], cfg, device,
                                           largest_component=cfg.evaluate.largest_component)
                label = read_label(case["label"], cfg.data.num_classes, pred.shape)
                per_case[case_id(case)] = case_metrics(
                    pred, label, cfg.data.num_classes, native_spacing(img),
                    hd95=cfg.evaluate.hd95, class_names=names)
        return EvalResult(metrics=mean_over_cases(per_case.values()), num_examples=len(cases),
                          per_case=per_case)

    def preview(self, model: nn.Module, case: Case) -> np.ndarray:
        """One slice of a case as three panels: image, truth (green), prediction (red).

        The slice is the one (along the image's third voxel axis) with the most labelled
        foreground. Returns an RGB ``uint8`` array ``(H, 3 * W, 3)``.
        """
        device = next(model.parameters()).device
        with evaluating(model):
            pred, _ = predict_volume(model, case["image"], self.cfg, device,
                                     largest_component=self.cfg.evaluate.largest_component)
        label = read_label(case["label"], self.cfg.data.num_classes, pred.shape)
        image = np.asarray(load_nifti(case["image"]).dataobj, dtype=np.float32)
        if image.ndim > 3:
            image = image[..., 0]  # the first channel
        z = int(np.argmax((label > 0).sum(axis=(0, 1)))) if label.ndim == 3 else 0
        grey = image[..., z]
        low, high = np.percentile(grey, [1, 99])
        grey = np.clip((grey - low) / max(high - low, 1e-6), 0, 1)
        base = np.repeat(grey[..., None], 3, axis=-1)
        truth, guess = base.copy(), base.copy()
        truth[label[..., z] > 0] = 0.5 * truth[label[..., z] > 0] + [0, 0.5, 0]
        guess[pred[..., z] > 0] = 0.5 * guess[pred[..., z] > 0] + [0.5, 0, 0]
        return (np.concatenate([base, truth, guess], axis=1) * 255).astype(np.uint8)


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
