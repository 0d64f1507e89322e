"""A Flower Grid that reports what crosses it to the run's live status (``shared/live.py``).

Wrapping the grid instead of adding calls inside the round loop keeps the loop as it is: every
round sends its messages through ``send_and_receive``, so that is where a round starts, where
each reply arrives and where the hold file is honoured (before the first train message of a
round). Replies are pulled the way Flower's own ``send_and_receive`` pulls them (push, then
pull at the grid's interval until all replied or the timeout), but each one is reported as it
arrives rather than when the last site has answered.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.app import Message, MessageType

from fedscan.shared.config import Config
from fedscan.shared.live import LiveStatus
from fedscan.shared.messages import reply_site

#: Seconds between looks at the hold file while the run is held.
HOLD_POLL_SECONDS = 0.5
#: Seconds between asking the SuperLink which nodes are online while a round is in flight.
ONLINE_POLL_SECONDS = 5.0
#: Pull interval when the grid names none (Flower's gRPC grid sleeps 3 s between pulls).
DEFAULT_PULL_SECONDS = 3.0


def _round_of(msg: Message) -> int:
    """The server round a message belongs to (Flower's strategies put it in the config)."""
    config = msg.content.config_records.get("config")
    if config is not None and "server-round" in config:
        return int(config["server-round"])
    return int(msg.metadata.group_id or 0)


class LiveGrid:
    """Delegates to ``grid``; reports sends, replies and online nodes to ``live``.

    Args:
        grid: the grid Flower handed the ServerApp.
        live: the run's live status.
        node_names: node id -> site name of admitted keys (deployment), if known.
    """

    def __init__(self, grid: Any, live: LiveStatus,
                 node_names: dict[int, str] | None = None) -> None:
        self._grid = grid
        self._live = live
        self._names: dict[int, str] = dict(node_names or {})
        self._last_online = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    @property
    def live(self) -> LiveStatus:
        """The run's live status (its listeners follow every send and reply)."""
        return self._live

    def get_node_ids(self) -> Iterable[int]:
        ids = list(self._grid.get_node_ids())
        self._live.online(ids)
        self._last_online = time.monotonic()
        return ids

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        if messages[0].metadata.message_type == MessageType.QUERY:
            # Site names and the data check before round 1: no round's phase on the page.
            return self._grid.send_and_receive(messages, timeout=timeout)
        rnd = _round_of(messages[0])
        train = messages[0].metadata.message_type == MessageType.TRAIN
        if train:
            while self._live.held():
                self._live.flush()  # heartbeat: held, not dead
                time.sleep(HOLD_POLL_SECONDS)
        nodes = [m.metadata.dst_node_id for m in messages]
        self._live.exchange_started(rnd, "train" if train else "final_evaluate",
                                    {n: self._names.get(n) for n in nodes})
        if not hasattr(self._grid, "push_messages"):  # a minimal grid: no replies one by one
            replies = list(self._grid.send_and_receive(messages, timeout=timeout))
            for reply in replies:
                self._note(reply, {m.metadata.message_id: m.metadata.dst_node_id
                                   for m in messages})
            return replies
        return self._push_and_pull(messages, timeout)

    def _push_and_pull(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """Flower's push-then-pull loop, reporting each reply as it arrives."""
        pending = set(self._grid.push_messages(messages))
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        del messages
        interval = float(getattr(self._grid, "pull_interval", DEFAULT_PULL_SECONDS))
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end:
            pulled = list(self._grid.pull_messages(pending))
            for reply in pulled:
                self._note(reply, node_of)
            replies.extend(pulled)
            pending.difference_update(r.metadata.reply_to_message_id for r in pulled)
            if not pending:
                break
            if time.monotonic() - self._last_online >= ONLINE_POLL_SECONDS:
                self.get_node_ids()
            self._live.flush()
            time.sleep(interval)
        return replies

    def _note(self, reply: Message, node_of: dict[str, int]) -> None:
        node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if reply.has_error():
            self._live.replied(node, self._names.get(node), error=str(reply.error.reason)[:300])
            return
        # The key's admitted name wins over what a reply declares (as in the round loop).
        site = self._names.get(node) or reply_site(reply)
        self._names.setdefault(node, site)
        self._live.replied(node, site)


@contextmanager
def live_run(grid: Any, cfg: Config, out_dir: str | Path,
             node_names: dict[int, str] | None = None) -> Iterator[LiveGrid]:
    """A :class:`LiveGrid` over ``grid`` for one run; marks the run finished or failed.

    Args:
        grid: the grid Flower handed the ServerApp.
        cfg: the run config (rounds, site names).
        out_dir: the run folder (live.json is written there).
        node_names: node id -> site name of admitted keys, if known.
    """
    live = LiveStatus(out_dir, cfg.rounds, [s.name for s in cfg.sites])
    live.write()
    try:
        yield LiveGrid(grid, live, node_names)
    except BaseException as exc:
        live.finished(ok=False, reason=f"{type(exc).__name__}: {exc}"[:300])
        raise
    live.finished(ok=True)
