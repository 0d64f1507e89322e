"""ServerApp: runs the configured strategy, checkpoints every round, evaluates test sets."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedscan.server.admission import Admission, AdmittedGrid
from fedscan.server.cross_site import add_to_summary, run_cross_site
from fedscan.server.data_check import run_data_check
from fedscan.server.live_grid import live_run
from fedscan.server.progress import RoundProgress
from fedscan.server.rounds import (
    load_resume_point,
    model_fp32_bytes,
    restore_strategy_state,
    run_rounds,
    save_strategy_state,
)
from fedscan.server.sampling import SampledStrategy, sample_size, sampling_on
from fedscan.server.strategies import RecordingStrategy, build_strategy
from fedscan.server.validation import UpdateValidator
from fedscan.shared.checkpoint import load_model
from fedscan.shared.config import Config
from fedscan.shared.console import configure_console
from fedscan.shared.cross_site import format_matrix
from fedscan.shared.data import case_id, read_site_test_set
from fedscan.shared.errors import FedscanError
from fedscan.shared.history import RunHistory
from fedscan.shared.messages import RoundConfig, to_arrays
from fedscan.shared.report import write_report
from fedscan.shared.tasks import build_task
from fedscan.shared.tasks.base import Task, resolve_device
from fedscan.shared.tracking import PREVIEWS, Tracker

log = logging.getLogger("fedscan.server")

#: Wraps a run's strategy (given its history), e.g. a simulation's consortium behaviour.
StrategyWrapper = Callable[[Strategy, RunHistory], Strategy]


def evaluate_test_sets(cfg: Config, state_dict: dict[str, torch.Tensor],
                       tracker: Tracker | None = None) -> dict[str, Any]:
    """Evaluate the final global model on the server's own held-out folders.

    These are the operator's data, so per-case values may be reported (unlike sites'), and
    a few prediction pictures per test set go to ``tracker`` when the task draws them.
    """
    if not cfg.test_sets:
        return {}
    task = build_task(cfg, allow_import=True)  # the operator's own config
    model = task.build_model().to(resolve_device(cfg.device))
    missing = set(model.state_dict()) - set(state_dict)
    if missing:
        # Site-local weights (FedBN's norms) are not in the global model: the server has
        # only their initial values, so its test-set numbers are not the sites' models.
        log.warning("test sets: %d site-local weights evaluated at their initial values",
                    len(missing))
    model.load_state_dict(state_dict, strict=False)
    results = {}
    for test_set in cfg.test_sets:
        cases = read_site_test_set(test_set, cfg.data, check=False)
        res = task.evaluate(model, cases)
        results[test_set.name] = {**res.metrics, "num_examples": res.num_examples,
                                  "cases": res.per_case}
        if tracker is not None and hasattr(task, "preview"):
            for case in cases[:PREVIEWS]:
                tracker.preview(test_set.name, case_id(case), task.preview(model, case),
                                step=cfg.rounds)
    return results


def cross_site_stage(grid: Grid, cfg: Config, final_state: dict[str, torch.Tensor],
                     task: Task, validator: UpdateValidator,
                     node_names: dict[int, str] | None, run_uid: str = "") -> dict[str, Any]:
    """The cross-site matrix of the final model (:mod:`fedscan.server.cross_site`), printed;
    a failure is recorded and logged, never losing the run's other outputs."""
    try:
        cross = run_cross_site(grid, cfg, final_state, list(task.metrics), validator,
                               node_names, run_uid)
    except Exception as exc:  # the trained model and its evaluation are already safe
        log.warning("cross-site evaluation failed: %s: %s", type(exc).__name__, exc)
        return {"error": f"{type(exc).__name__}: {exc}"}
    print(format_matrix(cross), flush=True)
    return cross


