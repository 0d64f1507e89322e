"""Flower strategies chosen by config, wrapped so every site's reply is recorded."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, Strategy

from fedscan.shared.config import StrategyConfig
from fedscan.shared.history import RunHistory
from fedscan.shared.messages import METRICS, NUM_EXAMPLES, reply_site


def build_strategy(cfg: StrategyConfig, num_sites: int) -> Strategy:
    """The configured Flower strategy, sampling every site each round.

    Args:
        cfg: the ``strategy`` config block.
        num_sites: sites in the federation; ``min_sites`` defaults to all of them.
    """
    min_sites = cfg.min_sites or num_sites
    common = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": min_sites,
        "min_evaluate_nodes": min_sites,
        "min_available_nodes": min_sites,
    }
    if cfg.name == "fedavg":
        return FedAvg(**common)
    if cfg.name == "fedprox":
        return FedProx(proximal_mu=cfg.proximal_mu, **common)
    if cfg.name == "fedadam":
        return FedAdam(eta=cfg.eta, eta_l=cfg.eta_l, beta_1=cfg.beta_1, beta_2=cfg.beta_2,
                       tau=cfg.tau, **common)
    if cfg.name == "fedmedian":
        return FedMedian(**common)
    raise ValueError(f"unknown strategy {cfg.name!r}")


def _metrics(msg: Message) -> dict[str, float]:
    records = msg.content.metric_records
    record = records.get(METRICS) or next(iter(records.values()))
    out = {k: v for k, v in record.items() if not isinstance(v, list)}
    out["num_examples"] = out.pop(NUM_EXAMPLES, 0)
    return out


class RecordingStrategy(Strategy):
    """Delegates to a Flower strategy and records each site's train and evaluate metrics.

    Flower's ``Result`` keeps only aggregated metrics; a hospital consortium needs to see each
    site's numbers per round, so the replies are read here before the inner strategy
    aggregates them.
    """

    def __init__(self, inner: Strategy, history: RunHistory) -> None:
        self.inner = inner
        self.history = history

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:
            if not msg.has_error():
                self.history.record_train(server_round, reply_site(msg), _metrics(msg))
        return self.inner.aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        replies = list(replies)
        for msg in replies:
            if not msg.has_error():
                self.history.record_evaluate(server_round, reply_site(msg), _metrics(msg))
        return self.inner.aggregate_evaluate(server_round, replies)
