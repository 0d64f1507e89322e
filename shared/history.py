"""Run history: per-round, per-site metrics and the run's output folder.

Federated runs (the ServerApp), the local and pooled baselines and later the deployed server
all record through :class:`RunHistory`, so ``summary.json``, checkpoints and the report look
the same whatever produced them. The task's declared metrics
(:class:`~fedscan.shared.tasks.base.MetricSpec`) decide what is averaged over sites and are
written into summary.json (``metrics``), where the report and any other reader find them.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedscan.shared.checkpoint import save_model
from fedscan.shared.config import Config
from fedscan.shared.tasks import build_task
from fedscan.shared.tasks.base import MetricSpec, headline, metric_keys
from fedscan.shared.tracking import Tracker

log = logging.getLogger("fedscan.history")


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become None (JSON has no NaN), numpy/tensor scalars become floats."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def weighted_mean(per_site: dict[str, dict[str, Any]], key: str) -> float | None:
    """Mean of ``key`` over sites weighted by ``num_examples``, skipping missing/None values."""
    pairs = [
        (m[key], m.get("num_examples", 1))
        for m in per_site.values()
        if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])
    ]
    total = sum(w for _, w in pairs)
    if not pairs or total <= 0:
        return None
    return sum(v * w for v, w in pairs) / total


def site_median(per_site: dict[str, dict[str, Any]], key: str) -> float | None:
    """Median of ``key`` over sites (each site once, whatever its case count), skipping
    missing/None values: the figure one site's claimed case count cannot move."""
    values = [m[key] for m in per_site.values()
              if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
    return float(statistics.median(values)) if values else None


class RunHistory:
    """Collects what a run did and writes it into ``out_dir``.

    Args:
        out_dir: the run's output folder (created).
        cfg: the run's config (stored in summary.json and in every model file).
        mode: ``federated``, ``local`` or ``pooled``.
        metrics: what the task reports; None: the metrics of the task ``cfg`` names (the
            run's owner builds it, so a task named by import path is allowed).
    """

    def __init__(self, out_dir: str | Path, cfg: Config, mode: str,
                 metrics: Sequence[MetricSpec] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.mode = mode
        if metrics is None:
            metrics = build_task(cfg, allow_import=True).metrics
        self.metrics = tuple(metrics)
        self.rounds: list[dict[str, Any]] = []
        self.started = time.time()
        self._round_started = time.time()
        #: Size of the model's weights as fp32 (the yardstick for bytes per round).
        self.model_fp32_bytes: int | None = None
        #: Rounds after which the run was resumed (a restart after a crash).
        self.resumed_after: list[int] = []
        #: The run's id, kept by a resume: sites file the run's local weights under it.
        self.run_uid = secrets.token_hex(16)
        #: TensorBoard (and MLflow when configured) get every summary this writes.
        self.tracker = Tracker(self.out_dir, cfg, mode)
        #: Nodes that were online but whose keys the operator never admitted (not sampled).
        self.unadmitted_nodes: list[int] = []
        #: The data check before round 1 (server/data_check.py), None if not run.
        self.data_check: dict[str, Any] | None = None

    def _round(self, rnd: int) -> dict[str, Any]:
        for entry in self.rounds:
            if entry["round"] == rnd:
                return entry
        entry = {"round": rnd, "train": {}, "evaluate": {}, "aggregate": {}, "seconds": None}
        self.rounds.append(entry)
        return entry

    def record_train(self, rnd: int, site: str, metrics: dict[str, Any]) -> None:
        self._round(rnd)["train"][site] = _clean(metrics)

    def record_evaluate(self, rnd: int, site: str, metrics: dict[str, Any]) -> None:
        """A site's validation metrics of round ``rnd``'s global model.

        In a federated run they arrive with the next round's train replies (or the final
        evaluation), so the round's aggregate is updated here, after the round has closed.
        """
        entry = self._round(rnd)
        entry["evaluate"][site] = _clean(metrics)
        self._aggregate(entry)

    @property
    def headline(self) -> MetricSpec | None:
        """The task's main metric (progress bars and one-line results show it)."""
        return headline(self.metrics)

    def _aggregated_keys(self, per_site: dict[str, dict[str, Any]]) -> list[str]:
        """Declared metric keys (per-class ones too) that sites reported and that average."""
        keys = metric_keys(self.metrics, {k for m in per_site.values() for k in m})
        averaged = {s.name for s in self.metrics if s.aggregate}
        return [k for k in keys if k.split("/", 1)[0] in averaged]

    def _aggregate(self, entry: dict[str, Any]) -> None:
        """Example-weighted means over sites of every declared metric that averages, and
        beside them in ``median`` the median over sites (one vote per site)."""
        for key in self._aggregated_keys(entry["evaluate"]):
            value = weighted_mean(entry["evaluate"], key)
            if value is not None:
                entry["aggregate"][key] = value
            median = site_median(entry["evaluate"], key)
            if median is not None:
                entry.setdefault("median", {})[key] = median

    def record_rejection(self, rnd: int, site: str, phase: str, reason: str) -> None:
        """A reply the server did not aggregate (see ``server/validation.py``)."""
        self._round(rnd).setdefault("rejected", []).append(
            {"site": site, "phase": phase, "reason": reason})

    def record_adjustment(self, rnd: int, site: str, phase: str, reason: str) -> None:
        """A reply aggregated with less weight than it claimed (see ``server/validation.py``)."""
        self._round(rnd).setdefault("adjusted", []).append(
            {"site": site, "phase": phase, "reason": reason})

    def record_unadmitted(self, node_id: int) -> None:
        """A node that was online without an admitted key (never sampled)."""
        if node_id not in self.unadmitted_nodes:
            self.unadmitted_nodes.append(int(node_id))

    def record_error(self, rnd: int, site: str, phase: str, reason: str) -> None:
        """A site that answered with an error, or not at all (Flower's error reply)."""
        self._round(rnd).setdefault("errors", []).append(
            {"site": site, "phase": phase, "reason": reason})

    def record_round_fact(self, rnd: int, key: str, value: Any) -> None:
        """A fact about round ``rnd`` as a whole (``sampled``: the sites drawn to train;
        ``consortium``: who dropped out or was cut and the simulated clock)."""
        self._round(rnd)[key] = _clean(value)

    def record_bytes(self, rnd: int, site: str, key: str, num_bytes: int) -> None:
        """Bytes of one message to or from a site (``key`` e.g. ``train_down``)."""
        per_site = self._round(rnd).setdefault("bytes", {}).setdefault(site, {})
        per_site[key] = per_site.get(key, 0) + int(num_bytes)

    def resume(self, summary: dict[str, Any], last_round: int) -> None:
        """Continue a run: keep the recorded rounds up to ``last_round`` from its summary."""
        self.rounds = [r for r in summary.get("rounds", []) if r["round"] <= last_round]
        self.resumed_after = [*summary.get("resumed_after", []), last_round]
        self.run_uid = str(summary.get("run_uid") or self.run_uid)
        self.unadmitted_nodes = list(summary.get("unadmitted_nodes", []))
        self.data_check = summary.get("data_check")
        self.started -= float(summary.get("seconds") or 0.0)

    def finish_round(self, rnd: int, state_dict: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        """Close round ``rnd``: aggregate its metrics, time it, checkpoint, rewrite summary.

        The summary is rewritten every round, so a crash loses at most the round in flight.
        """
        entry = self._round(rnd)
        self._aggregate(entry)
        now = time.time()
        entry["seconds"] = round(now - self._round_started, 3)
        self._round_started = now
        if state_dict is not None:
            path = self.out_dir / "checkpoints" / f"round_{rnd:03d}.pt"
            save_model(path, config=self.cfg, state_dict=state_dict,
                       meta={"round": rnd, "mode": self.mode})
        self.write_summary()
        return entry

    def save_final_model(self, state_dict: dict[str, torch.Tensor], name: str = "final_model.pt",
                         meta: dict[str, Any] | None = None) -> str:
        """Write a final model file; returns its path relative to ``out_dir``."""
        meta = {"mode": self.mode, "rounds": self.cfg.rounds, **(meta or {})}
        save_model(self.out_dir / name, config=self.cfg, state_dict=state_dict, meta=meta)
        return name

    def summary(self, final: dict[str, Any] | None = None, model: Any = None) -> dict[str, Any]:
        last_eval = self.rounds[-1]["evaluate"] if self.rounds else {}
        final = final or {}
        per_site = final.get("per_site") or {s: dict(m) for s, m in last_eval.items()}
        main = self.headline
        # Every averaging metric has its key (None until a site reports it), per-class ones
        # when reported; weighted by validation cases, as Flower weights by num-examples.
        keys = [s.name for s in self.metrics if s.aggregate]
        keys += [k for k in self._aggregated_keys(per_site) if k not in keys]
        out = {
            "mode": self.mode,
            "task": self.cfg.task,
            "strategy": self.cfg.strategy.name if self.mode == "federated" else None,
            "sites": [s.name for s in self.cfg.sites],
            "test_sets": [t.name for t in self.cfg.test_sets],
            "metrics": [spec.to_dict() for spec in self.metrics],
            "rounds": self.rounds,
            "final": {
                "headline": main.name if main is not None else None,
                **{key: weighted_mean(per_site, key)
                   for key in metric_keys(self.metrics, keys)},
                "median": {key: value for key in metric_keys(self.metrics, keys)
                           if (value := site_median(per_site, key)) is not None},
                "per_site": per_site,
                "test_sets": final.get("test_sets", {}),
            },
            "model": model,
            "seconds": round(time.time() - self.started, 3),
            "model_fp32_bytes": self.model_fp32_bytes,
            "resumed_after": self.resumed_after,
            "run_uid": self.run_uid,
            "unadmitted_nodes": self.unadmitted_nodes,
            "data_check": self.data_check,
            "config": self.cfg.to_dict(),
        }
        return _clean(out)

    def write_summary(self, final: dict[str, Any] | None = None, model: Any = None) -> dict:
        """Write summary.json atomically and return it."""
        data = self.summary(final, model)
        tmp = self.out_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.out_dir / "summary.json")
        try:
            self.tracker.update(data)
        except Exception as exc:  # tracking must never stop a federation
            log.warning("tracking: %s: %s", type(exc).__name__, exc)
        return data

    def finish_tracking(self, summary: dict[str, Any]) -> None:
        """After the report is written: artifacts and the model version (MLflow)."""
        try:
            self.tracker.finish(summary)
        except Exception as exc:  # the run's own outputs are complete; say what failed
            log.warning("tracking: %s: %s", type(exc).__name__, exc)
