"""What a failed storage request means: a request the storage refused or failed (no access, no
such bucket, unreachable, a full disk) is a :class:`~zdcp.StorageError`, naming the file or URL;
bad or missing data read from a checkpoint (a checksum mismatch, a missing or truncated chunk)
is a :class:`~zdcp.CorruptCheckpointError`, naming the array."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import CorruptCheckpointError, StorageError, ZdcpError

__all__ = ["reading", "storage_access", "short_message"]


@contextmanager
def reading(array: str, url: str) -> Iterator[None]:
    """Turn tensorstore's error for bad or missing data (a ``ValueError``: checksum mismatch,
    missing or truncated chunk) into a :class:`~zdcp.CorruptCheckpointError` naming the array;
    a refused or failed request is a :class:`~zdcp.StorageError` instead."""
    try:
        with storage_access(url):
            yield
    except ValueError as e:
        raise CorruptCheckpointError(f"array {array!r}: {e}") from None


@contextmanager
def storage_access(url: str) -> Iterator[None]:
    """Turn a request the storage refused or failed into a :class:`~zdcp.StorageError` naming
    the file or ``url``: an ``OSError`` of a local file (no space, no access, a name too long),
    or tensorstore's error for one (no such bucket, bad credentials, no access, unreachable).
    Other errors, zdcp's own included, pass through."""
    try:
        yield
    except ZdcpError:
        raise
    except OSError as e:
        raise StorageError(f"{e.filename or url}: {e.strerror or e}") from e
    except ValueError as e:
        if is_failed_request(e):
            raise StorageError(f"{url}: {short_message(e)}") from None
        raise


def is_failed_request(error: ValueError) -> bool:
    """Whether tensorstore's ``error`` is a request that failed for reasons outside the
    checkpoint, rather than bad or missing data."""
    text = str(error)
    return text.startswith(_ACCESS_CODES) or "NoSuchBucket" in text or "http_response_code=" in text


def short_message(error: Exception) -> str:
    """tensorstore's message without what it appends: the source locations, the spec, the
    HTTP response it quotes."""
    return _APPENDED.split(str(error), 1)[0]


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
