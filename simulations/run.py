"""``fedscan simulate``: check the data, run the requested modes, write outputs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fedscan.shared.config import MODES, Config, parse_config, read_yaml
from fedscan.shared.console import configure_console
from fedscan.shared.data import consortium_data_config, read_site, read_site_test_set
from fedscan.shared.errors import FedscanError

if TYPE_CHECKING:
    from fedscan.shared.status.serve import StatusOptions


def quiet_flower() -> None:
    """No telemetry, update checks or runtime pip/uv installs (they would pull CUDA torch)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


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
    folders = ensure_default_federation(progress=lambda line: print(line, flush=True))
    block = data.get("data") if isinstance(data.get("data"), dict) else {}
    if "mirror_pairs" not in block and "symmetric_labels" not in block:
        # The phantoms' one class is the brain mask, the same on both sides: flips are safe.
        data = {**data, "data": {**block, "symmetric_labels": True}}
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
        from fedscan.simulations.consortium import with_consortium_sites

        data = with_phantom_sites(with_consortium_sites(data))
    return parse_config(data, base=Path(path).resolve().parent)


def check_data(cfg: Config) -> None:
    """Validate every site's and test set's data contract in full before any training, then
    complete ``cfg.data`` from the sites' dataset.json (class and channel names, left/right
    declaration: :func:`~fedscan.shared.data.consortium_data_config`), and the
    harmonisation study's paired-truth folders (``sites[].truth``) against the cases."""
    sites = [read_site(site, cfg.data, check=True) for site in cfg.sites]
    for test_set in cfg.test_sets:
        read_site_test_set(test_set, cfg.data, check=True)
    cfg.data = consortium_data_config(cfg.data, sites)
    if any(site.truth is not None for site in cfg.sites):
        from fedscan.simulations.truth import check_truth

        check_truth(cfg)


def headline(summary: dict[str, Any]) -> str:
    """The run's main number: the task's headline metric, final (sites weighted by
    validation cases, as Flower aggregates), else the last round's aggregates."""
    final = summary["final"]
    name = final.get("headline")
    if name is not None and final.get(name) is not None:
        return f"{name} {final[name]:.4f} (sites weighted by validation cases)"
    last = summary["rounds"][-1]["aggregate"] if summary["rounds"] else {}
    return ", ".join(f"{k} {v:.4f}" for k, v in last.items()) or "no metrics"


def write_fingerprints(cfg: Config, out_dir: Path) -> None:
    """``data_fingerprints.json``: each site's data fingerprint (an opaque hash of its case
    contents, :func:`~fedscan.shared.data.data_fingerprint`), for the run's model version.
    Computed here because a simulation holds every site's data; deployed sites send none."""
    from fedscan.shared.data import data_fingerprint
    from fedscan.shared.tracking import FINGERPRINTS_FILE

    prints = {s.name: data_fingerprint(read_site(s, cfg.data, check=False)) for s in cfg.sites}
    (out_dir / FINGERPRINTS_FILE).write_text(json.dumps(prints, indent=1))


def run_mode(cfg: Config, mode: str, out_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Run one mode into ``out_dir`` and return its summary (``resume``: federated only,
    continue the run there)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump({**cfg.to_dict(), "mode": mode},
                                                        sort_keys=False))
    write_fingerprints(cfg, out_dir)
    if mode == "federated":
        from fedscan.simulations.federated import run_federated

        return run_federated(cfg, out_dir, resume=resume)
    from fedscan.simulations.baselines import run_local, run_pooled

    return run_local(cfg, out_dir) if mode == "local" else run_pooled(cfg, out_dir)


def resume_config(run_dir: Path, rounds: int | None) -> Config:
    """The config of the federated run in ``run_dir`` to continue (its ``config.yaml``).

    Raises:
        FedscanError: ``run_dir`` holds no federated run with a completed round.
    """
    from fedscan.server.rounds import load_resume_point

    path = run_dir / "config.yaml"
    if not path.is_file() or not (run_dir / "summary.json").is_file():
        raise FedscanError(f"--resume {run_dir}: no config.yaml and summary.json there (the "
                           "folder a federated `fedscan simulate --out` wrote)")
    data = read_yaml(path)
    if not isinstance(data, dict) or data.get("mode") != "federated":
        raise FedscanError(f"--resume {run_dir}: only a federated run can be resumed")
    cfg = parse_config(data)
    if rounds is not None:
        cfg.rounds = rounds
    point = load_resume_point(run_dir)
    if point is None:
        raise FedscanError(f"--resume {run_dir}: no completed round to continue from")
    if point[0] >= cfg.rounds:
        raise FedscanError(f"--resume {run_dir}: all {cfg.rounds} rounds are done (more "
                           f"with --rounds N)")
    return cfg


def cross_site(run_dir: Path, fine_tune_steps: int | None = None) -> dict[str, Any]:
    """``fedscan cross-site --run DIR``: the cross-site matrix of a finished federated run,
    computed again in simulation from its final model and config (see docs/cross_site.md).

    Raises:
        FedscanError: ``run_dir`` holds no finished federated run.
    """
    from fedscan.simulations.federated import run_cross_site_only

    quiet_flower()
    configure_console()
    path = run_dir / "config.yaml"
    if not path.is_file() or not (run_dir / "final_model.pt").is_file():
        raise FedscanError(f"--run {run_dir}: no config.yaml and final_model.pt there (the "
                           "folder a finished federated `fedscan simulate --out` wrote)")
    data = read_yaml(path)
    if not isinstance(data, dict) or data.get("mode") != "federated":
        raise FedscanError(f"--run {run_dir}: cross-site evaluation needs a federated run")
    cfg = parse_config(data)
    cfg.cross_site.enabled = True
    if fine_tune_steps is not None:
        cfg.cross_site.fine_tune_steps = fine_tune_steps
    check_data(cfg)
    summary = run_cross_site_only(cfg, run_dir)
    print(format_outputs(run_dir, [run_dir], cfg), flush=True)
    return summary


