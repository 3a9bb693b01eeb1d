"""Claims: which sweep runs a trial, decided over the runs that carry its trial key.

A trial's child run is its claim (tag ``fmc.claim``: pending, then won) and carries a heartbeat (tag
``fmc.heartbeat``, unix seconds) refreshed by its trial every :func:`heartbeat_every` seconds. The
decisions here are pure functions over plain run records ``{run_id, status, start_time, tags}``.

The rule that makes a claim safe: a trial that has not reached the store for the outage bound stops
writing for good (``tracking.delivery.Contact``), and a claim expires only after :func:`claim_ttl`,
which is longer than that bound plus two heartbeats. So by the time a second sweep may take a trial
over, the first can no longer record it: one trial, one FINISHED run.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

CLAIM = "fmc.claim"
HEARTBEAT = "fmc.heartbeat"

Run = dict[str, Any]  # {run_id, status, start_time (ms), tags}


def heartbeat_every(outage_seconds: float) -> float:
    """Seconds between a trial's heartbeats: often enough that a lost contact is noticed within a
    tenth of the outage bound, at most every 30 s."""
    return min(30.0, max(1.0, outage_seconds / 10))


def claim_ttl(outage_seconds: float, floor: float = 0.0) -> float:
    """How old a heartbeat may be before its claim expires: the outage bound, plus a heartbeat for the
    outage to be seen, one for the loss to be acted on and one of margin; at least ``floor``
    (``FMC_CLAIM_TTL_SECONDS``)."""
    return max(floor, outage_seconds + 3 * heartbeat_every(outage_seconds))


def heartbeat_age(tags: dict[str, str], now: float | None = None) -> float | None:
    """Seconds since a trial run's last heartbeat; None when it has none."""
    try:
        return max(0.0, (time.time() if now is None else now) - float(tags[HEARTBEAT]))
    except (KeyError, ValueError):
        return None


def describe(run: Run) -> str:
    tags = run["tags"]
    return f"run {run['run_id'][:8]} of sweep {tags.get('fmc.sweep')!r} on {tags.get('fmc.host', '?')}"


def holder(mine: Run, runs: list[Run], *, ttl: float, now: float, rerun_since: int | None = None) -> str | None:
    """Who holds the trial, if not ``mine`` (None: mine wins). ``runs``: the runs with its trial key.

    A FINISHED run holds it (with ``rerun_since``, only one started at or after that time, in ms: a
    rerun replaces older results); so does a RUNNING run with a fresh heartbeat whose claim was won.
    Among fresh pending claims the earliest (start time, run id) wins: both sides of a race read both
    claims, so exactly one of them goes on.
    """
    live = []
    for run in runs:
        if run["run_id"] == mine["run_id"]:
            continue
        if run["status"] == "FINISHED" and (rerun_since is None or run["start_time"] >= rerun_since):
            return f"finished already in {describe(run)}"
        age = heartbeat_age(run["tags"], now)
        if run["status"] == "RUNNING" and age is not None and age <= ttl:
            live.append(run)
    for run in live:
        if run["tags"].get(CLAIM, "won") == "won":
            return f"claimed by {describe(run)}"
    first = min(live + [mine], key=lambda r: (r["start_time"], r["run_id"]))
    if first is not mine:
        return f"claimed at the same moment by {describe(first)}"
    return None


def live_and_expired(running: list[Run], *, ttl: float, now: float) -> tuple[dict[str, str], list[tuple[Run, str]]]:
    """Split RUNNING trial runs into live claims (trial key -> who) and expired ones (run, why): a run
    whose heartbeat is older than ``ttl`` belongs to a sweep that stopped."""
    live, expired = {}, []
    for run in running:
        age = heartbeat_age(run["tags"], now)
        if age is not None and age <= ttl:
            live[run["tags"].get("fmc.trial_key", "")] = f"{describe(run)}, heartbeat {age:.0f} s ago"
        else:
            expired.append((run, f"claim expired: no heartbeat for {'ever' if age is None else f'{age:.0f} s'} "
                                 "(its sweep stopped)"))
    return live, expired


class Heartbeat:
    """A thread that calls ``beat()`` every ``every`` seconds until stopped (``beat`` never raises)."""

    def __init__(self, beat: Callable[[], None], every: float):
        self.beat, self.every = beat, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fmc-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.beat()

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=15)
