"""What a federated run is doing right now: ``RUN_DIR/live.json``, read by the status page.

``summary.json`` is rewritten only when a round ends. The status page also needs what happens
inside a round: the round in flight and since when, which sites were sent work and which have
replied or failed, which are online, when each was last heard from, and how long rounds take
(for an ETA). The server side (``server/live_grid.py``) reports those events here; this module
keeps them in one dict and writes it atomically, at most once every ``min_interval`` seconds
except at round boundaries, so the file costs the run nothing measurable.

A file named ``hold`` in the run folder holds the federation before its next round (the round
in flight finishes); deleting it lets the run go on. The status page shows the hold.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: The live-state file in a run folder.
LIVE_FILE = "live.json"
#: While this file exists in the run folder, no new round starts.
HOLD_FILE = "hold"
#: The writer rewrites live.json at least this often while a run is going (a heartbeat), so
#: a reader can tell a quiet round from a server that died.
HEARTBEAT_SECONDS = 15.0


class LiveStatus:
    """The live state of one federated run, written to ``run_dir/live.json``.

    Args:
        run_dir: the run folder.
        rounds_total: rounds the run is configured for.
        sites: site names from the config, in config order.
        min_interval: fewest seconds between two writes of events inside a round.
    """

    def __init__(self, run_dir: str | Path, rounds_total: int, sites: Iterable[str],
                 min_interval: float = 1.0) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / LIVE_FILE
        self.min_interval = min_interval
        now = time.time()
        self.state: dict[str, Any] = {
            "version": 1,
            "state": "starting",  # starting | running | held | finished | failed
            "started": now,
            "updated": now,
            "rounds_total": int(rounds_total),
            "sites": list(sites),
            "round": None,  # round in flight (or last started)
            "phase": None,  # train | final_evaluate
            "round_started": None,
            "round_durations": {},  # round -> seconds from its first message to its end
            "nodes": {},  # node id -> site, online, status this round, sent, last_contact
            "reason": None,  # why a run failed
        }
        #: Seconds spent writing live.json (the writer's whole cost to the run).
        self.write_seconds = 0.0
        self._last_write = 0.0
        self._dirty = False

    # -- events -------------------------------------------------------------------------------

    def held(self) -> bool:
        """Whether the operator holds the run (``hold`` exists); shows it on the page."""
        holding = (self.run_dir / HOLD_FILE).exists()
        if holding and self.state["state"] != "held":
            self._close_round(time.time())  # the hold is no part of the round before it
            self.state["state"] = "held"
            self.write()
        return holding

    def exchange_started(self, rnd: int, phase: str, nodes: Mapping[int, str | None]) -> None:
        """Messages of ``phase`` in round ``rnd`` are being sent to ``nodes`` (id -> site).

        A round ends where the next one (or the final evaluation) starts, so a round's
        duration covers its aggregation and checkpoint too: the pace an ETA needs.
        """
        now = time.time()
        previous = self.state["round"]
        if previous is not None and (previous != rnd or phase != "train"):
            self._close_round(now)
        if phase == "train" and previous != rnd:
            self.state["round_started"] = now
        self.state.update(state="running", round=rnd, phase=phase)
        for entry in self.state["nodes"].values():
            entry["status"] = None
        for node, site in nodes.items():
            entry = self._node(node, site)
            entry.update(status="waiting", sent=now)
        self.write()

    def replied(self, node: int, site: str | None, error: str | None = None) -> None:
        """A reply from ``node`` arrived (an error reply when ``error`` is set)."""
        entry = self._node(node, site)
        entry.update(status="error" if error else "replied", last_contact=time.time(),
                     error=error)
        self._changed()

    def online(self, node_ids: Iterable[int]) -> None:
        """The nodes the SuperLink reports as connected now."""
        ids = {int(n) for n in node_ids}
        for node in ids:
            self._node(node, None)
        for node, entry in self.state["nodes"].items():
            if entry["online"] != (int(node) in ids):
                entry["online"] = int(node) in ids
                self._dirty = True
        self.state["online_checked"] = time.time()
        self.flush()

    def finished(self, ok: bool, reason: str | None = None) -> None:
        """The run ended, completed (``ok``) or not."""
        self.state.update(state="finished" if ok else "failed", reason=reason, phase=None)
        for entry in self.state["nodes"].values():
            entry["status"] = None
        self.write()

    def _close_round(self, now: float) -> None:
        """Record the duration of the round last started, once."""
        rnd, started = self.state["round"], self.state["round_started"]
        if rnd is not None and started is not None:
            self.state["round_durations"].setdefault(str(rnd), round(now - started, 3))

    # -- writing ------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write pending changes once ``min_interval`` has passed, and a heartbeat anyway."""
        since = time.time() - self._last_write
        if (self._dirty and since >= self.min_interval) or since >= HEARTBEAT_SECONDS:
            self.write()

    def write(self) -> None:
        """Write live.json now (atomically: a reader sees the old or the new file)."""
        started = time.perf_counter()
        self.state["updated"] = time.time()
        tmp = self.path.with_name(LIVE_FILE + ".tmp")
        try:
            tmp.write_text(json.dumps(self.state))
            tmp.replace(self.path)
        except OSError:
            pass  # a full disk must not end a federation over its status page
        self._dirty = False
        self._last_write = time.time()
        self.write_seconds += time.perf_counter() - started

    def _changed(self) -> None:
        self._dirty = True
        self.flush()

    def _node(self, node: int, site: str | None) -> dict[str, Any]:
        entry = self.state["nodes"].setdefault(str(int(node)), {
            "site": None, "online": None, "status": None, "sent": None,
            "last_contact": None, "error": None})
        if site:
            entry["site"] = site
        return entry


def read_live(run_dir: str | Path) -> dict[str, Any]:
    """The run folder's live.json, or an empty dict when there is none (or it is unreadable)."""
    try:
        data = json.loads((Path(run_dir) / LIVE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
