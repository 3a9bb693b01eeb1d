"""Run records that outlive the machine: one JSON line per finished trial run (``results/*.jsonl``).

A record holds what the report and a resumed sweep need, and what a reader of the results wants
without MLflow: ``run_id``, ``name``, ``start_time``/``end_time`` (ms), ``params`` (the flattened
config, as logged), ``metrics`` (final values), ``tags`` (trial key, commit, CPU, host, ...),
``config`` (the resolved trial config), ``confusion`` ({clusterer}_{mapping} -> 10 x 10 counts) and
``trial`` (per-epoch history, scores during training, data sizes). The first four keys are those of
``Tracker.trial_runs``, so ``fmc report`` reads records and MLflow alike. No MLflow here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REQUIRED = ("run_id", "name", "start_time", "params", "metrics", "tags")


class RecordError(Exception):
    """A records file cannot be read; the message names the file and line."""


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a JSON-lines file, in file order."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise RecordError(f"{path}: cannot read records: {getattr(err, 'strerror', None) or err}") from None
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}:{i}: not a JSON record ({err.msg} at column {err.colno}); "
                              "was the file cut short?") from None
        missing = [k for k in REQUIRED if not isinstance(record, dict) or k not in record]
        if missing:
            raise RecordError(f"{path}:{i}: record lacks {', '.join(missing)}")
        records.append(record)
    return records


def recorded_keys(path: str | Path) -> set[str]:
    """Trial keys with a record in the file (what a sweep started with ``--skip-recorded`` skips)."""
    return {r["tags"].get("fmc.trial_key") for r in read_records(path)} - {None}


def recorded_scores(path: str | Path) -> dict[str, dict[str, float]]:
    """Trial key -> the recorded run's metrics (what a search run again tells its searcher)."""
    return {r["tags"]["fmc.trial_key"]: r["metrics"] for r in read_records(path) if r["tags"].get("fmc.trial_key")}


def append_records(path: str | Path, records: list[dict[str, Any]]) -> int:
    """Append the records whose run the file lacks (by ``run_id``), oldest first; returns how many.
    A file that does not exist yet is created."""
    path = Path(path)
    have = {r["run_id"] for r in read_records(path)} if path.exists() else set()
    new = sorted((r for r in records if r["run_id"] not in have), key=lambda r: (r["start_time"], r["run_id"]))
    if new:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            for record in new:
                f.write(json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n")
    return len(new)