def simulate(config: str | Path | None, modes: list[str] | None, out: Path,
             rounds: int | None = None, status: StatusOptions | None = None,
             resume: Path | None = None) -> dict[str, dict[str, Any]]:
    """Run ``modes`` (a subset of federated/local/pooled) and return their summaries.

    Args:
        config: a YAML config, or None for the embedded phantom federation.
        modes: the modes to run; None runs the config's ``mode``.
        out: the output folder. With several modes each writes into ``out/<mode>/`` and a
            comparison is written to ``out``.
        rounds: overrides the config's ``rounds``.
        status: serve the status page over the folder of the mode running, while it runs.
        resume: a federated run folder to continue after its last completed round, with its
            own config (``config`` and ``modes`` must be None; ``out`` is ignored).
    """
    quiet_flower()
    configure_console()
    if resume is not None:
        cfg = resume_config(resume, rounds)
        out, modes = resume, ["federated"]
    else:
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
        summaries = _run_modes(cfg, modes, targets, current, resume=resume is not None)
    finally:
        if page is not None:
            page.stop()
            print(f"fedscan: status page stopped; to view the run again: fedscan dashboard "
                  f"{current[0]}", flush=True)
    if "federated" in modes and len(modes) > 1 and cfg.cross_site.enabled:
        from fedscan.simulations.baselines import add_baselines_to_cross_site

        add_baselines_to_cross_site(cfg, targets["federated"], targets.get("local"),
                                    targets.get("pooled"))
    if len(modes) > 1:
        from fedscan.shared.report import format_comparison, write_comparison

        write_comparison(out, summaries)
        print(format_comparison(summaries), flush=True)
    print(format_outputs(out, [targets[m] for m in modes], cfg), flush=True)
    return summaries


def format_outputs(out: Path, folders: list[Path], cfg: Config | None = None) -> str:
    """The closing block: where each output of the run is and how to open it.

    Args:
        out: the run's output folder.
        folders: the folder of each mode run (``out`` itself for a single mode).
        cfg: the run config (its MLflow store, if any).
    """
    lines = [f"== outputs in {out}"]
    if (out / "comparison.md").is_file():
        lines.append(f"  comparison     {out / 'comparison.md'}")
    for folder in folders:
        tag = f" ({folder.name})" if folder != out else ""
        rows = [
            ("report", "report.html", "open in a browser (no server needed); report.md beside it"),
            ("results", "summary.json", "every round, site and metric"),
            ("final model", "final_model.pt", f"fedscan predict --model "
                                             f"{folder / 'final_model.pt'} --image SCAN --out SEG"),
            ("checkpoints", "checkpoints", "the global model after every round"),
        ]
        for label, name, how in rows:
            if (folder / name).exists():
                lines.append(f"  {label + tag:<14} {folder / name}  ({how})")
        plots = sorted(p.name for p in folder.glob("*.png"))
        if plots:
            lines.append(f"  {'plots' + tag:<14} {folder}/{{{','.join(plots)}}}")
        if (folder / "site-state").is_dir():
            lines.append(f"  {'site logs' + tag:<14} {folder / 'site-state'}/SITE/site.log "
                         f"(each virtual hospital's log, audit.log and ε ledger)")
        if (folder / "tensorboard").is_dir():
            lines.append(f"  {'TensorBoard' + tag:<14} tensorboard --logdir "
                         f"{folder / 'tensorboard'}  (then open http://localhost:6006/)")
        if (folder / "live.json").is_file():
            lines.append(f"  {'status page' + tag:<14} fedscan dashboard {folder}  "
                         f"(then open http://127.0.0.1:8050/)")
    if cfg is not None and cfg.tracking.mlflow:
        tracking = cfg.tracking
        lines.append(f"  {'MLflow':<14} mlflow ui --backend-store-uri {tracking.mlflow}  "
                     f"(experiment {tracking.experiment!r}, registered model "
                     f"{tracking.model_name or 'fedscan-' + cfg.task!r})")
    return "\n".join(lines)


def _print_test_sets(summary: dict[str, Any]) -> None:
    """Each held-out test set's per-class table (classes named from ``data.labels``)."""
    from fedscan.shared.report import format_class_table

    labels = ((summary.get("config") or {}).get("data") or {}).get("labels") or []
    for name, result in (summary.get("final", {}).get("test_sets") or {}).items():
        table = format_class_table({k: v for k, v in result.items() if k != "cases"},
                                   labels[1:] or None)
        if table:
            print(f"== test set {name} ({result.get('num_examples')} cases):\n{table}",
                  flush=True)


def _run_modes(cfg: Config, modes: list[str], targets: dict[str, Path],
               current: list[Path], resume: bool = False) -> dict[str, dict[str, Any]]:
    """Run each mode into its folder (``current[0]`` follows the mode running)."""
    summaries = {}
    for mode in modes:
        assert mode in MODES, mode
        target = current[0] = targets[mode]
        started = time.time()
        what = "resuming " if resume else ""
        print(f"== {what}{mode}: {len(cfg.sites)} sites, {cfg.rounds} rounds -> {target}",
              flush=True)
        summaries[mode] = run_mode(cfg, mode, target, resume=resume)
        print(f"== {mode} done in {time.time() - started:.0f}s: "
              f"{headline(summaries[mode])}", flush=True)
        _print_test_sets(summaries[mode])
        if cfg.task == "harmonisation" and mode == "federated":
            from fedscan.simulations.harmonisation import run_study

            run_study(cfg, target)
    return summaries
