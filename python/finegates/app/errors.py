"""``UsageError``: a problem with the user's input (arguments, files, network), reported by the
command line as one ``finegates: error: ...`` line instead of a traceback."""

__all__ = ["UsageError"]


class UsageError(Exception):
    """Bad input the user can fix; the message says what to do."""
