"""How requests to an object store are retried, and for how long a call keeps trying.

Object stores fail requests as a matter of course: they throttle (S3 answers ``503 SlowDown``,
GCS ``429``), drop connections, and have outages. tensorstore retries such failures (HTTP 408,
429 and 5xx, and failed connections) by a schedule, the context resources
``s3_request_retries`` and ``gcs_request_retries``, whose default waits from 1 s up to 32 s
between attempts, 32 times: about 15 minutes per request. Under 10% throttling that made a save
10x slower, and an outage stalled a save silently for a quarter of an hour.

zdcp gives every location on an object store its own schedule instead, close to the AWS SDKs'
(whose first wait is random up to 100 ms): the first retry after 50-100 ms (:data:`INITIAL_DELAY`
plus tensorstore's random jitter of up to as much), each wait twice the last, at most
:data:`MAX_DELAY` seconds; and a budget, the environment variable
``ZDCP_RETRY_BUDGET`` (seconds, default :data:`DEFAULT_BUDGET`): a zdcp call that meets an
outage raises :class:`~zdcp.StorageError` within it. A request keeps being retried for a third
of the budget (:func:`request_schedule`): requests waiting for a connection start their retries
later than the first that fails, and a call waits for every request it started before it raises
(no write of a failed save may land after its cleanup). The cleanup after a failed save retries
a request for a few seconds only (:func:`cleanup_schedule`): what it cannot delete stays under
its marker, and the next save to the same place removes it (:mod:`zdcp.storage.saving`).

tensorstore does not honour ``Retry-After``; neither S3 nor GCS send it with their throttling
answers.

While requests are retried, the ``zdcp`` logger warns at most every :data:`WARN_INTERVAL`
seconds, with the count and the object-store locations in use (:class:`RetryWatch`), so that a
slow save says why.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import tensorstore as ts

from ..errors import UsageError

__all__ = [
    "BUDGET_VARIABLE",
    "DEFAULT_BUDGET",
    "RetrySchedule",
    "retry_budget",
    "request_schedule",
    "cleanup_schedule",
    "context_spec",
    "REQUESTS_IN_FLIGHT",
    "RETRY_WATCH",
]

#: The environment variable that holds the budget, in seconds.
BUDGET_VARIABLE = "ZDCP_RETRY_BUDGET"
#: The budget when the environment does not set one: the time within which a call that meets an
#: outage raises (Google's client libraries give a request 120 s in all, too).
DEFAULT_BUDGET = 120.0
#: The first wait before a retry, in seconds (tensorstore adds a random jitter of up to as
#: much): a throttled request costs its caller 50-100 ms, where one round trip to an object
#: store takes tens.
INITIAL_DELAY = 0.05
#: The longest wait between two attempts, in seconds.
MAX_DELAY = 10.0
#: How long the cleanup after a failed save retries a request, in seconds.
CLEANUP_SECONDS = 5.0
#: How many requests to an object store a call keeps in flight: twice tensorstore's request
#: concurrency (``s3_request_concurrency``, ``gcs_request_concurrency``: 32 by default), enough
#: to keep it busy. A request keeps its place through its retries, so in an outage they fail a
#: wave of 32 at a time: a call that waits for what it has in flight after the first failure
#: (no write of a failed save may land after its cleanup) waits for two waves at most.
REQUESTS_IN_FLIGHT = 64
#: The least time between two warnings about retried requests, in seconds.
WARN_INTERVAL = 5.0

#: The tensorstore context resource that holds each object-store driver's retry schedule.
_RESOURCES = {"s3": "s3_request_retries", "gcs": "gcs_request_retries"}
#: The tensorstore metric that counts each driver's retried requests.
_METRICS = {"s3": "/tensorstore/kvstore/s3/retries", "gcs": "/tensorstore/kvstore/gcs/retries"}

_log = logging.getLogger("zdcp")


@dataclass(frozen=True)
class RetrySchedule:
    """tensorstore's retry schedule: after the ``k``-th failure of a request (from 1) it waits
    ``min(initial_delay * 2**(k-1) + jitter, max_delay)`` (jitter: up to ``initial_delay``, at
    most 1 s) and tries again, ``max_retries`` times at most."""

    max_retries: int
    initial_delay: float = INITIAL_DELAY
    max_delay: float = MAX_DELAY

    @classmethod
    def lasting(cls, seconds: float) -> RetrySchedule:
        """zdcp's schedule that retries a failing request for as long as its waits, jitter at
        its largest included, add up to at most ``seconds`` (at least one retry)."""
        schedule, waited = cls(0), 0.0
        retries = 0
        while schedule.wait_before(retries + 1) < schedule.max_delay:  # the doubling waits
            if waited + schedule.wait_before(retries + 1) > seconds:
                return cls(max(retries, 1))
            waited += schedule.wait_before(retries + 1)
            retries += 1
        return cls(max(retries + int((seconds - waited) // schedule.max_delay), 1))  # then the longest

    def wait_before(self, retry: int) -> float:
        """The longest wait before the ``retry``-th retry (from 1)."""
        jitter = min(self.initial_delay, 1.0)
        return min(self.initial_delay * 2 ** min(retry - 1, 62) + jitter, self.max_delay)

    @property
    def longest_wait(self) -> float:
        """All waits of a request that fails every attempt, at their longest, in seconds."""
        doubling = next((k for k in range(1, 64) if self.wait_before(k) >= self.max_delay), 64)
        short = sum(self.wait_before(k) for k in range(1, min(doubling, self.max_retries + 1)))
        return short + max(self.max_retries - doubling + 1, 0) * self.max_delay

    def to_json(self) -> dict[str, Any]:
        return {
            "max_retries": self.max_retries,
            "initial_delay": f"{self.initial_delay}s",
            "max_delay": f"{self.max_delay}s",
        }


def retry_budget() -> float:
    """The budget in seconds: ``ZDCP_RETRY_BUDGET`` from the environment, else
    :data:`DEFAULT_BUDGET`."""
    text = os.environ.get(BUDGET_VARIABLE)
    if text is None or not text.strip():
        return DEFAULT_BUDGET
    try:
        budget = float(text)
    except ValueError:
        budget = float("nan")
    if not budget > 0 or budget == float("inf"):
        raise UsageError(f"{BUDGET_VARIABLE}={text!r}: expected a number of seconds greater than 0")
    return budget


def request_schedule() -> RetrySchedule:
    """How a request is retried: for a third of the budget."""
    return RetrySchedule.lasting(retry_budget() / 3)


def cleanup_schedule() -> RetrySchedule:
    """How a failed save's cleanup retries a request: for a few seconds (an eighth of the
    budget where that is less)."""
    return RetrySchedule.lasting(min(CLEANUP_SECONDS, retry_budget() / 8))


def context_spec(driver: str, schedule: RetrySchedule | None = None) -> dict[str, Any]:
    """What a tensorstore context for a kvstore of ``driver`` needs for zdcp's retries
    (``schedule``, by default :func:`request_schedule`): nothing for a driver that does not
    retry (local files, memory)."""
    resource = _RESOURCES.get(driver)
    if resource is None:
        return {}
    return {resource: (schedule or request_schedule()).to_json()}


def budget_text() -> str:
    """The budget as the environment sets it, for messages (never raises, unlike
    :func:`retry_budget`: a message about a failure must not fail)."""
    return os.environ.get(BUDGET_VARIABLE) or f"{DEFAULT_BUDGET:g}"


class RetryWatch:
    """Warns, on the ``zdcp`` logger, while requests to object stores are being retried: at
    most every :data:`WARN_INTERVAL` seconds, with how many retries there were since the last
    look and the object-store locations in use. tensorstore counts retries per process and
    driver, not per store, so the warning names every such location in use (a
    :class:`~zdcp.storage.location.Location` still referred to, as during a long save) or used
    within the last minute, the latest first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._in_use: weakref.WeakSet[Any] = weakref.WeakSet()
        self._used: dict[str, float] = {}  # url -> when it was last in use (monotonic)
        os.register_at_fork(after_in_child=self._forget_thread)  # a forked child has no watch thread

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="zdcp-retry-watch", daemon=True)
                self._thread.start()

    def using(self, location: Any) -> None:
        """Note that ``location`` (an object-store Location, with its ``url``) is in use, and
        watch from now on."""
        self.start()
        with self._lock:
            self._in_use.add(location)
            self._used[location.url] = time.monotonic()

    def _forget_thread(self) -> None:
        self._thread = None

    def _watch(self) -> None:
        seen = _retries()
        while True:
            time.sleep(WARN_INTERVAL)
            try:
                count = _retries()
                if count > seen:
                    self._warn(count - seen)
                seen = count
            except Exception as e:  # the watch must go on: it is only a warning
                _log.debug("the retry watch failed: %r", e)

    def _warn(self, retries: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._used.update((location.url, now) for location in list(self._in_use))
            self._used = {url: t for url, t in self._used.items() if now - t < 60}
            urls = sorted(self._used, key=self._used.__getitem__, reverse=True)
        where = ", ".join(urls[:3]) + (f" and {len(urls) - 3} more" if len(urls) > 3 else "") if urls else "storage"
        _log.warning(
            "%d retries of requests to %s in the last %.0f s: the store throttles or fails them. A request that "
            "keeps failing is retried for a third of %s (now %s s), then raises StorageError",
            retries,
            where,
            WARN_INTERVAL,
            BUDGET_VARIABLE,
            budget_text(),
        )


def _retries() -> int:
    """Retried requests so far in this process, of every object-store driver."""
    total = 0
    for metric in _METRICS.values():
        for found in ts.experimental_collect_matching_metrics(metric, include_zero_metrics=True):
            total += sum(int(value.get("value", 0)) for value in found["values"])
    return total


#: The process's one watch.
RETRY_WATCH = RetryWatch()
