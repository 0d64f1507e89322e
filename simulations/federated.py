"""Federated mode: the same ServerApp and ClientApp on Flower's simulation runtime (Ray)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedscan.shared.config import Config, SiteConfig
from fedscan.shared.errors import FedscanError

if TYPE_CHECKING:
    from flwr.clientapp.typing import Mod


def simulation_backend(cfg: Config) -> dict[str, Any]:
    """Ray resources of the virtual hospitals' actors.

    Locally: one ClientApp actor at a time using all cores (and the GPU if any): several
    actors on few cores contend and run slower (measured in flower-1.41 notes), and each 3D
    model needs its own memory. On an existing Ray cluster (``simulation.ray_address`` or
    ``RAY_ADDRESS``): the cluster's resources, ``simulation.cpus_per_site`` (default 1) and
    ``gpus_per_site`` (default 0) per actor, so Flower starts as many actors as fit on its
    nodes.
    """
    import torch

    sim = cfg.simulation
    address = sim.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        resources = {"num_cpus": sim.cpus_per_site or 1, "num_gpus": sim.gpus_per_site or 0.0}
        return {"client_resources": resources,
                "init_args": {"address": address, "include_dashboard": False}}
    cpus = os.cpu_count() or 1
    gpus = 1.0 if cfg.device != "cpu" and torch.cuda.is_available() else 0.0
    per_site = {"num_cpus": sim.cpus_per_site or cpus,
                "num_gpus": gpus if sim.gpus_per_site is None else sim.gpus_per_site}
    return {
        "client_resources": per_site,
        "init_args": {"num_cpus": cpus, "num_gpus": gpus, "include_dashboard": False},
    }


def site_for_client(cfg: Config, site: SiteConfig, out_dir: Path) -> SiteConfig:
    """The site as its virtual hospital sees it: privacy resolved (its own block, else the
    top-level one), a state folder ``out_dir/site-state/<site>`` for its ε ledger, audit and
    site log unless it names one (so a resumed run continues each site's ledger), and the
    site-side paths of the researcher's config (``harmonisation.reference`` unless the site
    names its own): the server's task config carries no path, as in deployment. The
    study's paired truth (``truth``) is the researcher's: the hospital never holds it."""
    state_dir = site.state_dir or str(Path(out_dir).resolve() / "site-state" / site.name)
    reference = site.harmonisation_reference or cfg.harmonisation.reference
    return dataclasses.replace(site, privacy=cfg.site_privacy(site), state_dir=state_dir,
                               harmonisation_reference=reference, truth=None)


def run_federated(cfg: Config, out_dir: Path, resume: bool = False,
                  client_mods: Sequence[Mod] = ()) -> dict[str, Any]:
    """Run the federation with one virtual SuperNode per site; returns summary.json's content.

    Each virtual hospital is told its site by Flower's ``partition-id`` and reads only its
    own folder, with its resolved privacy setting and a state folder under ``out_dir``.

    With ``resume`` the run continues after the last completed round in ``out_dir``: the
    server restores the global model, the strategy's state and the history; each virtual
    hospital reads its ε ledger back from its state folder; sampling and every site-round's
    training are functions of the seed and the round (see docs/scale.md), so the result
    equals an uninterrupted run.

    Args:
        cfg: the run config.
        out_dir: the run folder.
        resume: continue after the last completed round in ``out_dir``.
        client_mods: Flower mods outermost around every virtual hospital's ClientApp (the
            attack benchmark's adversary, the scale benchmark's timer; none in a normal run).
    """
    from flwr.simulation import run_simulation

    from fedscan.client.client_app import make_client_app
    from fedscan.server.server_app import make_server_app
    from fedscan.shared.console import configure_console, verbose

    sites = [site_for_client(cfg, s, out_dir) for s in cfg.sites]
    wrap = None
    if cfg.consortium is not None:
        from fedscan.simulations.consortium import ConsortiumStrategy

        def wrap(strategy, history):
            return ConsortiumStrategy(strategy, cfg, history)
    server_app = make_server_app(cfg, out_dir, resume=resume, wrap_strategy=wrap)
    # The researcher's machine runs both sides: a task named by import path is allowed here.
    # The sites' step lines go to their site.log; the console shows the rounds bar.
    client_app = make_client_app(lambda ctx: sites[int(ctx.node_config["partition-id"])],
                                 allow_task_import=True, echo=False, replayable=True,
                                 outer_mods=tuple(client_mods))
    configure_console()  # Flower's lines once, no DEBUG (Opacus gives the root a handler)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(sites),
                   backend_config=simulation_backend(cfg), verbose_logging=verbose())
    summary = out_dir / "summary.json"
    if not summary.is_file():
        raise FedscanError(f"federated run ended without writing {summary}; see the log above")
    result = json.loads(summary.read_text())
    check = result.get("data_check") or {}
    if check.get("stopped"):
        raise FedscanError(f"the data check flagged {len(check['flags'])} problem(s) (above "
                           f"and in {summary}) and data_check.on_flag is stop: no round run")
    return result


def run_cross_site_only(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """``fedscan cross-site``: the cross-site stage alone, on the final model of the finished
    run in ``out_dir``, with the same virtual hospitals (and their state folders: a DP site's
    ledger continues, so fine-tuning again spends ε again). Returns the updated summary.

    Weights a task keeps at the sites (FedBN's norms) are not in final_model.pt and not kept
    between processes: such a re-run evaluates them at their initial values.
    """
    from flwr.simulation import run_simulation

    from fedscan.client.client_app import make_client_app
    from fedscan.server.server_app import make_cross_site_app
    from fedscan.shared.console import configure_console, verbose

    sites = [site_for_client(cfg, s, out_dir) for s in cfg.sites]
    client_app = make_client_app(lambda ctx: sites[int(ctx.node_config["partition-id"])],
                                 allow_task_import=True, echo=False, replayable=True)
    configure_console()
    run_simulation(server_app=make_cross_site_app(cfg, out_dir), client_app=client_app,
                   num_supernodes=len(sites), backend_config=simulation_backend(cfg),
                   verbose_logging=verbose())
    summary = json.loads((out_dir / "summary.json").read_text())
    if "cross_site" not in summary:
        raise FedscanError(f"cross-site evaluation wrote nothing to {out_dir}/summary.json; "
                           "see the log above")
    return summary
