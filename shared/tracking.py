"""Experiment tracking of a run: TensorBoard event files always, MLflow when configured.

:class:`RunHistory` hands every summary it writes to a :class:`Tracker`, so every run
(federated, local, pooled; simulated or deployed) is tracked the same way, from the same
numbers as summary.json:

- per round, each declared metric (and its per-class keys) per site and aggregated over
  sites, each site's training loss and ε: TensorBoard tags ``<metric>/<site>``,
  ``<metric>/aggregate``, ``train_loss/<site>``, ``epsilon/<site>`` at step = round;
- at the end, a few prediction pictures per server test set (``preview/<test set>/<case>``)
  when the task can draw them;
- with MLflow: the config as parameters, the same metrics (``/`` kept in the key), report,
  plots and summary.json as artifacts, and the final model registered as a model version
  whose tags name the config's sha256 (the hash every site's audit.log records), the code
  version, the sites and each site's data fingerprint where known.

Data fingerprints come from ``RUN_DIR/data_fingerprints.json`` (site -> sha256, see
:func:`fedscan.shared.data.data_fingerprint`); a simulation writes it, since the researcher
holds every site's data. A deployed server has none: sites do not send one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import subprocess
from pathlib import Path
from typing import Any

from fedscan.shared.config import Config, TrackingConfig
from fedscan.shared.errors import ConfigError
from fedscan.shared.tasks.base import MetricSpec, metric_keys

log = logging.getLogger("fedscan.tracking")

#: TensorBoard's folder in a run folder.
TENSORBOARD_DIR = "tensorboard"
#: Site -> data fingerprint, written by whoever can compute them (a simulation).
FINGERPRINTS_FILE = "data_fingerprints.json"
#: Prediction pictures per test set.
PREVIEWS = 2


def config_sha256(cfg: Config) -> str:
    """sha256 of the task config the sites receive, canonical JSON (what their audit.log
    records as ``sha256`` for every task they accepted)."""
    from fedscan.shared.messages import RoundConfig

    data = json.loads(RoundConfig.for_run(cfg).task_config)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def code_version() -> str:
    """fedscan's version, with the git commit of its source when it runs from a checkout."""
    from fedscan import __version__

    here = Path(__file__).resolve().parent
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here,
                                capture_output=True, text=True, timeout=5)
        if commit.returncode == 0 and commit.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=here, capture_output=True, text=True, timeout=5)
            return (f"{__version__}+g{commit.stdout.strip()}"
                    + (".dirty" if dirty.stdout.strip() else ""))
    return __version__


def round_scalars(summary: dict[str, Any]) -> list[tuple[str, int, float]]:
    """``(tag, round, value)`` of every per-round number in a summary that is tracked."""
    specs = [MetricSpec.from_dict(m) for m in summary.get("metrics", [])]
    out: list[tuple[str, int, float]] = []

    def add(tag: str, rnd: int, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                math.isfinite(value):
            out.append((tag, rnd, float(value)))

    for entry in summary.get("rounds", []):
        rnd = int(entry["round"])
        for site, values in sorted(entry.get("evaluate", {}).items()):
            for key in metric_keys(specs, values):
                add(f"{key}/{site}", rnd, values[key])
        for key in metric_keys(specs, entry.get("aggregate", {})):
            add(f"{key}/aggregate", rnd, entry["aggregate"][key])
        for site, values in sorted(entry.get("train", {}).items()):
            add(f"train_loss/{site}", rnd, values.get("loss"))
            add(f"epsilon/{site}", rnd, values.get("epsilon"))
    return out


class Tracker:
    """Writes one run's numbers to TensorBoard and, when configured, MLflow.

    Args:
        out_dir: the run folder (TensorBoard writes into ``out_dir/tensorboard``).
        cfg: the run config (its ``tracking`` block decides what is written).
        mode: federated, local or pooled (an MLflow tag and part of the run name).
    """

    def __init__(self, out_dir: Path, cfg: Config, mode: str) -> None:
        self.out_dir = Path(out_dir)
        self.cfg = cfg
        self.mode = mode
        self.settings: TrackingConfig = cfg.tracking
        self._logged: set[tuple[str, int]] = set()
        self._tb = None
        self._mlflow: _MlflowRun | None = None
        if self.settings.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out_dir / TENSORBOARD_DIR))
        if self.settings.mlflow:
            self._mlflow = _MlflowRun(self.settings, cfg, mode, self.out_dir)

    def update(self, summary: dict[str, Any]) -> None:
        """Log what a rewritten summary adds (a round's metrics arrive a round later)."""
        new = [(tag, rnd, v) for tag, rnd, v in round_scalars(summary)
               if (tag, rnd) not in self._logged]
        for tag, rnd, value in new:
            self._logged.add((tag, rnd))
            if self._tb is not None:
                self._tb.add_scalar(tag, value, global_step=rnd)
        if self._tb is not None and new:
            self._tb.flush()
        if self._mlflow is not None and new:
            self._mlflow.metrics(new)

    def preview(self, test_set: str, case: str, picture: Any, step: int) -> None:
        """A prediction picture (RGB ``uint8`` H x W x 3) of one test-set case."""
        if self._tb is not None:
            self._tb.add_image(f"preview/{test_set}/{case}", picture, global_step=step,
                               dataformats="HWC")
            self._tb.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        """The run is complete and its report written: artifacts and the model version."""
        if self._tb is not None:
            self._tb.close()
        if self._mlflow is not None:
            self._mlflow.finish(summary)

    @property
    def mlflow_run_id(self) -> str | None:
        return self._mlflow.run_id if self._mlflow is not None else None


