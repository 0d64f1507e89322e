"""The one plain training loop: a task's phases, step after step (DP-SGD's is in client/).

A task says what differs (model, loader, optimiser, :class:`~fedscan.shared.tasks.base.Phase`
losses); :func:`train_steps` runs them the same way for every task, in federated, local and
pooled runs. ``client/privacy.py`` runs the same phases under DP-SGD.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from monai.data.utils import worker_init_fn
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from fedscan.shared.config import TrainConfig
from fedscan.shared.errors import DataError
from fedscan.shared.tasks.base import StepCallback, Task, TrainResult, proximal_hook, shared_params


def case_loader(dataset: Dataset, train: TrainConfig, seed: int) -> DataLoader:
    """Shuffled map-style loader of ``train.batch_size`` items, seeded by ``seed``."""
    return DataLoader(
        dataset,
        batch_size=train.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=train.num_workers,
        # MONAI's worker_init_fn re-seeds each worker's random transforms differently.
        worker_init_fn=worker_init_fn,
        collate_fn=default_collate,
        drop_last=False,
    )


def cycle(loader: DataLoader) -> Iterator:
    """Batches of ``loader``, restarting it (a new shuffle or Poisson draw) when it ends."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise DataError("the training loader yields no batches")


def batch_size(batch: Any) -> int:
    """Cases in a (possibly nested) batch: the leading size of its first tensor; 0 if none
    (Opacus' empty Poisson batches, whatever their structure)."""
    leaf = _first_tensor(batch)
    return int(leaf.shape[0]) if leaf is not None and leaf.dim() else 0


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if torch.is_tensor(batch):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else (
        batch if isinstance(batch, (list, tuple)) else ())
    for value in values:
        leaf = _first_tensor(value)
        if leaf is not None:
            return leaf
    return None


def mean_or_nan(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def train_steps(
    task: Task,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    steps: int,
    *,
    proximal_mu: float = 0.0,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Run ``steps`` local steps; each updates the task's phases in turn.

    Each phase draws its own batch, takes the mean of its per-case losses, and steps
    ``optimizer`` with that loss's gradients for its own parameters only (Adam skips
    parameters without a gradient, so one optimiser serves every phase); its
    ``after_update`` follows. With ``proximal_mu > 0`` FedProx's ``mu * (w - w0)`` is added
    to the shared parameters' gradients just before each update (:func:`proximal_hook`),
    ``w0`` being the weights ``model`` held when the call started.

    Args:
        task: the task whose phases run.
        model: its model (on the device it trains on).
        optimizer: over the model's parameters (:meth:`Task.make_optimizer`).
        loader: the task's training loader; cycled.
        steps: local steps.
        proximal_mu: FedProx μ (0: off).
        on_step: called after each step with the running mean loss.

    Returns:
        The mean loss of the first phase over the steps (the main objective: a CycleGAN's
        generators), ``len(loader.dataset)`` examples, ``steps``.
    """
    device = next(model.parameters()).device
    phases = task.phases(model)
    hook = (proximal_hook(optimizer, proximal_mu, shared_params(task, model))
            if proximal_mu > 0 else None)
    model.train()
    losses: list[float] = []
    batches = cycle(loader)
    try:
        for step in range(1, steps + 1):
            for i, phase in enumerate(phases):
                batch = next(batches)
                optimizer.zero_grad(set_to_none=True)
                if batch_size(batch) > 0:
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    loss = phase.loss(model, batch).mean()
                    grads = torch.autograd.grad(loss, phase.params)
                    for p, g in zip(phase.params, grads, strict=True):
                        p.grad = g
                    optimizer.step()
                    if i == 0:
                        losses.append(loss.item())
                if phase.after_update is not None:
                    phase.after_update()
            if on_step is not None:
                on_step(step, steps, mean_or_nan(losses))
    finally:
        optimizer.zero_grad(set_to_none=True)
        if hook is not None:
            hook.remove()
    return TrainResult(loss=mean_or_nan(losses), num_examples=len(loader.dataset), steps=steps)
