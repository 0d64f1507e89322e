"""The site's own log (``STATE_DIR/site.log``): what the ClientApp did, never sent anywhere.

Progress lines (steps, ε spent, policy clamps) and failures in full go here. A deployed
hospital also sees progress on its console; in a simulation the researcher's console shows the
federation's one progress display instead, and the sites' lines only with ``--verbose``
(``FEDSCAN_VERBOSE``), so ``echo`` is decided by whoever builds the ClientApp.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from fedscan.shared.config import SiteConfig
from fedscan.shared.console import verbose

#: File in the site's state folder with the site's log (never sent).
SITE_LOG = "site.log"


def site_log_path(site: SiteConfig) -> Path | None:
    """``STATE_DIR/site.log``, or None when the site has no state folder."""
    return Path(site.state_dir) / SITE_LOG if site.state_dir else None


def say(site: SiteConfig, line: str, echo: bool = True) -> None:
    """Append ``line`` (timestamped) to the site's log and print it when ``echo`` or verbose.

    A log that cannot be written never stops training (the console still has the line).
    """
    path = site_log_path(site)
    if path is not None:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {line}\n")
    if echo or verbose() or path is None:
        print(line, flush=True)
