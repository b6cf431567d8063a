"""The exceptions the CLI, the API and the server turn into one message instead of a traceback."""


class RayIndexError(Exception):
    """A problem the user can fix: the message names the file/row/column/parameter and what to do.
    The CLI exits 1 with it."""


class UsageError(RayIndexError):
    """An option or argument that cannot work, found before any work starts. The CLI exits 2 with it
    (the code Click uses for usage errors)."""


def user_message(exc: BaseException) -> str:
    """The message to show: a RayIndexError raised inside a Ray task arrives wrapped in
    RayTaskError, whose str() carries the remote traceback; show the original message instead."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, RayIndexError):
        return str(cause)
    if isinstance(exc, RayIndexError):
        return str(exc).strip().splitlines()[-1] if "Traceback" in str(exc) else str(exc)
    return f"{type(exc).__name__}: {exc}"
