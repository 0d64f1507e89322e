"""Tasks behind one seam: see :mod:`fedscan.shared.tasks.base`."""

from __future__ import annotations

from fedscan.shared.config import Config
from fedscan.shared.tasks.base import Task


def build_task(cfg: Config) -> Task:
    """The task named by ``cfg.task``."""
    if cfg.task == "segmentation":
        from fedscan.shared.tasks.segmentation import SegmentationTask

        return SegmentationTask(cfg)
    if cfg.task == "harmonisation":
        from fedscan.shared.tasks.harmonisation import HarmonisationTask

        return HarmonisationTask(cfg)
    raise ValueError(f"unknown task {cfg.task!r}")
