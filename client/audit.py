"""The site's audit log: one JSON line per decision in ``<state_dir>/audit.log``.

Its own module so the guard (which imports the ClientApp) and the task policy (which the
ClientApp imports) can both write to it without an import cycle.
"""

from __future__ import annotations

from pathlib import Path

from fedscan.shared import fab_policy


def audit(state_dir: str | Path | None, event: str, *, echo: bool = True,
          **fields: object) -> None:
    """Append one decision to the site's audit log (``<state_dir>/audit.log``, JSON lines)
    and, with ``echo``, to stderr; without a state folder, to stderr only."""
    fab_policy.audit(Path(state_dir) / "audit.log" if state_dir else None, event,
                     "fedscan-guard", echo=echo, **fields)
