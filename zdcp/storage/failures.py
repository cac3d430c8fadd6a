"""What a failed storage request means: a request the storage refused or failed (no access, no
such bucket, unreachable, a full disk, an outage that outlasted the retries) is a
:class:`~zdcp.StorageError`, naming the file or URL, what was done, and for a request that kept
failing, how often and with what answer (:func:`failure_message`); bad or missing data read
from a checkpoint (a checksum mismatch, a missing or truncated chunk) is a
:class:`~zdcp.CorruptCheckpointError`, naming the array."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import CorruptCheckpointError, StorageError, ZdcpError
from .retries import BUDGET_VARIABLE, budget_text

__all__ = ["reading", "storage_access", "failure_message", "short_message"]


@contextmanager
def reading(array: str, url: str) -> Iterator[None]:
    """Turn tensorstore's error for bad or missing data (a ``ValueError``: checksum mismatch,
    missing or truncated chunk) into a :class:`~zdcp.CorruptCheckpointError` naming the array;
    a refused or failed request is a :class:`~zdcp.StorageError` instead."""
    try:
        with storage_access(url, f"reading array {array!r}"):
            yield
    except ValueError as e:
        raise CorruptCheckpointError(f"array {array!r}: {e}") from None


@contextmanager
def storage_access(url: str, doing: str | None = None) -> Iterator[None]:
    """Turn a request the storage refused or failed into a :class:`~zdcp.StorageError` naming
    the file or ``url`` and what was being done (``doing``): an ``OSError`` of a local file (no
    space, no access, a name too long), or tensorstore's error for one (no such bucket, bad
    credentials, no access, unreachable, failing until the retries ran out). Other errors,
    zdcp's own included, pass through."""
    try:
        yield
    except ZdcpError:
        raise
    except OSError as e:
        raise StorageError(f"{e.filename or url}: {e.strerror or e}") from e
    except ValueError as e:
        if is_failed_request(e):
            raise StorageError(failure_message(e, url, doing)) from None
        raise


def failure_message(error: Exception, url: str, doing: str | None = None) -> str:
    """What a failed request of tensorstore's means, for a :class:`~zdcp.StorageError`: the
    location, what was being done, and for a request that failed until its retries ran out, how
    many attempts were made and what the last one was answered, with the setting that gives
    more time."""
    text = short_message(error)
    gave_up = _GAVE_UP.match(text)
    if gave_up is not None:
        answer = _HTTP_CODE.search(str(error))
        last = f"HTTP {answer.group(1)} {gave_up['last']}" if answer else gave_up["last"]
        what = f"{gave_up['operation']} {gave_up['key']}" if gave_up["operation"] else "a request"
        budget = budget_text()
        text = (
            f"{what} failed {int(gave_up['retries']) + 1} times, the last: {last} (zdcp retries a failing request "
            f"for a third of {BUDGET_VARIABLE}, now {budget} s: raise it where outages last longer)"
        )
    return f"{url}: {doing}: {text}" if doing else f"{url}: {text}"


def is_failed_request(error: ValueError) -> bool:
    """Whether tensorstore's ``error`` is a request that failed for reasons outside the
    checkpoint, rather than bad or missing data."""
    text = str(error)
    return text.startswith(_ACCESS_CODES) or "NoSuchBucket" in text or "http_response_code=" in text


def short_message(error: Exception) -> str:
    """tensorstore's message without what it appends: the source locations, the spec, the
    HTTP response it quotes."""
    return _APPENDED.split(str(error), 1)[0]


#: tensorstore's error for a request whose retries ran out: "ABORTED: [Error writing "key": ]All N
#: retry attempts failed: <the last failure>" (GCS names the key by its URL, unquoted).
_GAVE_UP = re.compile(
    r'(?:[A-Z_]+: )?(?:Error (?P<operation>[a-z]+) (?P<key>"[^"]*"|\S+): )?All (?P<retries>\d+) retry attempts failed: '
    r"(?P<last>.*)",
    re.DOTALL,
)
#: The HTTP status tensorstore appends to an error it got as an answer.
_HTTP_CODE = re.compile(r"\[http_response_code='(\d+)'\]")

#: Where tensorstore's appended details begin: " [source locations=...", " [tensorstore_spec=...",
#: " [http_response_code=...".
_APPENDED = re.compile(r" \[[a-z_ ]+=")

# tensorstore status codes of requests that failed for reasons outside the checkpoint (NOT_FOUND
# also means a missing chunk, DATA_LOSS a checksum mismatch: those are damage); any error that
# quotes an HTTP response is a failed request too.
_ACCESS_CODES = (
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "RESOURCE_EXHAUSTED",
    "ABORTED",
    "CANCELLED",
)
