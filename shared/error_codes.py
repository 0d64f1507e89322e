"""The error codes a hospital sends instead of error text, and how the server records them.

A failing site replies with one of :data:`SITE_ERRORS`' codes as the error's reason and
nothing else: no exception text, which would carry file paths, case ids and label values
(fedscan's own messages name the file at fault). The full error stays in the site's log
(``client/error_replies.py``). The server records the code with its fixed description, and
for errors that Flower's infrastructure creates (node unavailable, ClientApp crashed) a fixed
text per Flower code, so summary.json never holds text that a site chose.
"""

from __future__ import annotations

from flwr.common.constant import ErrorCode

#: Code -> what it tells the operator. The site's log has the details.
SITE_ERRORS: dict[str, str] = {
    "data-error": "the site's data does not meet the task's data contract or could not be read",
    "config-error": "the task config is not valid at this site",
    "schema-mismatch": "the site runs a fedscan whose message schema differs from the "
                       "server's (install the consortium's fedscan version)",
    "policy-refused": "the task config is outside the site's policy",
    "budget-error": "the site's privacy ledger or budget does not allow training",
    "task-error": "the site cannot run the task as sent (e.g. the model does not match it)",
    "internal-error": "the site's ClientApp failed",
}

#: Flower's own error codes (set by the SuperLink, the SuperNode or Flower's ClientApp
#: runner, never with fedscan text) -> the text recorded for them.
FLOWER_ERRORS: dict[int, str] = {
    ErrorCode.LOAD_CLIENT_APP_EXCEPTION: "load-refused: the site did not load the ClientApp "
                                         "(refused by its guard, or failed to import it)",
    ErrorCode.MESSAGE_UNAVAILABLE: "unavailable: the message expired or was not delivered",
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "unavailable: the site's reply was lost or expired",
    ErrorCode.NODE_UNAVAILABLE: "unavailable: the site went offline",
    ErrorCode.CLIENT_APP_CRASHED: "crashed: the site's ClientApp stopped responding",
    ErrorCode.MOD_FAILED_PRECONDITION: "mod-refused: a ClientApp mod refused the message",
}

#: What the server records for an error reply whose reason is not a fedscan code.
UNRECOGNISED = "unrecognised: not a fedscan error code (the site's text is not recorded)"


def describe_error(code: int, reason: str | None) -> str:
    """The text the server records for an error reply: ``<code>: <description>``.

    Args:
        code: the reply's Flower error code (``Message.error.code``).
        reason: the reply's reason; only a known fedscan code is kept.

    Returns:
        A fixed text; never any of ``reason`` beyond a known code.
    """
    if reason in SITE_ERRORS:
        return f"{reason}: {SITE_ERRORS[reason]}"
    return FLOWER_ERRORS.get(code, UNRECOGNISED)
