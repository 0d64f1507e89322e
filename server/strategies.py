"""Flower strategies chosen by config, wrapped so every site's reply is recorded."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    MultiKrum,
    Strategy,
)

from fedscan.server.rounds import restore_strategy_state, strategy_state
from fedscan.server.sampling import sampling_on
from fedscan.server.validation import (
    Adjustment,
    Rejection,
    UpdateValidator,
    declined_reply,
)
from fedscan.shared.config import StrategyConfig
from fedscan.shared.history import RunHistory
from fedscan.shared.messages import (
    EVALUATE_RECEIVED,
    EVALUATION,
    METRICS,
    NUM_EXAMPLES,
    SAMPLES,
    reply_evaluation,
    reply_privacy,
    reply_site,
)

log = logging.getLogger("fedscan.server")


def build_strategy(cfg: StrategyConfig, num_sites: int) -> Strategy:
    """The configured Flower strategy, sampling every site each round.

    ``fedmedian``, ``fedtrimmedavg``, ``multikrum`` and ``bulyan`` are Flower's robust
    aggregators; they run after fedscan's own checks (see validation.py), like the others.

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
    if cfg.name == "fedtrimmedavg":
        return FedTrimmedAvg(beta=cfg.trim_beta, **common)
    if cfg.name == "multikrum":
        selected = cfg.num_selected or max(1, num_sites - cfg.num_malicious)
        return MultiKrum(num_malicious_nodes=cfg.num_malicious, num_nodes_to_select=selected,
                         **common)
    if cfg.name == "bulyan":
        return Bulyan(num_malicious_nodes=cfg.num_malicious, **common)
    raise ValueError(f"unknown strategy {cfg.name!r}")


def _metrics(msg: Message) -> dict[str, float]:
    records = msg.content.metric_records
    record = records.get(METRICS) or next(iter(records.values()))
    out = {k: v for k, v in record.items() if not isinstance(v, list)}
    out["num_examples"] = out.pop(NUM_EXAMPLES, 0)
    return out


def _train_entry(msg: Message) -> dict[str, Any]:
    """A train reply's metrics with its privacy record (whose cumulative ``steps`` wins)."""
    return {**_metrics(msg), **reply_privacy(msg)}


def _finite(arrays: ArrayRecord) -> bool:
    return all(np.isfinite(values).all() for values in (a.numpy() for a in arrays.values())
               if values.dtype.kind in "fc")