def run_federation(grid: Grid, cfg: Config, out_dir: Path, resume: bool = False,
                   site_grace: float = 0.0,
                   node_names: dict[int, str] | None = None,
                   admission: Admission | None = None,
                   wrap_strategy: StrategyWrapper | None = None) -> dict[str, Any]:
    """Train ``cfg.rounds`` rounds with the configured strategy and write the run's outputs.

    Every round ends with a checkpoint of the global model and the strategy's state and a
    rewritten summary.json, so a crashed run can be continued.

    Args:
        grid: Flower grid to the connected hospitals.
        cfg: the run config (sites are listed for the report; their data stays at the sites).
        out_dir: run folder for summary.json, checkpoints, final_model.pt and the report.
        resume: continue after the last completed round found in ``out_dir`` (rounds already
            completed are neither lost nor repeated); without one, start at round 1.
        site_grace: seconds each round waits for every site to be online before it starts
            with those present (at least ``strategy.min_sites``).
        node_names: node id -> site name, to name sites that fail before they ever answer.
        admission: the nodes the operator admitted (deployment); only they are sampled and
            heard. None: every node is (simulation).
        wrap_strategy: wraps the strategy (simulations: the consortium's dropouts and
            simulated clock).

    Returns:
        The summary written to ``out_dir/summary.json``.
    """
    history = RunHistory(out_dir, cfg, mode="federated")
    task = build_task(cfg, allow_import=True)  # the operator's own config
    model = task.build_model()
    shared = set(task.shared_keys(model))
    # Only the weights the task shares make up the global model (a CycleGAN's
    # discriminators, FedBN's normalisation layers stay at the sites).
    initial = {k: v for k, v in model.state_dict().items() if k in shared}
    history.model_fp32_bytes = model_fp32_bytes(initial)
    sampled = sampling_on(cfg.strategy)
    # A round counts with strategy.min_sites valid updates, else a majority of the sites it
    # asked: all of them, the sampled ones, or any one when a simulated consortium drops out.
    if cfg.consortium is not None:
        asked = 1
    elif sampled:
        asked = sample_size(len(cfg.sites), cfg.strategy.fraction_train, cfg.strategy.min_sites)
    else:
        asked = len(cfg.sites)
    validator = UpdateValidator.from_config(initial, cfg, task.metrics, asked=asked)
    if admission is not None:
        grid = AdmittedGrid(grid, admission, on_unadmitted=history.record_unadmitted)
        node_names = {**(node_names or {}), **grid.names()}
    strategy: Strategy = RecordingStrategy(build_strategy(cfg.strategy, len(cfg.sites)),
                                           history, validator=validator)
    if sampled:
        strategy = SampledStrategy(strategy, cfg.strategy, cfg.seed, history, node_names,
                                   timeout=cfg.strategy.round_timeout)
    if wrap_strategy is not None:
        strategy = wrap_strategy(strategy, history)
    arrays, first = to_arrays(initial), 1
    point = load_resume_point(out_dir) if resume else None
    if point is not None:
        last, state_dict, chain, summary = point
        history.resume(summary, last)
        restore_strategy_state(strategy, chain)
        arrays, first = to_arrays(state_dict), last + 1
        log.warning("resuming %s after round %d of %d", out_dir, last, cfg.rounds)
    elif resume:
        log.warning("nothing to resume in %s: starting at round 1", out_dir)
    if first == 1 and cfg.data_check.enabled:
        # Before round 1 (a resumed run keeps the check it had): flags are printed once.
        history.data_check = run_data_check(grid, cfg, timeout=cfg.strategy.round_timeout,
                                            expected=len(cfg.sites), grace=site_grace)
        summary = history.write_summary()
        if history.data_check["stopped"]:
            write_report(out_dir, summary)
            return summary
    progress = RoundProgress(cfg.rounds, first, [s.name for s in cfg.sites])
    live = getattr(grid, "live", None)  # a LiveGrid: the bar shows each site's state
    if live is not None:
        live.listeners.append(progress.sites_changed)

    def on_round_end(server_round: int, round_arrays: ArrayRecord) -> None:
        # Strategy state first: a checkpoint listed in summary.json always has its state.
        save_strategy_state(out_dir, server_round, strategy)
        history.finish_round(server_round, round_arrays.to_torch_state_dict())
        # A round's model is evaluated at the start of the next one: show the latest known.
        name = history.headline.name if history.headline else None
        known = [r for r in history.rounds if r["aggregate"].get(name) is not None]
        if known:
            progress.metric(f"{name} {known[-1]['aggregate'][name]:.3f} "
                            f"(round {known[-1]['round']} model)")
        progress.round_done()

    round_config = RoundConfig.for_run(cfg, history.run_uid)
    try:
        final_arrays = run_rounds(
            strategy, grid, arrays, range(first, cfg.rounds + 1),
            timeout=cfg.strategy.round_timeout,
            train_config=round_config,
            evaluate_config=round_config,
            history=history, on_round_end=on_round_end,
            expected_sites=len(cfg.sites), site_grace=site_grace, node_names=node_names,
        )
    finally:
        progress.close()
        if live is not None:
            live.listeners.remove(progress.sites_changed)
    final_state = final_arrays.to_torch_state_dict() if len(final_arrays) else initial
    model_path = history.save_final_model(final_state)
    cross = (cross_site_stage(grid, cfg, final_state, task, validator, node_names,
                              history.run_uid)
             if cfg.cross_site.enabled else None)
    final = {"test_sets": evaluate_test_sets(cfg, final_state, history.tracker)}
    summary = history.write_summary(final=final, model=model_path)
    if cross is not None:
        summary = add_to_summary(out_dir, summary, cross)
    write_report(out_dir, summary)
    history.finish_tracking(summary)
    return summary


