"""ClientApp: a hospital trains and evaluates the global model on its own data only.

Only weights and aggregate metrics leave the site: never images, labels, file names or
per-case values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedscan.shared.config import Config, SiteConfig
from fedscan.shared.data import SiteData, read_dataset
from fedscan.shared.messages import (
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    SITE,
    TASK_CONFIG,
    config_for_site,
    site_record,
    to_arrays,
)
from fedscan.shared.tasks import build_task
from fedscan.shared.tasks.base import resolve_device

log = logging.getLogger("fedscan.client")

#: How a ClientApp finds out which hospital it is (simulation: partition id; deployment: its
#: own site config file).
SiteResolver = Callable[[Context], SiteConfig]


def _site_data(cfg: Config, site: SiteConfig) -> SiteData:
    # The data contract was checked in full before the run; here only dataset.json is read.
    return read_dataset(site.data, name=site.name, val_fraction=cfg.data.val_fraction,
                        split_seed=cfg.data.split_seed, num_classes=cfg.data.num_classes,
                        in_channels=cfg.data.in_channels, check=False)


def _load_global(cfg: Config, msg: Message) -> tuple[torch.nn.Module, object]:
    task = build_task(cfg)
    model = task.build_model()
    model.load_state_dict(msg.content[ARRAYS].to_torch_state_dict())
    return model.to(resolve_device(cfg.device)), task


def train(msg: Message, context: Context, site: SiteConfig) -> Message:
    """Train the received global model for the configured local steps."""
    config = msg.content[CONFIG]
    cfg = config_for_site(str(config[TASK_CONFIG]), site)
    server_round = int(config.get("server-round", 0))
    torch.manual_seed(cfg.seed + server_round)
    data = _site_data(cfg, site)
    model, task = _load_global(cfg, msg)
    loader = task.make_train_loader(data.train, seed=cfg.seed * 7919 + server_round)
    optimizer = task.make_optimizer(model.parameters())
    steps = cfg.steps_per_round(len(data.train))
    every = max(1, steps // 4)

    def on_step(step: int, total: int, loss: float) -> None:
        if step % every == 0 or step == total:
            print(f"[{site.name}] round {server_round} step {step}/{total} loss {loss:.4f}",
                  flush=True)

    mu = float(config.get("proximal-mu", 0.0))
    result = task.train_steps(model, optimizer, loader, steps, proximal_mu=mu, on_step=on_step)
    shared = set(task.shared_keys(model))
    weights = {k: v for k, v in model.state_dict().items() if k in shared}
    metrics = MetricRecord({"loss": float(result.loss), "steps": int(result.steps),
                            NUM_EXAMPLES: int(result.num_examples)})
    content = RecordDict({ARRAYS: to_arrays(weights), METRICS: metrics,
                          SITE: site_record(site.name)})
    return Message(content=content, reply_to=msg)


def evaluate(msg: Message, context: Context, site: SiteConfig) -> Message:
    """Evaluate the received global model on the site's validation cases."""
    cfg = config_for_site(str(msg.content[CONFIG][TASK_CONFIG]), site)
    data = _site_data(cfg, site)
    model, task = _load_global(cfg, msg)
    result = task.evaluate(model, data.validation)
    values = {k: float(v) for k, v in result.metrics.items()}
    values[NUM_EXAMPLES] = int(result.num_examples)
    content = RecordDict({METRICS: MetricRecord(values), SITE: site_record(site.name)})
    return Message(content=content, reply_to=msg)


def make_client_app(resolve_site: SiteResolver) -> ClientApp:
    """A ClientApp whose handlers act for the site ``resolve_site`` names."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, resolve_site(context))

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate(msg, context, resolve_site(context))

    return app
