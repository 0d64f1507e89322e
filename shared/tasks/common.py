"""What every task's local training shares: the preprocessed-volume cache, the case loader
and the step loop's helpers (cycling a loader, empty Poisson batches)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from monai.data.utils import worker_init_fn
from torch.utils.data import DataLoader, Dataset, default_collate

from fedscan.shared.config import TrainConfig
from fedscan.shared.errors import DataError

#: Bytes of preprocessed volumes a process keeps between rounds.
CACHE_BYTES = 2 * 1024**3


class VolumeCache:
    """Process-wide LRU of preprocessed training volumes, bounded in bytes.

    A site trains every round in the same process; reloading and resampling its cases each
    round would dominate short rounds. Keys hold the file paths, their size and mtime, and
    the data config, so a changed file or preprocessing never hits a stale entry.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> dict[str, torch.Tensor] | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key: tuple, value: dict[str, torch.Tensor]) -> None:
        size = sum(v.numel() * v.element_size() for v in value.values())
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= sum(v.numel() * v.element_size() for v in old.values())

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


VOLUME_CACHE = VolumeCache(CACHE_BYTES)


def file_key(path: str, what: str) -> tuple:
    """Cache key part of a file: its resolved path, size and mtime (a changed file misses)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} file not found: {p}")
    st = p.stat()
    return str(p.resolve()), st.st_size, st.st_mtime_ns


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


def batch_size(batch: object) -> int:
    """Samples in a batch; 0 for Opacus' empty Poisson batches (whatever their structure)."""
    if isinstance(batch, Mapping) and torch.is_tensor(batch.get("image")):
        return int(batch["image"].shape[0])
    return 0


def empty_step(optimizer: torch.optim.Optimizer) -> None:
    """The step of an empty batch: Opacus' DP optimiser releases noise only; others skip.

    Skipping the DP step instead would reveal that the batch was empty and leave it out of
    the privacy accountant, so the noise-only step is taken with zero per-sample gradients.
    """
    if not hasattr(optimizer, "noise_multiplier"):
        return
    for p in optimizer.params:
        p.grad_sample = p.new_zeros((0, *p.shape))
    optimizer.step()
