"""ServerApp: runs the configured strategy, checkpoints every round, evaluates test sets."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from fedscan.server.strategies import RecordingStrategy, build_strategy
from fedscan.shared.config import Config
from fedscan.shared.data import read_test_set
from fedscan.shared.history import RunHistory
from fedscan.shared.messages import TASK_CONFIG, task_config_json, to_arrays
from fedscan.shared.report import write_report
from fedscan.shared.tasks import build_task
from fedscan.shared.tasks.base import resolve_device

log = logging.getLogger("fedscan.server")


def evaluate_test_sets(cfg: Config, state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Evaluate the final global model on the server's own held-out folders.

    These are the operator's data, so per-case values may be reported (unlike sites').
    """
    if not cfg.test_sets:
        return {}
    task = build_task(cfg)
    model = task.build_model().to(resolve_device(cfg.device))
    model.load_state_dict(state_dict)
    results = {}
    for test_set in cfg.test_sets:
        cases = read_test_set(test_set.data, name=test_set.name, num_classes=cfg.data.num_classes,
                              in_channels=cfg.data.in_channels, check=False)
        res = task.evaluate(model, cases)
        results[test_set.name] = {**res.metrics, "num_examples": res.num_examples,
                                  "cases": res.per_case}
    return results


def run_federation(grid: Grid, cfg: Config, out_dir: Path) -> dict[str, Any]:
    """Train ``cfg.rounds`` rounds with the configured strategy and write the run's outputs.

    Args:
        grid: Flower grid to the connected hospitals.
        cfg: the run config (sites are listed for the report; their data stays at the sites).
        out_dir: run folder for summary.json, checkpoints, final_model.pt and the report.

    Returns:
        The summary written to ``out_dir/summary.json``.
    """
    history = RunHistory(out_dir, cfg, mode="federated")
    task = build_task(cfg)
    initial = task.build_model().state_dict()
    strategy = RecordingStrategy(build_strategy(cfg.strategy, len(cfg.sites)), history)
    progress = tqdm(total=cfg.rounds, desc="federated rounds", unit="round")

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        # Flower calls this before round 1 (round 0) and after every round's evaluation.
        if server_round > 0:
            entry = history.finish_round(server_round, arrays.to_torch_state_dict())
            dice = entry["aggregate"].get("dice")
            progress.set_postfix(dice=f"{dice:.3f}" if dice is not None else "n/a")
            progress.update(1)
        return None

    train_config = ConfigRecord({TASK_CONFIG: task_config_json(cfg)})
    result = strategy.start(
        grid=grid,
        initial_arrays=to_arrays(initial),
        num_rounds=cfg.rounds,
        timeout=cfg.strategy.round_timeout,
        train_config=train_config,
        evaluate_config=ConfigRecord({TASK_CONFIG: task_config_json(cfg)}),
        evaluate_fn=after_round,
    )
    progress.close()
    final_state = result.arrays.to_torch_state_dict() if len(result.arrays) else initial
    model_path = history.save_final_model(final_state)
    final = {"test_sets": evaluate_test_sets(cfg, final_state)}
    summary = history.write_summary(final=final, model=model_path)
    write_report(out_dir, summary)
    return summary


def make_server_app(cfg: Config, out_dir: str | Path) -> ServerApp:
    """A ServerApp bound to a validated config and output folder."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, Path(out_dir))

    return app
