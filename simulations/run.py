"""``fedscan simulate``: check the data, run the requested modes, write outputs."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fedscan.shared.config import MODES, Config, parse_config, read_yaml
from fedscan.shared.data import read_site, read_site_test_set

if TYPE_CHECKING:
    from fedscan.shared.status.serve import StatusOptions


def quiet_flower() -> None:
    """No telemetry, update checks or runtime pip/uv installs (they would pull CUDA torch)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Opacus calls logging.basicConfig() at import; Flower's logger (level DEBUG, with its own
    # console handler) would then print every line twice, its DEBUG lines included.
    logging.getLogger("flwr").propagate = False


def with_phantom_sites(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the embedded phantom hospitals as its sites (and the held-out scanner as
    its test set) where it names none, generating them on first use; a harmonisation run also
    gets the phantoms' public reference set unless it names one."""
    from fedscan.simulations.phantoms import ensure_default_federation

    if "sites" in data:
        return data
    if data.get("task") == "harmonisation":
        from fedscan.simulations.phantoms import ensure_reference_set

        block = data.get("harmonisation") or {}
        if isinstance(block, dict) and block.get("reference") is None:
            # The phantoms' public reference set: clean scans of other heads, with labels.
            data = {**data, "harmonisation": {**block, "reference": str(ensure_reference_set())}}
    folders = ensure_default_federation()
    data = {**data, "sites": [{"name": n, "data": str(p)} for n, p in folders.items()
                              if n != "heldout"]}
    if "heldout" in folders and "test_sets" not in data:
        data["test_sets"] = [{"name": "heldout", "data": str(folders["heldout"])}]
    return data


def default_config() -> Config:
    """The embedded default: three phantom hospitals plus a held-out scanner as test set."""
    return parse_config(with_phantom_sites({"rounds": 5}))


def read_simulation_config(path: str | Path) -> Config:
    """A simulation config file; one that lists no ``sites`` runs on the phantom hospitals."""
    data = read_yaml(path)
    if isinstance(data, dict):
        data = with_phantom_sites(data)
    return parse_config(data, base=Path(path).resolve().parent)


def check_data(cfg: Config) -> None:
    """Validate every site's and test set's data contract in full before any training."""
    for site in cfg.sites:
        read_site(site, cfg.data, check=True)
    for test_set in cfg.test_sets:
        read_site_test_set(test_set, cfg.data, check=True)


def headline(summary: dict[str, Any]) -> str:
    """The run's main number: the task's headline metric, final (sites weighted by
    validation cases, as Flower aggregates), else the last round's aggregates."""
    final = summary["final"]
    name = final.get("headline")
    if name is not None and final.get(name) is not None:
        return f"{name} {final[name]:.4f} (sites weighted by validation cases)"
    last = summary["rounds"][-1]["aggregate"] if summary["rounds"] else {}
    return ", ".join(f"{k} {v:.4f}" for k, v in last.items()) or "no metrics"


def run_mode(cfg: Config, mode: str, out_dir: Path) -> dict[str, Any]:
    """Run one mode into ``out_dir`` and return its summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump({**cfg.to_dict(), "mode": mode},
                                                        sort_keys=False))
    if mode == "federated":
        from fedscan.simulations.federated import run_federated

        return run_federated(cfg, out_dir)
    from fedscan.simulations.baselines import run_local, run_pooled

    return run_local(cfg, out_dir) if mode == "local" else run_pooled(cfg, out_dir)


def simulate(config: str | Path | None, modes: list[str] | None, out: Path,
             rounds: int | None = None, status: StatusOptions | None = None
             ) -> dict[str, dict[str, Any]]:
    """Run ``modes`` (a subset of federated/local/pooled) and return their summaries.

    Args:
        config: a YAML config, or None for the embedded phantom federation.
        modes: the modes to run; None runs the config's ``mode``.
        out: the output folder. With several modes each writes into ``out/<mode>/`` and a
            comparison is written to ``out``.
        rounds: overrides the config's ``rounds``.
        status: serve the status page over the folder of the mode running, while it runs.
    """
    quiet_flower()
    cfg = read_simulation_config(config) if config else default_config()
    if rounds is not None:
        cfg.rounds = rounds
    modes = modes or [cfg.mode]
    check_data(cfg)
    targets = {m: out / m if len(modes) > 1 else out for m in modes}
    current = [targets[modes[0]]]
    page = None
    if status is not None:
        from fedscan.shared.status.serve import start_status

        page = start_status(lambda: current[0], status)
    try:
        summaries = _run_modes(cfg, modes, targets, current)
    finally:
        if page is not None:
            page.stop()
            print(f"fedscan: status page stopped; to view the run again: fedscan dashboard "
                  f"{current[0]}", flush=True)
    if len(modes) > 1:
        from fedscan.shared.report import format_comparison, write_comparison

        write_comparison(out, summaries)
        print(format_comparison(summaries), flush=True)
    return summaries


def _run_modes(cfg: Config, modes: list[str], targets: dict[str, Path],
               current: list[Path]) -> dict[str, dict[str, Any]]:
    """Run each mode into its folder (``current[0]`` follows the mode running)."""
    summaries = {}
    for mode in modes:
        assert mode in MODES, mode
        target = current[0] = targets[mode]
        started = time.time()
        print(f"== {mode}: {len(cfg.sites)} sites, {cfg.rounds} rounds -> {target}", flush=True)
        summaries[mode] = run_mode(cfg, mode, target)
        print(f"== {mode} done in {time.time() - started:.0f}s: "
              f"{headline(summaries[mode])}", flush=True)
        if cfg.task == "harmonisation" and mode == "federated":
            from fedscan.simulations.harmonisation import run_study

            run_study(cfg, target)
    return summaries
