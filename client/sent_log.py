"""What this site sent: one JSON line per reply in ``STATE_DIR/sent.log`` (never sent itself).

A hospital must be able to say what left it. The ClientApp mod made here wraps every handler
(outside the error mod, so error replies are logged too) and records, for each reply as it
is handed to Flower: when, the run and round, the phase, its size on the wire (the same count
the server uses: the serialized Flower objects), how many weight tensors it carried, and the
names and values of every metric and config record in it — exactly what the server received.
``fedscan client status`` reads it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedscan.shared.config import SiteConfig
from fedscan.shared.messages import CONFIG, SERVER_ROUND, message_bytes

#: File in the site's state folder listing every reply the site sent.
SENT_LOG = "sent.log"

Mod = Callable[[Message, Context, ClientAppCallable], Message]


def _round(msg: Message) -> int | None:
    with contextlib.suppress(Exception):
        return int(msg.content.config_records[CONFIG][SERVER_ROUND])
    return None


def _plain(value: Any) -> Any:
    """A record value as JSON (lists stay lists; bytes are shown by size only)."""
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def sent_entry(msg: Message, reply: Message) -> dict[str, Any]:
    """The sent.log line for ``reply`` (the answer to ``msg``)."""
    entry: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "unix": round(time.time(), 3),
        "run_id": int(msg.metadata.run_id),
        "round": _round(msg),
        "phase": str(msg.metadata.message_type),
        "bytes": message_bytes(reply),
    }
    if reply.has_error():
        entry["error"] = str(reply.error.reason)
        return entry
    content = reply.content
    entry["arrays"] = {name: len(record) for name, record in content.array_records.items()}
    records = {**content.metric_records, **content.config_records}
    entry["records"] = {name: {k: _plain(v) for k, v in sorted(record.items())}
                        for name, record in sorted(records.items())}
    return entry


def append_sent(state_dir: str | Path, entry: dict[str, Any]) -> None:
    path = Path(state_dir) / SENT_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True, default=str) + "\n")


def make_sent_log_mod(resolve_site: Callable[[Context], SiteConfig]) -> Mod:
    """The ClientApp mod that records every reply in the site's ``sent.log``.

    Recording never changes or stops a reply: if the log cannot be written, the reply goes
    as it is (the server's copy of the same facts is summary.json's ``bytes``).
    """

    def sent_log_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        with contextlib.suppress(Exception):
            site = resolve_site(context)
            if site.state_dir:
                append_sent(site.state_dir, sent_entry(msg, reply))
        return reply

    return sent_log_mod
