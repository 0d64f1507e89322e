"""The site's audit log: one JSON line per decision in ``<state_dir>/audit.log``.

Its own module so the guard (which imports the ClientApp) and the task policy (which the
ClientApp imports) can both write to it without an import cycle.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def audit(state_dir: str | None, event: str, *, echo: bool = True, **fields: object) -> None:
    """Append one decision to the site's audit log (JSON lines) and, with ``echo``, to
    stderr."""
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, **fields}
    line = json.dumps(record, sort_keys=True)
    if echo:
        print(f"fedscan-guard: {line}", file=sys.stderr, flush=True)
    if state_dir:
        path = Path(state_dir) / "audit.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
