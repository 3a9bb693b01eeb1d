"""Delivery of a trial's calls to the tracking store, in order, through outages.

A :class:`Contact` is when the store last answered this trial (its calls and its heartbeat share
one). A :class:`Delivery` queues calls: when the store is unreachable they stay queued while training
goes on and are delivered in order once a quick probe of the server answers; a call the server
refuses (an answer that waiting will not change, such as 500 "No space left on device") is dropped
from the queue and raised at once as :class:`TrackingRefused` with what the server said. Once the
store has not answered for ``outage_seconds`` the contact is lost for good: the trial never writes
again (a second sweep may then take its trial over, see ``tracking.claims``) and every later call
raises :class:`TrackingOutage`.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from typing import Any, Callable

from tracking.store import TrackingOutage, TrackingRefused, answers, is_transient, server_message, status_code


class Contact:
    """Whether the store still answers one trial: ``failed()`` / ``ok()`` after each call; ``lost()``
    once no call has succeeded for ``outage_seconds`` since the first failure (final: a lost contact
    does not come back, so that a trial whose claim may have expired stops writing)."""

    def __init__(self, outage_seconds: float):
        self.outage_seconds = outage_seconds
        self.down_since: float | None = None
        self._lost = False
        self._lock = threading.Lock()

    def ok(self) -> None:
        with self._lock:
            if not self._lost:
                self.down_since = None

    def failed(self) -> None:
        with self._lock:
            if self.down_since is None:
                self.down_since = time.monotonic()

    def lost(self) -> bool:
        with self._lock:
            if not self._lost and self.down_since is not None:
                self._lost = time.monotonic() - self.down_since > self.outage_seconds
            return self._lost


class Delivery:
    """Calls to the tracking store, in order, that survive an outage.

    ``send(what, call)`` runs what is queued, then ``call``; when the store is unreachable the calls stay
    queued (training goes on) and are retried at a later ``send``, once a quick probe of the server
    (``/health``, at most every ``retry_every`` seconds) answers. ``send(..., wait=True)`` and ``drain()``
    block until everything is delivered. Raises :class:`TrackingRefused` (that call dropped, the rest
    kept) or :class:`TrackingOutage` (contact lost).
    """

    def __init__(self, uri: str, outage_seconds: float, retry_every: float = 5.0, contact: Contact | None = None):
        self.uri, self.outage_seconds, self.retry_every = uri, outage_seconds, retry_every
        self.contact = contact or Contact(outage_seconds)
        self.queue: collections.deque[tuple[str, Callable[[], Any]]] = collections.deque()
        self.buffering_since: float | None = None  # the first failed call of the current outage
        self.last_probe = 0.0
        self.delivered_late = 0  # calls that went through only after an outage
        self.outage_seconds_total = 0.0

    def send(self, what: str, call: Callable[[], Any], *, wait: bool = False) -> Any:
        self.queue.append((what, call))
        return self._run(wait)

    def drain(self) -> None:
        self._run(True)

    def _run(self, wait: bool) -> Any:
        value = None
        while self.queue:
            what, call = self.queue[0]
            if self.contact.lost():
                raise self._outage(what)
            if self.buffering_since is not None and not self._may_try():
                if not wait:
                    return None  # keep buffering; training goes on
                time.sleep(min(1.0, self.retry_every))
                continue
            try:
                value = call()
            except Exception as err:  # noqa: BLE001 - sorted by is_transient below
                if not is_transient(err):
                    self.queue.popleft()  # the final word on this call; the others still go
                    if status_code(err) is None:
                        raise
                    raise TrackingRefused(f"tracking store {self.uri} refused {what}: {server_message(err)}") from err
                self.contact.failed()
                if self.buffering_since is None:
                    self.buffering_since = self.last_probe = time.monotonic()
                    print(f"fmc: tracking store {self.uri} unreachable ({str(err).splitlines()[0][:200]}); "
                          f"buffering, will retry for {self.outage_seconds:.0f} s", file=sys.stderr, flush=True)
                if self.contact.lost():
                    raise self._outage(what) from None
                if not wait:
                    return None
                continue
            self.contact.ok()
            self.queue.popleft()
            if self.buffering_since is not None:
                self.delivered_late += 1
                if not self.queue:
                    lasted = time.monotonic() - self.buffering_since
                    print(f"fmc: tracking store {self.uri} reachable again after {lasted:.0f} s; "
                          "buffered calls delivered", file=sys.stderr, flush=True)
                    self.outage_seconds_total += lasted
                    self.buffering_since = None
        return value

    def _may_try(self) -> bool:
        """During an outage: probe the server at most every ``retry_every`` seconds; the calls are tried
        again only once it answers."""
        now = time.monotonic()
        if now - self.last_probe < self.retry_every:
            return False
        self.last_probe = now
        return answers(self.uri)

    def _outage(self, what: str) -> TrackingOutage:
        return TrackingOutage(
            f"MLflow tracking store {self.uri} unreachable for more than {self.outage_seconds:.0f} s "
            f"(FMC_TRACKING_OUTAGE_SECONDS) while logging {what}; fmc stopped waiting. Run the same "
            "`fmc sweep` again when the server is back: finished trials are kept.")
