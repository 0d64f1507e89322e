"""Cross-site evaluation: the final global model and each site's fine-tuned model, evaluated
by every site on its own validation cases (see docs/cross_site.md).

Two exchanges after the last round:

1. ``train.cross_site``: each site fine-tunes the final global model for
   ``cross_site.fine_tune_steps`` local steps and returns it (its *local model*), unless its
   policy keeps it (``policy-refused``; no weights come back). Replies pass the same checks
   as a round's updates (keys, shapes, dtypes, finite values, counts, privacy record).
2. ``evaluate.cross_site``: each site receives the global model and every shared local
   model and returns one record of aggregate metrics per model. Each record passes the
   checks of a round's evaluation (declared metric keys, each value within its metric's
   range, case count); a record that fails is dropped and the reason recorded.

The result (``summary.json``'s ``cross_site``) is a models x sites matrix of every metric.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedscan.server.validation import UpdateValidator, check_evaluation, declined_reply
from fedscan.shared.config import Config
from fedscan.shared.cross_site import GLOBAL, summarise
from fedscan.shared.error_codes import describe_error
from fedscan.shared.history import _clean
from fedscan.shared.messages import (
    ARRAYS,
    CONFIG,
    CROSS_SITE_EVALUATE,
    CROSS_SITE_TRAIN,
    MODEL_PREFIX,
    NUM_EXAMPLES,
    SITE,
    RoundConfig,
    reply_site,
    to_arrays,
)
from fedscan.shared.tasks.base import MetricSpec

log = logging.getLogger("fedscan.server")


def fine_tune_config(cfg: Config, run_uid: str = "") -> RoundConfig:
    """The message config of step 1: the run's task config with ``fine_tune_steps`` local
    steps, as round ``cfg.rounds`` (a site's ``policy.max_rounds`` accepted the run)."""
    tuned = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, local_steps=cfg.cross_site.fine_tune_steps, local_epochs=None))
    return dataclasses.replace(RoundConfig.for_run(tuned, run_uid), server_round=cfg.rounds)


class _Exchange:
    """Sends one message per node and keeps, per node, the one reply that answers it."""

    def __init__(self, grid: Grid, timeout: float, node_names: Mapping[int, str]) -> None:
        self.grid = grid
        self.timeout = timeout
        self.names = dict(node_names)
        self._dropped: list[tuple[int, str, str]] = []

    def site(self, node: int, reply: Message | None = None) -> str:
        """The node's registered name, else the one a reply of it declared (never another
        node's), else ``node-<id>``."""
        if node in self.names:
            return self.names[node]
        if reply is None:  # an error reply names no site: a later reply may
            return f"node-{node}"
        name = reply_site(reply)
        if name in self.names.values():
            name = f"node-{node}"
        self.names[node] = name
        return name

    def drop(self, node: int, phase: str, reason: str) -> None:
        log.warning("cross-site: dropped a %s reply from %s (node %s): %s", phase,
                    self.site(node), node, reason)
        self.record(node, phase, reason)

    def record(self, node: int, phase: str, reason: str) -> None:
        self._dropped.append((node, phase, reason))

    @property
    def dropped(self) -> list[dict[str, str]]:
        """Every reply or record dropped, with its site's name as finally known."""
        return [{"site": self.site(node), "phase": phase, "reason": reason}
                for node, phase, reason in self._dropped]

    def run(self, phase: str, messages: list[Message]) -> list[tuple[int, Message]]:
        """``(node, reply)`` for each node that answered its message exactly once."""
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        asked = {m.metadata.message_id: m for m in messages}
        kept: list[tuple[int, Message]] = []
        for reply in replies:
            question = asked.get(reply.metadata.reply_to_message_id)
            src = int(reply.metadata.src_node_id)
            if question is None or src != int(question.metadata.dst_node_id):
                if not reply.has_error():
                    self.drop(src, phase, "answers no message sent to it")
                continue
            if reply.metadata.message_type != question.metadata.message_type:
                self.drop(src, phase, "reply of another message type")
                continue
            kept.append((src, reply))
        counts = Counter(node for node, _ in kept)
        for node in {n for n, c in counts.items() if c > 1}:
            self.drop(node, phase, "answered more than once; none of its replies is used")
        kept = [(node, reply) for node, reply in kept if counts[node] == 1]
        for node in {int(m.metadata.dst_node_id) for m in messages} - {n for n, _ in kept}:
            self.record(node, phase, f"no valid reply within {self.timeout:.0f}s")
        return kept


