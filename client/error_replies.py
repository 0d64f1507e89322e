"""A failing hospital tells the server an error code, never the error.

fedscan's errors name the file at fault, and MONAI's, nibabel's and torch's carry paths,
shapes and values; Flower would send the text of any exception a ClientApp raises to the
server (``str(type(ex)) + str(ex)``), and from there into summary.json. The ClientApp mod
made here (``ClientApp(mods=[...])``, around every handler) catches every exception, writes
the full error with its traceback to the site's own log (``STATE_DIR/site.log``) and one line
to the site's console, and replies with a generic code from
:data:`fedscan.shared.error_codes.SITE_ERRORS` only.
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from fedscan.client.privacy import PrivacyError
from fedscan.client.task_policy import PolicyRefused
from fedscan.shared.config import SiteConfig
from fedscan.shared.error_codes import SITE_ERRORS
from fedscan.shared.errors import ConfigError, DataError, FedscanError
from fedscan.shared.messages import SchemaMismatch

#: File in the site's state folder that keeps every failure in full (never sent).
SITE_LOG = "site.log"

#: Exception class -> code, most specific first; anything else is ``internal-error``.
ERROR_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (SchemaMismatch, "schema-mismatch"),
    (PolicyRefused, "policy-refused"),
    (PrivacyError, "budget-error"),
    (DataError, "data-error"),
    (ConfigError, "config-error"),
    (FedscanError, "task-error"),
)
INTERNAL_ERROR = "internal-error"

Mod = Callable[[Message, Context, ClientAppCallable], Message]


def error_code(exc: BaseException) -> str:
    """The code a site sends for ``exc`` (a key of ``SITE_ERRORS``)."""
    for cls, code in ERROR_CODES:
        if isinstance(exc, cls):
            return code
    return INTERNAL_ERROR


def error_reply(msg: Message, code: str) -> Message:
    """The reply to ``msg`` that says only ``code``."""
    if code not in SITE_ERRORS:
        raise ValueError(f"not a site error code: {code!r}")
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=code), reply_to=msg)


def _where(msg: Message) -> str:
    """``round N train`` for the log; never fails."""
    try:
        rnd = msg.content.config_records["config"].get("server-round", "?")
    except Exception:  # a malformed message: its failure still gets logged
        rnd = "?"
    return f"round {rnd} {msg.metadata.message_type}"


def log_failure(exc: BaseException, code: str, msg: Message, site: SiteConfig | None,
                resolve_error: BaseException | None = None) -> Path | None:
    """Write the full error to ``STATE_DIR/site.log`` and one line to stderr.

    Returns:
        The log file, or None when the site has no state folder (the console has it then).
    """
    name = site.name if site is not None else "?"
    where = _where(msg)
    text = "".join(traceback.format_exception(exc)).rstrip()
    if resolve_error is not None:
        text += f"\n(the site config could not be read either: {resolve_error!r})"
    log_path = None
    if site is not None and site.state_dir:
        try:
            log_path = Path(site.state_dir) / SITE_LOG
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} site {name}: {where} failed, "
                        f"sent {code}\n{text}\n\n")
        except OSError:
            log_path = None
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    detail = f"see {log_path}" if log_path else "traceback:\n" + text
    print(f"fedscan: site {name}: {where} failed ({code} sent to the server): "
          f"{type(exc).__name__}: {first}; {detail}", file=sys.stderr, flush=True)
    return log_path


def make_error_mod(resolve_site: Callable[[Context], SiteConfig]) -> Mod:
    """The ClientApp mod that turns every exception of a handler into a generic error reply.

    Args:
        resolve_site: how the ClientApp finds its site (for the site's log folder).
    """

    def error_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        try:
            return call_next(msg, context)
        except Exception as exc:  # every failure: the server learns the code only
            code = error_code(exc)
            site, resolve_error = None, None
            try:
                site = resolve_site(context)
            except Exception as again:  # e.g. the site config itself is the problem
                resolve_error = again
            # Logging must never turn into a leak or a crash.
            with contextlib.suppress(Exception):
                log_failure(exc, code, msg, site, resolve_error)
            return error_reply(msg, code)

    return error_mod
