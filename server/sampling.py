"""Which sites take part in a round: a fraction of them, drawn reproducibly from the seed.

Flower's strategies sample with ``fraction_train`` / ``fraction_evaluate`` and
``min_train_nodes`` / ``min_evaluate_nodes``: ``max(int(online x fraction), minimum)`` nodes,
drawn with the process-wide ``random`` module over node ids. Node ids are random per run
(a simulation registers new ones at every start), so that draw can be neither repeated with
the same seed nor continued after ``--resume``. :class:`SampledStrategy` keeps Flower's
formula and draws *site names* instead, with ``random.Random("<seed>/<round>/<phase>")``:
the same seed gives the same sites in every round, in a fresh run and after a resume, with no
generator state to checkpoint. The inner strategy then sees only the chosen nodes (and takes
all of them).

A node's site name is known from the operator's registry (deployment) or from a ``query``
message the node answers with its site name only (what every reply already carries); each
node is asked once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedscan.shared.config import StrategyConfig
from fedscan.shared.history import RunHistory
from fedscan.shared.messages import SITE, reply_site

log = logging.getLogger("fedscan.server")


def sample_size(online: int, fraction: float, min_sites: int | None) -> int:
    """Flower's sample size: ``int(online x fraction)``, at least ``min_sites`` (1 if unset),
    at most ``online``."""
    return min(online, max(int(online * fraction), min_sites or 1))


def choose_sites(names: Iterable[str], k: int, seed: int, server_round: int,
                 phase: str) -> list[str]:
    """``k`` of ``names``, the same for the same (seed, round, phase) whatever their order.

    Args:
        names: the sites online.
        k: how many to choose.
        seed: the run's seed.
        server_round: the round.
        phase: ``train`` or ``evaluate`` (independent draws).

    Returns:
        The chosen names, sorted.
    """
    pool = sorted(set(names))
    # A str seed is hashed with SHA-512 by ``random``: the same in every process.
    rng = random.Random(f"{seed}/{server_round}/{phase}")
    return sorted(rng.sample(pool, min(k, len(pool))))


class _SubsetGrid:
    """A grid that lists only the chosen nodes (the inner strategy takes all it sees)."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid = grid
        self._nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class SampledStrategy(Strategy):
    """Delegates to ``inner`` (built to take every node it sees) on the sites sampled for
    each round (see the module docstring).

    The sites drawn to train are recorded as the round's ``sampled`` list in summary.json.

    Attributes:
        names: node id -> site name, from the registry and the nodes' query replies.
    """

    def __init__(self, inner: Strategy, cfg: StrategyConfig, seed: int, history: RunHistory,
                 node_names: dict[int, str] | None = None, timeout: float = 60.0) -> None:
        self.inner = inner
        self.cfg = cfg
        self.seed = seed
        self.history = history
        self.timeout = timeout
        self.names: dict[int, str] = dict(node_names or {})

    def identify(self, grid: Grid) -> None:
        """Learn the site name of every node not known yet (see :func:`learn_site_names`)."""
        learn_site_names(grid, self.names, self.timeout)

    def _nodes(self, server_round: int, grid: Grid, phase: str, fraction: float) -> list[int]:
        online = list(grid.get_node_ids())
        wanted = self.cfg.min_sites or 1
        deadline = time.monotonic() + self.timeout
        while len(online) < wanted and time.monotonic() < deadline:
            time.sleep(1.0)  # as Flower's sample_nodes: wait for the minimum to connect
            online = list(grid.get_node_ids())
        self.identify(grid)
        by_name = {self.names[n]: n for n in online if n in self.names}
        if not by_name:
            raise RuntimeError(f"round {server_round}: no online node told its site name")
        k = sample_size(len(by_name), fraction, self.cfg.min_sites)
        sites = choose_sites(by_name, k, self.seed, server_round, phase)
        if phase == "train":
            self.history.record_round_fact(server_round, "sampled", sites)
        log.info("round %d: %s sampled %d of %d sites", server_round, phase, len(sites),
                 len(by_name))
        return [by_name[s] for s in sites]

    def configure_train(self, server_round: int, arrays: Any, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        nodes = self._nodes(server_round, grid, "train", self.cfg.fraction_train)
        return self.inner.configure_train(server_round, arrays, config,
                                          _SubsetGrid(grid, nodes))

    def configure_evaluate(self, server_round: int, arrays: Any, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        nodes = self._nodes(server_round, grid, "evaluate", self.cfg.fraction_evaluate)
        return self.inner.configure_evaluate(server_round, arrays, config,
                                             _SubsetGrid(grid, nodes))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[Any, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()


def learn_site_names(grid: Grid, names: dict[int, str], timeout: float) -> None:
    """Ask every online node missing from ``names`` (node id -> site) for its site name, in
    a ``query`` message, and add the answers to ``names``; each node is asked once."""
    unknown = [n for n in grid.get_node_ids() if n not in names]
    if not unknown:
        return
    messages = [Message(RecordDict({"config": ConfigRecord({"ask": "site"})}),
                        dst_node_id=node, message_type=MessageType.QUERY)
                for node in unknown]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    # Pushing sets each message's id; a reply names the message it answers.
    asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    for reply in replies:
        node = asked.get(reply.metadata.reply_to_message_id)
        if node is None or reply.has_error() or SITE not in reply.content.config_records:
            continue
        name = reply_site(reply)
        if name in names.values():  # two nodes, one name: neither is sampled
            log.warning("node %s answers as %r, the name of another node", node, name)
            continue
        names[node] = name


def sampling_on(cfg: StrategyConfig) -> bool:
    """Whether rounds sample sites (a fraction below 1) rather than take every site."""
    return cfg.fraction_train < 1.0 or cfg.fraction_evaluate < 1.0
