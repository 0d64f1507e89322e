"""Tasks behind one seam (see :mod:`fedscan.shared.tasks.base`), found by name.

A config's ``task`` is either a registered name (:data:`TASKS`: a module in this package and
the class in it) or, for a researcher's own task in simulation, an import path
``"package.module:Class"``. A new built-in task is a new module here plus its line in
:data:`TASKS`; nothing outside ``shared/tasks/`` changes (history, report, plots and the
server iterate over the task's :attr:`~fedscan.shared.tasks.base.Task.metrics`).

Import paths are refused unless the caller allows them: a hospital builds the task the
server's message names, and must never import a module the server chooses. Only the
simulation (the researcher's own machine and code) and the operator's own server config
allow them.

This module imports no other fedscan module but the errors at import time, so the config
schema can check names against :data:`TASKS` without a cycle.
"""

from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING

from fedscan.shared.errors import ConfigError

if TYPE_CHECKING:
    from fedscan.shared.config import Config
    from fedscan.shared.tasks.base import Task

#: Built-in tasks: ``task`` name -> ``"module:Class"`` inside this package.
TASKS = {
    "segmentation": "fedscan.shared.tasks.segmentation:SegmentationTask",
    "harmonisation": "fedscan.shared.tasks.harmonisation:HarmonisationTask",
}

#: ``package.module:Class``: a task outside fedscan (simulation only).
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_import_path(name: str) -> bool:
    """Whether ``name`` has the form ``package.module:Class``."""
    return bool(_IMPORT_PATH.match(name))


def check_task_name(name: str) -> str | None:
    """Why ``name`` cannot name a task (None when it can: registered, or an import path)."""
    if name in TASKS or is_import_path(name):
        return None
    return (f"{name!r} is not a task: use one of {', '.join(TASKS)}, or 'package.module:Class' "
            "for your own task in a simulation")


def task_class(name: str, *, allow_import: bool = False) -> type[Task]:
    """The class a task name stands for.

    Args:
        name: a :data:`TASKS` name, or ``package.module:Class`` with ``allow_import``.
        allow_import: import a module outside this package (never at a hospital).

    Raises:
        ConfigError: an unknown name, an import path where none is allowed, or an import
            that fails; the message names the config key ``task``.
    """
    if name in TASKS:
        target = TASKS[name]
    elif is_import_path(name) and not allow_import:
        raise ConfigError(f"config key 'task': {name!r} is not a built-in task ("
                          f"{', '.join(TASKS)}); this process runs built-in tasks only "
                          "(a hospital never imports code the server names)")
    elif is_import_path(name):
        target = name
    else:
        raise ConfigError(f"config key 'task': {check_task_name(name)}")
    module_name, _, class_name = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"config key 'task': cannot import {target!r} ({exc})") from None


def build_task(cfg: Config, *, allow_import: bool = False) -> Task:
    """The task ``cfg.task`` names, built from ``cfg`` (see :func:`task_class`)."""
    return task_class(cfg.task, allow_import=allow_import)(cfg)
