"""What a site trains its CycleGAN on: random patches of its own scans, each with a random
patch of the public reference dataset (unpaired)."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    RandFlipd,
    Randomizable,
    RandSpatialCropd,
    SpatialPadd,
    SqueezeDimd,
)
from torch.utils.data import DataLoader, Dataset

from fedscan.shared.config import Config
from fedscan.shared.data import Case, read_dataset
from fedscan.shared.errors import ConfigError, DataError
from fedscan.shared.preprocessing import cached_case
from fedscan.shared.tasks.loop import case_loader


def patch_transforms(cfg: Config) -> Compose:
    """Random patch (padded if the volume is smaller) and a left-right flip.

    No intensity augmentation: intensities are exactly what the generators must learn to
    map, so a random contrast change would teach them the wrong domain.
    """
    patch = cfg.train.patch_size
    lr_axis = next(i for i, c in enumerate(cfg.data.orientation.upper()) if c in "LR")
    steps = [
        SpatialPadd("image", spatial_size=patch),
        RandSpatialCropd("image", roi_size=patch, random_size=False),
        RandFlipd("image", prob=0.5, spatial_axis=lr_axis),
    ]
    if cfg.model.spatial_dims == 2:
        steps.append(SqueezeDimd("image", dim=-1))  # (C, X, Y, 1) -> (C, X, Y)
    steps.append(EnsureTyped("image", track_meta=False))
    return Compose(steps)


def reference_cases(cfg: Config) -> list[Case]:
    """Every case of the public reference dataset (``harmonisation.reference``).

    Raises:
        ConfigError: no reference folder is configured.
        DataError: the folder violates the data contract.
    """
    ref = cfg.harmonisation.reference
    if ref is None:
        raise ConfigError("config key 'harmonisation.reference': required to train (a "
                          "public reference-domain dataset folder, MSD layout)")
    data = cfg.data
    site = read_dataset(ref, name="reference", in_channels=data.in_channels, check=False)
    return site.cases


def unpaired_loader(cfg: Config, cases: list[Case], seed: int) -> DataLoader:
    """Map-style loader: one item per site case, with a random reference patch.

    Item i is ``{"image": random patch of case i, "reference": random patch of a random
    reference case}``, so Poisson sampling over the site's cases is sampling over
    patients. Preprocessed volumes (site and reference) are cached per process. Batches
    are ``{"image": (B, C, *patch), "reference": (B, C, *patch)}``.

    Raises:
        DataError: a case is missing, unreadable or has the wrong channel count.
        ConfigError: no reference dataset is configured.
    """
    if not cases:
        raise DataError("no training cases")
    data = cfg.data
    public = reference_cases(cfg)  # a missing reference fails before any load
    site = [cached_case(c, data, ("image",))["image"] for c in cases]
    reference = [cached_case(c, data, ("image",))["image"] for c in public]
    dataset = UnpairedPatchDataset(site, reference, patch_transforms(cfg))
    dataset.set_random_state(seed=seed % 2**32)
    return case_loader(dataset, cfg.train, seed)


class UnpairedPatchDataset(Randomizable, Dataset):
    """One item per site case: a random patch of it and of a random reference volume.

    Randomizable, so MONAI's ``worker_init_fn`` re-seeds the reference picks and the patch
    transform in each worker.

    Args:
        site: preprocessed site images ``(C, *spatial)``, one per case (private).
        reference: preprocessed reference images (public).
        transform: random patch sampling (:func:`patch_transforms`).
    """

    def __init__(self, site: list[torch.Tensor], reference: list[torch.Tensor],
                 transform: Compose) -> None:
        if not reference:
            raise DataError("the reference dataset has no cases")
        self.site = site
        self.reference = reference
        self.transform = transform

    def set_random_state(self, seed: int | None = None,
                         state: np.random.RandomState | None = None) -> UnpairedPatchDataset:
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed=int(self.R.randint(2**31)))
        return self

    def randomize(self, data: object = None) -> None:
        self._ref = int(self.R.randint(len(self.reference)))

    def __len__(self) -> int:
        return len(self.site)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.randomize()
        # Copies (clone), so no transform can ever write into the shared cache.
        image = self.transform({"image": self.site[index].clone()})["image"]
        reference = self.transform({"image": self.reference[self._ref].clone()})["image"]
        return {"image": image, "reference": reference}
