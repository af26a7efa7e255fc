"""The one error type a user's mistake raises; only `edgetune.cli` catches it."""


class EdgetuneError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""