def rerun_cross_site(grid: Grid, cfg: Config, out_dir: Path) -> dict[str, Any]:
    """The cross-site stage alone, on the final model of the finished run in ``out_dir``
    (``fedscan cross-site``): its summary.json gains (or replaces) ``cross_site`` and its
    report is rewritten.

    Raises:
        FedscanError: ``out_dir`` has no final_model.pt or summary.json.
    """
    _, state, _ = load_model(out_dir / "final_model.pt")
    summary_path = out_dir / "summary.json"
    if not summary_path.is_file():
        raise FedscanError(f"{summary_path} not found: not a finished run folder")
    task = build_task(cfg, allow_import=True)
    model = task.build_model()
    shared = set(task.shared_keys(model))
    state = {k: v for k, v in state.items() if k in shared}
    validator = UpdateValidator.from_config(state, cfg, task.metrics)
    summary = json.loads(summary_path.read_text())
    cross = cross_site_stage(grid, cfg, state, task, validator, None,
                             str(summary.get("run_uid") or ""))
    summary = add_to_summary(out_dir, summary, cross)
    write_report(out_dir, summary)
    return summary


def make_cross_site_app(cfg: Config, out_dir: str | Path) -> ServerApp:
    """A ServerApp that runs only :func:`rerun_cross_site` on the run in ``out_dir``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        configure_console()
        rerun_cross_site(grid, cfg, Path(out_dir))

    return app


def make_server_app(cfg: Config, out_dir: str | Path, resume: bool = False,
                    wrap_strategy: StrategyWrapper | None = None) -> ServerApp:
    """A ServerApp bound to a validated config and output folder (``resume``: continue the
    run there after its last completed round; ``wrap_strategy``: see run_federation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        configure_console()
        with live_run(grid, cfg, out_dir) as live_grid:
            run_federation(live_grid, cfg, Path(out_dir), resume=resume,
                           wrap_strategy=wrap_strategy)

    return app


#: The deployment entry point (``[tool.flwr.app.components] serverapp``): ``fedscan server
#: start`` passes the server config file, the run folder and whether to resume in the run
#: config; the SuperLink runs this in a ``flwr-serverapp`` process on the server host.
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedscan.server.settings import NODES_FILE, load_server_settings

    configure_console()
    run_config = context.run_config
    settings = load_server_settings(str(run_config["server-config"]))
    run_dir = Path(str(run_config["run-dir"]))
    nodes = run_dir / NODES_FILE
    names = json.loads(nodes.read_text()) if nodes.is_file() else {}
    node_names = {int(k): v for k, v in names.items()}
    # Without node authentication (--insecure) no key was admitted: every node takes part.
    admission = (None if bool(run_config.get("insecure", False))
                 else Admission(nodes, settings.site_keys))
    with live_run(grid, settings.federation, run_dir, node_names) as live_grid:
        summary = run_federation(live_grid, settings.federation, run_dir,
                                 resume=bool(run_config.get("resume", False)),
                                 site_grace=settings.server.site_grace, node_names=node_names,
                                 admission=admission)
    if (summary.get("data_check") or {}).get("stopped"):
        log.error("the data check flagged %d problem(s) (in %s) and data_check.on_flag is "
                  "stop: no round run", len(summary["data_check"]["flags"]),
                  run_dir / "summary.json")
