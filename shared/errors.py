"""User-facing errors: one line, naming the file or config key at fault."""


class FedscanError(Exception):
    """A problem with the user's input (file, folder or config key).

    The CLI prints ``fedscan: error: <message>`` on one line and exits non-zero, without a
    traceback. Raise it with a message that names the offending file or key path.
    """


class DataError(FedscanError):
    """A dataset folder, dataset.json or NIfTI file violates the data contract."""


class ConfigError(FedscanError):
    """A YAML config key is unknown, missing or has the wrong type or value."""


def root_cause(exc: BaseException) -> BaseException:
    """The innermost ``__cause__`` of a chain (MONAI wraps reader errors several times)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc
