"""The exceptions the CLI, the API and the server turn into one message instead of a traceback, and
the redaction every message and log line goes through."""

import re

# user:password@ in URLs, and key=value pairs whose key says secret (query strings, presigned URLs, headers)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/\s:@]*):(?P<secret>[^/\s@]+)@")
_SECRET_PARAMS = re.compile(
    r"(?i)(?P<key>[\w-]*(?:password|passwd|secret|token|api[_-]?key|signature|credential)[\w-]*)"
    r"(?P<sep>\s*[=:]\s*)(?P<value>[^&\s,;'\"]+)"
)


class RayIndexError(Exception):
    """A problem the user can fix: the message names the file/row/column/parameter and what to do.
    The CLI exits 1 with it."""


class DamagedIndex(RayIndexError):
    """A version's files disagree with each other or with their checksums: its data, not the request, is at
    fault. A server keeps serving the version it had and reports this one as degraded."""


class Unavailable(RayIndexError):
    """A part of the service did not answer in time (a serving shard, the store): the request may succeed
    when retried. A server answers 503 with Retry-After."""


class UsageError(RayIndexError):
    """An option or argument that cannot work, found before any work starts. The CLI exits 2 with it
    (the code Click uses for usage errors)."""


def redact(text: str) -> str:
    """text with credentials replaced by ***: URL passwords (http://user:***@host) and the values of
    parameters named like secrets (token=***, X-Amz-Signature=***)."""
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _SECRET_PARAMS.sub(lambda m: f"{m['key']}{m['sep']}***", text)


def user_message(exc: BaseException) -> str:
    """The message to show, redacted: a RayIndexError raised inside a Ray task arrives wrapped in
    RayTaskError, whose str() carries the remote traceback; show the original message instead."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, RayIndexError):
        return redact(str(cause))
    if isinstance(exc, RayIndexError):
        return redact(str(exc).strip().splitlines()[-1] if "Traceback" in str(exc) else str(exc))
    return redact(f"{type(exc).__name__}: {exc}")
