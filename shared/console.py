"""What reaches the console: each line once, no DEBUG or deprecation noise unless asked.

Two libraries make a default run noisy. Opacus calls ``logging.basicConfig`` when it is
imported (``opacus/utils/module_utils.py``), which gives the root logger a handler; Flower's
logger has its own console handler *and* propagates to the root, so every Flower line is
printed twice, and the root copy includes Flower's DEBUG lines. And Flower warns on every run
that ``run_simulation`` is deprecated (it is the documented way to simulate in-process).

:func:`configure_console` fixes both in the process that calls it: Flower's lines go through
Flower's own handler only, at WARNING without deprecation notices by default; fedscan's own
loggers print warnings as ``fedscan: ...`` once. Verbose (``--verbose``, or
``FEDSCAN_VERBOSE=1`` in the environment, which a simulation's Ray workers inherit) brings back
Flower's INFO and DEBUG lines, its deprecation notices and the sites' step lines.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

#: Environment variable that turns verbose output on (set by ``--verbose``).
VERBOSE_ENV = "FEDSCAN_VERBOSE"

_configured: bool | None = None  # the verbosity last applied in this process


def verbose() -> bool:
    """Whether verbose output was asked for (``FEDSCAN_VERBOSE`` set to 1/true/yes)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


def set_verbose(on: bool) -> None:
    """Ask for verbose output in this process and the processes it starts from now on."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is logged (it may be replaced)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


class _NoLibraryNotices(logging.Filter):
    """Drops Flower's notices about itself, not the user's run: "DEPRECATED FEATURE" (its API)
    and "Manually terminating ClientAppActor" (a simulation ending its Ray actors on purpose,
    printed or not depending on which process wins the race at shutdown)."""

    NOTICES = ("DEPRECATED FEATURE", "Manually terminating")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(notice in str(record.msg) for notice in self.NOTICES)


_NOTICE_FILTER = _NoLibraryNotices()


def configure_console(on: bool | None = None, force: bool = False) -> None:
    """Make this process's console quiet (or verbose); cheap to call again.

    Args:
        on: verbose or not; None reads :func:`verbose`.
        force: apply again even if already applied (a library imported since put its own
            warning filters in front of ours, e.g. SQLAlchemy under MLflow).
    """
    global _configured
    on = verbose() if on is None else on
    if _configured is on and not force:
        return
    _configured = on
    from flwr.common.logger import FLOWER_LOGGER, console_handler, update_console_handler

    # Flower's own handler prints each Flower line; the root's copy would print it again.
    FLOWER_LOGGER.propagate = False
    if on:
        update_console_handler(level=logging.DEBUG, timestamps=True, colored=True)
        console_handler.removeFilter(_NOTICE_FILTER)
    else:
        update_console_handler(level=logging.WARNING, timestamps=False, colored=True)
        console_handler.addFilter(_NOTICE_FILTER)
    fedscan = logging.getLogger("fedscan")
    if not any(isinstance(h, _StderrHandler) for h in fedscan.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("fedscan: %(message)s"))
        fedscan.addHandler(handler)
    fedscan.propagate = False
    fedscan.setLevel(logging.DEBUG if on else logging.WARNING)
    action = "default" if on else "ignore"
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings(action, category=category)


def silence_libraries() -> None:
    """Stop Flower's and Ray's log lines from here on (after Ctrl-C).

    Ctrl-C reaches the Ray workers too (same process group), so Flower's simulation threads log
    each dying actor with a traceback while fedscan is already stopping on purpose.
    """
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
