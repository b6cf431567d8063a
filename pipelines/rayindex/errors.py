"""The exceptions the CLI, the API and the server turn into one message instead of a traceback, and
the redaction every message and log line goes through."""

import re

# user:password@ in URLs, and key=value pairs whose key says secret (query strings, presigned URLs, headers).
# Both patterns are linear in the text's length: a match may only start where a scheme or a key starts (the
# lookbehinds), and a key is tried only when its own word holds a secret word (the lookahead stops at the end
# of the word). The earlier `[\w-]*(?:password|...)[\w-]*` was tried from every position of a long word and
# backtracked across it: quadratic, 4 s for an 8,000-character filter column name, and one request froze a
# replica's event loop for 114 s with 100,000 characters (tests/test_hardening.py).
_URL_CREDENTIALS = re.compile(
    r"(?<![a-zA-Z0-9+.-])(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/\s:@]*):(?P<secret>[^/\s@]+)@"
)
_SECRET_PARAMS = re.compile(
    r"(?i)(?<![\w-])(?P<key>(?=[\w-]*?(?:password|passwd|secret|token|api[_-]?key|signature|credential))[\w-]+)"
    r"(?P<sep>\s*[=:]\s*)(?P<value>[^&\s,;'\"]+)"
)
# characters of a user's string (a filter's column name or value, a query) quoted in a message: enough to
# recognise it, bounded so a message costs nothing whatever a request holds
QUOTED_CHARS = 80
# modules rayindex imports but does not require (pyproject.toml): what to install when one is missing
INSTALL_HINTS = {
    "faiss": "install one FAISS build: pip install 'rayindex[cpu]', or 'rayindex[gpu]' on CUDA machines "
    "(docs/operations.md, 'One CUDA pairing')",
    "torch": "install torch first: pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu "
    "(CUDA machines: docs/operations.md, 'One CUDA pairing')",
    "mcp": "install the MCP SDK: pip install 'rayindex[mcp]' (docs/mcp.md)",
    "langchain_core": "the LangChain integration needs it: pip install 'rayindex[langchain]' (docs/integrations.md)",
    "llama_index": "the LlamaIndex integration needs it: pip install 'rayindex[llama-index]' (docs/integrations.md)",
}


class RayIndexError(Exception):
    """A problem the user can fix: the message names the file/row/column/parameter and what to do.
    The CLI exits 1 with it."""


class DamagedIndex(RayIndexError):
    """A version's files disagree with each other or with their checksums: its data, not the request, is at
    fault. A server keeps serving the version it had and reports this one as degraded."""


class NotFound(RayIndexError):
    """What was asked for by name or id is not there (a document id no document has)."""


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


def quoted(value: object) -> str:
    """A user's value as a message quotes it: repr, at most QUOTED_CHARS characters of it (and how long it was)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= QUOTED_CHARS:
        return repr(text)
    return f"{text[:QUOTED_CHARS]!r}... ({len(text):,} characters)"


def install_hint(exc: BaseException) -> str | None:
    """What to install for a missing module rayindex does not require (INSTALL_HINTS), else None."""
    if not isinstance(exc, ImportError) or not exc.name:
        return None
    return INSTALL_HINTS.get(exc.name.split(".")[0])


def user_message(exc: BaseException) -> str:
    """The message to show, redacted: a RayIndexError raised inside a Ray task arrives wrapped in
    RayTaskError, whose str() carries the remote traceback; show the original message instead."""
    cause = getattr(exc, "cause", None)
    missing = next((e for e in (cause, exc) if isinstance(e, ModuleNotFoundError) and install_hint(e)), None)
    if missing is not None:  # on this machine or on the node that ran the task
        return f"{missing}: {install_hint(missing)}"
    if isinstance(cause, RayIndexError):
        return redact(str(cause))
    if isinstance(exc, RayIndexError):
        return redact(str(exc).strip().splitlines()[-1] if "Traceback" in str(exc) else str(exc))
    return redact(f"{type(exc).__name__}: {exc}")
