"""Flower strategies chosen by config, wrapped so every site's reply is recorded."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, Strategy

from fedscan.server.sampling import sampling_on
from fedscan.server.validation import Rejection, UpdateValidator, check_evaluation
from fedscan.shared.config import StrategyConfig
from fedscan.shared.history import RunHistory
from fedscan.shared.messages import (
    METRICS,
    NUM_EXAMPLES,
    PRIVACY,
    SAMPLES,
    reply_evaluation,
    reply_privacy,
    reply_site,
)

log = logging.getLogger("fedscan.server")


def build_strategy(cfg: StrategyConfig, num_sites: int) -> Strategy:
    """The configured Flower strategy, sampling every site each round.

    Args:
        cfg: the ``strategy`` config block.
        num_sites: sites in the federation; ``min_sites`` defaults to all of them.
    """
    # With sampling, server/sampling.py shows the strategy only the sampled sites.
    min_sites = 1 if sampling_on(cfg) else cfg.min_sites or num_sites
    common = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": min_sites,
        "min_evaluate_nodes": min_sites,
        "min_available_nodes": min_sites,
        "weighted_by_key": SAMPLES if cfg.weighted_by == "samples" else NUM_EXAMPLES,
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


def _declined(msg: Message) -> bool:
    """A reply that trained on no examples (a DP site whose budget is spent)."""
    return _metrics(msg)["num_examples"] == 0 and PRIVACY in msg.content.config_records


def _train_entry(msg: Message) -> dict[str, Any]:
    """A train reply's metrics with its privacy record (whose cumulative ``steps`` wins)."""
    return {**_metrics(msg), **reply_privacy(msg)}


class RecordingStrategy(Strategy):
    """Delegates to a Flower strategy and records each site's train and evaluate metrics.

    Flower's ``Result`` keeps only aggregated metrics; a hospital consortium needs to see each
    site's numbers per round, so the replies are read here before the inner strategy
    aggregates them. A train reply's ``privacy`` record (ε, δ, σ, q, cumulative steps, status)
    is recorded with its metrics; for a DP site ``steps`` is then the ledger's cumulative
    count and ``steps_this_round`` this round's.

    Replies with no examples (a site that declined because its privacy budget is spent) are
    recorded but not aggregated: they carry the unchanged global model, which FedMedian or
    FedAdam would otherwise count as a vote for no change.
    """

    def __init__(self, inner: Strategy, history: RunHistory,
                 validator: UpdateValidator | None = None) -> None:
        self.inner = inner
        self.history = history
        # Replies are validated before the inner strategy sees them (see validation.py).
        self.validator = validator
        self._sent: ArrayRecord | None = None

    def _rejected(self, server_round: int, phase: str, rejected: list[Rejection]) -> None:
        for r in rejected:
            self.history.record_rejection(server_round, r.site, phase, r.reason)

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent = arrays  # the reference for this round's update-norm check
        return self.inner.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def _record_received_evaluation(self, server_round: int, replies: list[Message]) -> None:
        """Record the previous round's model evaluation that train replies carry."""
        for msg in replies:
            if msg.has_error():
                continue
            metrics = reply_evaluation(msg)
            if metrics is None:
                continue
            site = reply_site(msg)
            reason = check_evaluation(metrics)
            if reason:
                self.history.record_rejection(server_round - 1, site, "evaluate", reason)
                continue
            metrics["num_examples"] = metrics.pop(NUM_EXAMPLES)
            self.history.record_evaluate(server_round - 1, site, metrics)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._record_received_evaluation(server_round, replies)
        # A site that declined (its privacy budget is spent) trained nothing: record its
        # status, but neither validate nor aggregate its unchanged copy of the global model.
        declined = [m for m in replies if not m.has_error() and _declined(m)]
        for msg in declined:
            self.history.record_train(server_round, reply_site(msg), _train_entry(msg))
        replies = [m for m in replies if m.has_error() or not _declined(m)]
        if self.validator is not None:
            replies, rejected = self.validator.check_train(replies, self._sent,
                                                           declined=len(declined))
            self._rejected(server_round, "train", rejected)
        for msg in replies:
            if not msg.has_error():
                self.history.record_train(server_round, reply_site(msg), _train_entry(msg))
        if not any(not m.has_error() for m in replies):
            return None, None  # nobody trained: the global model stays as it is
        try:
            arrays, metrics = self.inner.aggregate_train(server_round, replies)
        except InconsistentMessageReplies as exc:  # never end a run over one round's replies
            log.error("round %d: train replies not aggregated (%s); the global model is kept",
                      server_round, exc)
            return None, None
        if arrays is not None and self.validator is not None:
            arrays = self.validator.conform(arrays)  # back to the model's dtypes (fp32)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        replies = list(replies)
        if self.validator is not None:
            replies, rejected = self.validator.check_evaluate(replies)
            self._rejected(server_round, "evaluate", rejected)
        for msg in replies:
            if not msg.has_error():
                self.history.record_evaluate(server_round, reply_site(msg), _metrics(msg))
        try:
            return self.inner.aggregate_evaluate(server_round, replies)
        except InconsistentMessageReplies as exc:
            log.error("round %d: evaluate replies not aggregated (%s)", server_round, exc)
            return None
