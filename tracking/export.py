"""Finished trial runs as plain records (``fmnist_cluster.records``), with the artifacts a reader of
the results needs: the resolved config, the per-epoch history and the confusion matrices."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any


def trial_records(tracker, experiment_id: str, *, skip: set[str] = frozenset()) -> list[dict[str, Any]]:
    """One record per FINISHED trial run of the experiment whose run id is not in ``skip``."""
    records = []
    with tempfile.TemporaryDirectory(prefix="fmc-export-") as tmp:
        for run in tracker.trial_runs(experiment_id):
            if run["run_id"] in skip:
                continue
            folder = Path(tmp) / run["run_id"]
            folder.mkdir()
            record = {**run, "config": None, "trial": None, "confusion": {}}
            for item in tracker.client.list_artifacts(run["run_id"]):
                if item.path in ("config.json", "trial.json"):
                    local = tracker.client.download_artifacts(run["run_id"], item.path, str(folder))
                    record[item.path.removesuffix(".json")] = json.loads(Path(local).read_text())
            for item in tracker.client.list_artifacts(run["run_id"], "confusion"):
                if item.path.endswith(".json"):
                    local = tracker.client.download_artifacts(run["run_id"], item.path, str(folder))
                    name = Path(item.path).stem  # kmeans_hungarian, ...
                    record["confusion"][name] = json.loads(Path(local).read_text())["matrix"]
            records.append(record)
    return records
