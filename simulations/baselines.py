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
    history.finish_tracking(summary)
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
    test_sets = evaluate_test_sets(cfg, state, history.tracker)
    summary = history.write_summary(final={"test_sets": test_sets}, model=path)
    write_report(out_dir, summary)
    history.finish_tracking(summary)
    return summary


def add_baselines_to_cross_site(cfg: Config, federated_dir: Path, local_dir: Path | None,
                                pooled_dir: Path | None) -> dict[str, Any] | None:
    """``--mode all``: each site's model trained alone (``alone:<site>``) and the pooled model
    join the federated run's cross-site matrix, evaluated here on every site's validation
    cases (a simulation holds every site's data; a deployment has no such models). The
    federated summary.json and report are rewritten; returns the summary (None when the
    federated run has no matrix)."""
    import json

    from fedscan.shared.checkpoint import load_model
    from fedscan.shared.cross_site import ALONE, POOLED, summarise

    summary = json.loads((federated_dir / "summary.json").read_text())
    cs = summary.get("cross_site")
    if not isinstance(cs, dict) or "matrix" not in cs:
        return None
    task = build_task(cfg, allow_import=True)  # the researcher's own config
    device = resolve_device(cfg.device)
    sites = [s for s in _read_sites(cfg) if s.name in cs["sites"]]
    files = {}
    if local_dir is not None:
        files.update({f"{ALONE}{s.name}": local_dir / f"final_model_{s.name}.pt" for s in sites})
    if pooled_dir is not None:
        files[POOLED] = pooled_dir / "final_model.pt"
    matrix = {model: dict(row) for model, row in cs["matrix"].items()}
    for name, path in files.items():
        if not path.is_file():
            continue
        model = task.build_model()
        model.load_state_dict(load_model(path)[1])
        model.to(device)
        matrix[name] = {s.name: _metrics(task.evaluate(model, s.validation)) for s in sites}
    cs = summarise(matrix, cs["sites"], task.metrics, fine_tune_steps=cs["fine_tune_steps"],
                   not_shared=cs.get("not_shared", {}), dropped=cs.get("dropped", []))
    from fedscan.server.cross_site import add_to_summary
    from fedscan.shared.cross_site import format_matrix

    summary = add_to_summary(federated_dir, summary, cs)
    write_report(federated_dir, summary)
    print(format_matrix(cs, rows=list(files)), flush=True)  # the rest was printed
    return summary
