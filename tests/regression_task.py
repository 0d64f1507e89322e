"""A test-only task: all a new task needs is one file like this one.

It predicts each voxel's label from that voxel's intensity with a single 1x1x1 convolution
(one weight per channel and a bias) and reports its own metric, ``mae``. Nothing outside this
file knows it: a config names it ``task: "regression_task:RegressionTask"`` (simulation only;
the module must be importable, here through ``PYTHONPATH``), and the history, the report, the
plots and the server take its metric from :attr:`RegressionTask.metrics`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from monai.transforms import ResizeWithPadOrCropd
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedscan.shared.config import Config
from fedscan.shared.data import Case, case_id
from fedscan.shared.preprocessing import cached_case
from fedscan.shared.tasks.base import EvalResult, MetricSpec, Phase, evaluating
from fedscan.shared.tasks.loop import case_loader


class _Volumes(Dataset):
    """One item per case: its preprocessed image and label, padded or cropped to a patch."""

    def __init__(self, volumes: list[dict[str, torch.Tensor]], patch: list[int]) -> None:
        self.volumes = volumes
        self.fit = ResizeWithPadOrCropd(("image", "label"), spatial_size=patch)

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.fit({k: v.clone() for k, v in self.volumes[index].items()})
        return {"image": torch.as_tensor(item["image"]),
                "label": torch.as_tensor(item["label"]).float()}


class RegressionTask:
    """Voxel-wise linear regression of the label map on the image."""

    name = "regression"
    metrics = (MetricSpec("mae", higher_is_better=False, low=0.0, headline=True,
                          description="mean absolute difference of the predicted and the "
                          "reference label map per voxel"),)

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            return nn.Conv3d(self.cfg.data.in_channels, 1, kernel_size=1)

    def make_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.cfg.train.lr)

    def shared_keys(self, model: nn.Module) -> list[str]:
        return list(model.state_dict())

    def make_train_loader(self, cases: list[Case], seed: int) -> DataLoader:
        volumes = [cached_case(c, self.cfg.data) for c in cases]
        return case_loader(_Volumes(volumes, self.cfg.train.patch_size), self.cfg.train, seed)

    def phases(self, model: nn.Module) -> list[Phase]:
        def loss(net: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return (net(batch["image"]) - batch["label"]).abs().flatten(1).mean(1)

        return [Phase("regression", list(model.parameters()), loss)]

    def evaluate(self, model: nn.Module, cases: list[Case]) -> EvalResult:
        if not cases:
            return EvalResult(metrics={}, num_examples=0)
        device = next(model.parameters()).device
        per_case = {}
        with evaluating(model):
            for case in cases:
                volume = cached_case(case, self.cfg.data)
                pred = model(volume["image"][None].float().to(device))[0].cpu()
                per_case[case_id(case)] = {
                    "mae": float((pred - volume["label"].float()).abs().mean())}
        mae = float(np.mean([m["mae"] for m in per_case.values()]))
        return EvalResult(metrics={"mae": mae}, num_examples=len(cases), per_case=per_case)
