"""Self-describing model files: weights plus everything predict needs to rebuild the pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedscan.shared.config import Config, parse_config
from fedscan.shared.errors import FedscanError

FORMAT = "fedscan-model/1"

#: A site's own model in its state folder: the final global weights plus the weights that
#: never leave the site (written by the ClientApp, for tasks that keep any).
SITE_MODEL = "site_model.pt"


def save_model(
    path: str | Path,
    *,
    config: Config,
    state_dict: dict[str, torch.Tensor],
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a model file carrying its config (task, model, preprocessing) and weights.

    Args:
        path: destination ``.pt`` file; written atomically (temp file then rename).
        config: the run's config; predict rebuilds the model and preprocessing from it.
        state_dict: the model weights.
        meta: extra plain data (round, mode, site) kept for provenance.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "task": config.task,
        "config": config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "meta": meta or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_model(path: str | Path) -> tuple[Config, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a model file written by :func:`save_model`.

    Returns:
        ``(config, state_dict, meta)``.
    """
    path = Path(path)
    if not path.is_file():
        raise FedscanError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise FedscanError(f"{path}: not a readable fedscan model ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FedscanError(f"{path}: not a fedscan model file (expected format {FORMAT})")
    return parse_config(payload["config"]), payload["state_dict"], payload.get("meta", {})