class RecordingStrategy(Strategy):
    """Delegates to a Flower strategy and records each site's train and evaluate metrics.

    Flower's ``Result`` keeps only aggregated metrics; a hospital consortium needs to see each
    site's numbers per round, so the replies are read here before the inner strategy
    aggregates them. A train reply's ``privacy`` record (ε, δ, σ, q, cumulative steps, status)
    is recorded with its metrics; for a DP site ``steps`` is then the ledger's cumulative
    count and ``steps_this_round`` this round's.

    With a validator, every reply is checked first (see validation.py): a malformed one is
    rejected whole (its metrics enter neither the aggregate nor the history), updates are
    bounded against the round's others, and the aggregate must be finite before it becomes
    the global model (else the round keeps the previous one).

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
        #: Whether this round's train message asked for the received model's evaluation.
        self._evaluation_expected: bool | None = None

    def _rejected(self, server_round: int, phase: str, rejected: list[Rejection]) -> None:
        for r in rejected:
            self.history.record_rejection(server_round, r.site, phase, r.reason)

    def _adjusted(self, server_round: int, phase: str, adjusted: list[Adjustment]) -> None:
        for a in adjusted:
            self.history.record_adjustment(server_round, a.site, phase, a.reason)

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent = arrays  # the reference for this round's update-norm check
        self._evaluation_expected = bool(config.get(EVALUATE_RECEIVED, False))
        return self.inner.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def _record_received_evaluation(self, server_round: int, replies: list[Message]) -> None:
        """Record the previous round's model evaluation that (well-formed) train replies
        carry, their case counts capped like an evaluate round's."""
        if self._evaluation_expected is False or server_round < 2:
            return
        entries = []
        for msg in replies:
            metrics = reply_evaluation(msg)
            if metrics is not None and EVALUATION in msg.content:
                entries.append((msg, metrics))
        if self.validator is not None:
            self.validator.cap_evaluations(entries)
            self._adjusted(server_round - 1, "evaluate", self.validator.adjustments)
        for msg, metrics in entries:
            metrics["num_examples"] = metrics.pop(NUM_EXAMPLES)
            self.history.record_evaluate(server_round - 1, reply_site(msg), metrics)

    def _wellformed(self, server_round: int, replies: list[Message]) -> list[Message]:
        """The non-error train replies that pass the per-reply checks (others recorded)."""
        if self.validator is None:
            return [m for m in replies if not m.has_error()]
        ok, rejected = [], []
        for msg in replies:
            if msg.has_error():
                continue
            reason = self.validator.check_reply(msg, train=True,
                                                evaluation_expected=self._evaluation_expected)
            if reason:
                rejected.append(Rejection(reply_site(msg), int(msg.metadata.src_node_id),
                                          reason))
                log.warning("rejected reply from %s (node %s): %s", rejected[-1].site,
                            msg.metadata.src_node_id, reason)
            else:
                ok.append(msg)
        self._rejected(server_round, "train", rejected)
        return ok

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        errors = [m for m in replies if m.has_error()]
        wellformed = self._wellformed(server_round, replies)
        self._record_received_evaluation(server_round, wellformed)
        # A site that declined (its privacy budget is spent) trained nothing: record its
        # status, but neither bound nor aggregate its unchanged copy of the global model.
        declined = [m for m in wellformed if declined_reply(m)]
        for msg in declined:
            self.history.record_train(server_round, reply_site(msg), _train_entry(msg))
        active = [m for m in wellformed if not declined_reply(m)]
        notes: dict[int, dict[str, float]] = {}
        if self.validator is not None:
            active, rejected = self.validator.select_train(active, self._sent,
                                                           declined=len(declined))
            self._rejected(server_round, "train", rejected)
            self._adjusted(server_round, "train", self.validator.adjustments)
            notes = self.validator.notes
        for msg in active:
            self.history.record_train(server_round, reply_site(msg), {
                **_train_entry(msg), **notes.get(int(msg.metadata.src_node_id), {})})
        if not active:
            return None, None  # nobody trained: the global model stays as it is
        state = strategy_state(self.inner)
        try:
            arrays, metrics = self.inner.aggregate_train(server_round, active + errors)
        except Exception as exc:  # never end a run over one round's replies
            log.error("round %d: train replies not aggregated (%s: %s); the global model is "
                      "kept", server_round, type(exc).__name__, exc)
            restore_strategy_state(self.inner, state)
            return None, None
        if arrays is not None and self.validator is not None:
            arrays = self.validator.conform(arrays)  # back to the model's dtypes (fp32)
        if arrays is not None and not _finite(arrays):
            log.error("round %d: the aggregate is not finite; the global model is kept",
                      server_round)
            self.history.record_rejection(server_round, "aggregate", "train",
                                          "the aggregate is not finite; global model kept")
            restore_strategy_state(self.inner, state)  # e.g. FedAdam's moments
            return None, None
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        replies = list(replies)
        if self.validator is not None:
            replies, rejected = self.validator.check_evaluate(replies)
            self._rejected(server_round, "evaluate", rejected)
            self._adjusted(server_round, "evaluate", self.validator.adjustments)
        for msg in replies:
            if not msg.has_error():
                self.history.record_evaluate(server_round, reply_site(msg), _metrics(msg))
        try:
            return self.inner.aggregate_evaluate(server_round, replies)
        except Exception as exc:
            log.error("round %d: evaluate replies not aggregated (%s: %s)", server_round,
                      type(exc).__name__, exc)
            return None