def collect_local_models(exchange: _Exchange, nodes: Iterable[int], global_arrays: ArrayRecord,
                         cfg: Config, validator: UpdateValidator, run_uid: str = ""
                         ) -> tuple[dict[str, ArrayRecord], dict[int, str]]:
    """Step 1: ask each node to fine-tune the global model; the valid local models by site,
    and by node why each other one has none (refused, declined, rejected, failed)."""
    config = fine_tune_config(cfg, run_uid).to_record()
    messages = [Message(RecordDict({ARRAYS: global_arrays, CONFIG: config}),
                        dst_node_id=node, message_type=CROSS_SITE_TRAIN) for node in nodes]
    local: dict[str, ArrayRecord] = {}
    missing: dict[int, str] = {}
    for node, reply in exchange.run("fine_tune", messages):
        if reply.has_error():
            missing[node] = describe_error(reply.error.code, reply.error.reason)
            continue
        site = exchange.site(node, reply)
        reason = validator.check_reply(reply, train=True, evaluation_expected=False)
        if reason:
            exchange.drop(node, "fine_tune", reason)
            missing[node] = f"rejected: {reason}"
        elif declined_reply(reply):
            missing[node] = "declined (privacy budget)"
        else:
            local[site] = reply.content[ARRAYS]
    return local, missing


def evaluate_everywhere(exchange: _Exchange, nodes: Iterable[int],
                        models: Mapping[str, ArrayRecord], cfg: Config,
                        specs: list[MetricSpec], validator: UpdateValidator, run_uid: str = ""
                        ) -> dict[str, dict[str, dict[str, float]]]:
    """Step 2: every node evaluates every model; ``{model: {site: metrics}}`` of the records
    that pass the checks of a round's evaluation (others are dropped, reason recorded)."""
    config = dataclasses.replace(RoundConfig.for_run(cfg, run_uid),
                                 server_round=cfg.rounds).to_record()
    content = {f"{MODEL_PREFIX}{name}": arrays for name, arrays in models.items()}
    messages = [Message(RecordDict({**content, CONFIG: config}), dst_node_id=node,
                        message_type=CROSS_SITE_EVALUATE) for node in nodes]
    matrix: dict[str, dict[str, dict[str, float]]] = {name: {} for name in models}
    for node, reply in exchange.run("cross_evaluate", messages):
        if reply.has_error():
            exchange.record(node, "cross_evaluate",
                            describe_error(reply.error.code, reply.error.reason))
            continue
        site = exchange.site(node, reply)
        extra = [k for k in reply.content if k != SITE and k not in content]
        if extra or reply.content.array_records:
            exchange.drop(node, "cross_evaluate", "unexpected records (a reply carries only "
                          "one metrics record per model sent)")
            continue
        limit = validator.max_examples.get(site)
        for key in content:
            name = key[len(MODEL_PREFIX):]
            record = reply.content.metric_records.get(key)
            if record is None:
                exchange.drop(node, "cross_evaluate", f"no metrics for model {name!r}")
                continue
            values = dict(record)
            reason = check_evaluation(values, specs, limit)
            if reason:
                exchange.drop(node, "cross_evaluate", f"model {name!r}: {reason}")
                continue
            matrix[name][site] = {("num_examples" if k == NUM_EXAMPLES else k): v
                                  for k, v in values.items()}
    return matrix


def run_cross_site(grid: Grid, cfg: Config, global_state: Mapping[str, torch.Tensor],
                   specs: list[MetricSpec], validator: UpdateValidator,
                   node_names: Mapping[int, str] | None = None, run_uid: str = ""
                   ) -> dict[str, Any]:
    """Both steps on the nodes online now; returns summary.json's ``cross_site`` entry.

    Args:
        grid: the run's grid (admitted nodes only in deployment).
        cfg: the run config (``cross_site``, the task config sent).
        global_state: the final global model (the weights the task shares).
        specs: the task's metrics (their ranges validate every value).
        validator: the run's update validator (the fine-tuned models' checks).
        node_names: node id -> registered site name (deployment).
        run_uid: the run's id (sites read the run's local weights by it).
    """
    exchange = _Exchange(grid, cfg.strategy.round_timeout, node_names or {})
    nodes = sorted(int(n) for n in grid.get_node_ids())
    global_arrays = to_arrays(dict(global_state))
    log.info("cross-site: %d sites fine-tune the global model for %d steps", len(nodes),
             cfg.cross_site.fine_tune_steps)
    local, missing = collect_local_models(exchange, nodes, global_arrays, cfg, validator,
                                          run_uid)
    models = {GLOBAL: global_arrays, **{site: local[site] for site in sorted(local)}}
    log.info("cross-site: %d sites evaluate %d models", len(nodes), len(models))
    matrix = evaluate_everywhere(exchange, nodes, models, cfg, specs, validator, run_uid)
    sites = sorted({site for row in matrix.values() for site in row})
    not_shared = {exchange.site(node): why for node, why in missing.items()}
    return summarise(matrix, sites, specs, fine_tune_steps=cfg.cross_site.fine_tune_steps,
                     not_shared=not_shared, dropped=exchange.dropped)


def add_to_summary(out_dir: Path, summary: dict[str, Any], cross_site: dict[str, Any]
                   ) -> dict[str, Any]:
    """``summary`` with ``cross_site`` added, rewritten to ``out_dir/summary.json``."""
    summary = {**summary, "cross_site": _clean(cross_site)}
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out_dir / "summary.json")
    return summary