def _params(cfg: Config) -> dict[str, str]:
    """The config as flat MLflow parameters (sites and test sets by name only: their folders
    are nobody's business in a tracking store)."""
    data = cfg.to_dict()
    flat: dict[str, str] = {
        "sites": ",".join(s.name for s in cfg.sites),
        "test_sets": ",".join(t.name for t in cfg.test_sets),
    }

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)

    for key, value in data.items():
        if key not in ("sites", "test_sets", "tracking"):
            walk(key, value)
    flat.pop("harmonisation.reference", None)  # a path
    return flat


class _MlflowRun:
    """One MLflow run over the client API (no process-global "active run")."""

    def __init__(self, settings: TrackingConfig, cfg: Config, mode: str, out_dir: Path) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError("config key 'tracking.mlflow': MLflow is not installed "
                              "(pip install 'fedscan[tracking]')") from None
        from fedscan.shared.console import configure_console, verbose

        configure_console(force=True)  # SQLAlchemy's deprecation filters went in front
        if not verbose():  # MLflow's INFO lines (creating tables, ...) only when verbose
            for name in ("mlflow", "alembic"):
                logging.getLogger(name).setLevel(logging.WARNING)
        self.cfg, self.mode, self.out_dir = cfg, mode, out_dir
        self.uri = settings.mlflow
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.model_name = settings.model_name or f"fedscan-{cfg.task}"
        experiment = self.client.get_experiment_by_name(settings.experiment)
        if experiment is None:
            location = None
            if self.uri.startswith("sqlite:///"):
                # Artifacts beside the database, not in ./mlruns of whatever folder we run in.
                db = Path(self.uri[len("sqlite:///"):])
                location = (db.parent / "mlartifacts" / settings.experiment).resolve().as_uri()
            experiment_id = self.client.create_experiment(settings.experiment,
                                                          artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        self.config_sha256 = config_sha256(cfg)
        self.code_version = code_version()
        run = self.client.create_run(experiment_id, run_name=f"{out_dir.name}-{mode}", tags={
            "fedscan.mode": mode, "fedscan.task": cfg.task,
            "fedscan.config_sha256": self.config_sha256,
            "fedscan.code_version": self.code_version,
            "fedscan.run_dir": str(out_dir.resolve())})
        self.run_id = run.info.run_id
        params = _params(cfg)
        items = sorted(params.items())
        from mlflow.entities import Param

        for start in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=[
                Param(k, v[:6000]) for k, v in items[start:start + 100]])

    def metrics(self, scalars: list[tuple[str, int, float]]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(tag, value, now, rnd) for tag, rnd, value in scalars]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    def finish(self, summary: dict[str, Any]) -> None:
        for path in sorted(self.out_dir.iterdir()):
            if path.suffix in (".md", ".html", ".png") or path.name == "summary.json":
                self.client.log_artifact(self.run_id, str(path))
        model = summary.get("model")
        if isinstance(model, str) and (self.out_dir / model).is_file():
            self.client.log_artifact(self.run_id, str(self.out_dir / model), "model")
            self._register(model)
        self.client.set_terminated(self.run_id, status="FINISHED")

    def _register(self, model: str) -> None:
        from mlflow.exceptions import MlflowException

        fingerprints = _fingerprints(self.out_dir)
        tags = {"config_sha256": self.config_sha256, "code_version": self.code_version,
                "sites": ",".join(s.name for s in self.cfg.sites), "task": self.cfg.task,
                "mode": self.mode, "model_file": model}
        for site in self.cfg.sites:
            tags[f"data_fingerprint.{site.name}"] = fingerprints.get(site.name, "unknown")
        with contextlib.suppress(MlflowException):  # exists already: this run adds a version
            self.client.create_registered_model(self.model_name)
        run = self.client.get_run(self.run_id)
        version = self.client.create_model_version(
            self.model_name, source=f"{run.info.artifact_uri}/model", run_id=self.run_id,
            tags=tags, description=f"fedscan {self.mode} run {self.out_dir.name}")
        self.client.set_tag(self.run_id, "fedscan.model_version",
                            f"{self.model_name}/{version.version}")
        log.info("registered %s version %s", self.model_name, version.version)


def _fingerprints(out_dir: Path) -> dict[str, str]:
    path = out_dir / FINGERPRINTS_FILE
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            return {str(k): str(v) for k, v in data.items()}
    return {}
