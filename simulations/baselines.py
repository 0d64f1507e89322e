"""Baselines on the same step budget: each site alone (local) and all data pooled centrally.

Federated training runs ``rounds x local_steps`` steps at every site. ``local`` gives each site
exactly that budget on its own data; ``pooled`` runs the federation's total
(``rounds x local_steps x sites``) on the union. Both are evaluated on every site's
validation cases each "round" (every ``local_steps`` steps per site), so the curves line up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fedscan.server.server_app import evaluate_test_sets
from fedscan.shared.config import Config
from fedscan.shared.data import SiteData, read_site
from fedscan.shared.history import RunHistory
from fedscan.shared.report import write_report
from fedscan.shared.tasks import build_task
from fedscan.shared.tasks.base import resolve_device
from fedscan.shared.tasks.loop import train_steps


def _read_sites(cfg: Config) -> list[SiteData]:
    return [read_site(s, cfg.data, check=False) for s in cfg.sites]


def _metrics(result: Any) -> dict[str, Any]:
    return {**result.metrics, "num_examples": result.num_examples}


def run_local(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """Train one model per site on its own data only; evaluate each on its own validation."""
    history = RunHistory(out_dir, cfg, mode="local")
    task = build_task(cfg, allow_import=True)  # the researcher's own config
    device = resolve_device(cfg.device)
    sites = _read_sites(cfg)
    states, models = {}, {}
    for site in sites:
        torch.manual_seed(cfg.seed)
        states[site.name] = task.build_model().to(device)
    steps = {s.name: cfg.steps_per_round(len(s.train)) for s in sites}
    loaders = {s.name: task.make_train_loader(s.train, seed=cfg.seed) for s in sites}
    optims = {s.name: task.make_optimizer(states[s.name].parameters()) for s in sites}
    for rnd in tqdm(range(1, cfg.rounds + 1), desc="local rounds", unit="round"):
        for site in sites:
            model = states[site.name]
            res = train_steps(task, model, optims[site.name], loaders[site.name], steps[site.name])
            history.record_train(rnd, site.name, {"loss": res.loss, "steps": res.steps,
                                                  "num_examples": res.num_examples})
            history.record_evaluate(rnd, site.name, _metrics(task.evaluate(model, site.validation)))
        history.finish_round(rnd, None)
    for site in sites:
        models[site.name] = history.save_final_model(
            states[site.name].state_dict(), name=f"final_model_{site.name}.pt",
            meta={"site": site.name})
    summary = history.write_summary(model=models)
    write_report(out_dir, summary)
    return summary


def run_pooled(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """Train one model on the union of all sites' training cases (the centralised upper bound)."""
    history = RunHistory(out_dir, cfg, mode="pooled")
    task = build_task(cfg, allow_import=True)  # the researcher's own config
    device = resolve_device(cfg.device)
    sites = _read_sites(cfg)
    union = [case for site in sites for case in site.train]
    torch.manual_seed(cfg.seed)
    model = task.build_model().to(device)
    loader = task.make_train_loader(union, seed=cfg.seed)
    optimizer = task.make_optimizer(model.parameters())
    steps = sum(cfg.steps_per_round(len(s.train)) for s in sites)
    for rnd in tqdm(range(1, cfg.rounds + 1), desc="pooled rounds", unit="round"):
        res = train_steps(task, model, optimizer, loader, steps)
        history.record_train(rnd, "pooled", {"loss": res.loss, "steps": res.steps,
                                             "num_examples": res.num_examples})
        for site in sites:
            history.record_evaluate(rnd, site.name, _metrics(task.evaluate(model, site.validation)))
        history.finish_round(rnd, model.state_dict())
    state = model.state_dict()
    path = history.save_final_model(state)
    summary = history.write_summary(final={"test_sets": evaluate_test_sets(cfg, state)},
                                    model=path)
    write_report(out_dir, summary)
    return summary
