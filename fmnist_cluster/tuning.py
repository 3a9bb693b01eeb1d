"""Ray Tune's side of a sweep: the trainable, the search algorithms and the early-stopping scheduler.

A sweep's Ray trial runs in :class:`GroupTrainable`, a class trainable whose ``step()`` hands Tune one
report at a time while the trial (:func:`fmnist_cluster.sweep.run_ray_trial`) trains in a thread of
the same worker, waiting after each report for Tune's next ``step()``. The scheduler (Ray Tune's
ASHA) does not have Tune kill a trial it stops early: it writes the stop on the :class:`StopBoard`
actor and lets the trial go on; the trial's next ``step()`` reads it there, so the trial, still at
the epoch the decision was taken on, is scored there and ends its runs FINISHED with
``fmc.stopped_early`` as a normal end of the Ray trial. A trial stopped any other way (Ctrl-C,
the sweep's end) closes its runs KILLED.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from fmnist_cluster.config import Scheduler, Search, TrialConfig, sampled, sampled_name

INTERRUPT_WAIT_S = 15  # how long an interrupted trial may take to close its runs KILLED


@ray.remote(num_cpus=0)
class StopBoard:
    """The Ray trials the scheduler stopped early (trial id -> epoch) and the outcomes of trials
    that ended after their last report to Tune (trial id -> {name: outcome})."""

    def __init__(self):
        self.stopped: dict[str, int] = {}
        self.outcomes: dict[str, dict[str, Any]] = {}

    def stop(self, trial_id: str, epoch: int) -> None:
        self.stopped[trial_id] = epoch

    def stopped_at(self, trial_id: str) -> int | None:
        return self.stopped.get(trial_id)

    def put(self, trial_id: str, outcomes: dict[str, Any]) -> None:
        self.outcomes[trial_id] = outcomes

    def all_outcomes(self) -> dict[str, dict[str, Any]]:
        return self.outcomes


class _RecordingASHA(ASHAScheduler):
    """Ray Tune's ASHA, its early stops written on the board for the trial to act on (Tune would kill
    the trial's worker before it could score what it has)."""

    def __init__(self, board, **kwargs):
        super().__init__(**kwargs)
        self._board = board

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and not result.get("done"):
            ray.get(self._board.stop.remote(trial.trial_id, int(result.get("epoch") or 0)))
            return TrialScheduler.CONTINUE
        return action


class _FinalValueOptuna(OptunaSearch):
    """OptunaSearch told only a trial's final value: the epochs' reports do not carry it (a trial
    stopped early has none and counts as pruned)."""

    def on_trial_result(self, trial_id: str, result: dict):
        if self.metric in result:
            super().on_trial_result(trial_id, result)


def scheduler(spec: Scheduler | None, board, max_epochs: int):
    """Ray Tune's ASHAScheduler for a sweep's ``scheduler:`` (over epochs), or None."""
    if spec is None:
        return None
    return _RecordingASHA(board, time_attr="epoch", metric=spec.metric, mode=spec.mode,
                          grace_period=spec.grace_period, max_t=spec.max_t or max_epochs,
                          reduction_factor=spec.reduction_factor, stop_last_trials=False)


def by_index(search: Search) -> bool:
    """Whether choices are drawn as indices into their values: Optuna's categories must be plain
    values, and a choice may hold lists (filters)."""
    return search.algorithm == "optuna"


def search_space(space: dict[str, dict], search: Search) -> dict[str, Any]:
    """Ray Tune distributions for a sweep's ``space:`` (see :func:`by_index` for choices)."""
    out = {}
    for key, spec in space.items():
        kind, args = next(iter(spec.items()))
        out[key] = {"uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
                    "randint": lambda a: tune.randint(*a),
                    "choice": lambda a: tune.choice(list(range(len(a))) if by_index(search) else a)}[kind](args)
    return out


def columns(space: dict[str, dict], search: Search) -> dict[str, str]:
    """The status table's columns for the drawn settings."""
    return {f"sample/{k}": k + (" #" if by_index(search) and "choice" in spec else "") for k, spec in space.items()}


def search_algorithm(search: Search, max_concurrent: int | None):
    """Ray Tune's search algorithm for a sweep's ``search:`` (random: its BasicVariantGenerator,
    seeded; optuna: OptunaSearch with a seeded TPE sampler)."""
    from ray.tune.search import BasicVariantGenerator

    if search.algorithm == "random":
        return BasicVariantGenerator(random_state=search.seed, max_concurrent=max_concurrent or 0)
    import optuna
    from ray.tune.search import ConcurrencyLimiter

    algorithm = _FinalValueOptuna(metric=search.metric, mode=search.mode,
                                 sampler=optuna.samplers.TPESampler(seed=search.seed))
    return ConcurrencyLimiter(algorithm, max_concurrent=max_concurrent) if max_concurrent else algorithm


def decode(space: dict[str, dict], drawn: dict[str, Any], search: Search) -> dict[str, Any]:
    """A drawn sample as settings: choice indices become their values; randint values plain ints."""
    out = {}
    for key, value in drawn.items():
        kind, args = next(iter(space[key].items()))
        if kind == "choice":
            out[key] = args[int(value)] if by_index(search) else value
        else:
            out[key] = int(value) if kind == "randint" else float(value)
    return out


def searched_member(param: dict, base: tuple[str, TrialConfig], space: dict[str, dict],
                    search: Search) -> tuple[str, TrialConfig]:
    """(name, config) of the trial a sample makes; raises ValidationError if the combination is invalid."""
    name, config = base
    trial = TrialConfig(**sampled(config, decode(space, param["sample"], search)))
    return sampled_name(name, trial), trial


class GroupTrainable(tune.Trainable):
    """One Ray trial: a group of trials on one training, or one sample of a search. The work runs in a
    thread; ``step()`` returns its reports one at a time, and the thread waits after each report
    until Tune asks for the next one (or stops the trial)."""

    def setup(self, config, **kwargs):
        self._param, self._kwargs = config, kwargs
        self._board = kwargs.get("board")
        self._reports: queue.Queue = queue.Queue()
        self._go = threading.Semaphore(0)
        self._stop: str | None = None  # "early" (the scheduler) or "interrupt" (the sweep ends)
        self._outcomes: dict[str, Any] = {}
        self._thread: threading.Thread | None = None
        self._done = False

    def _work(self) -> None:
        from fmnist_cluster.sweep import run_ray_trial

        try:
            run_ray_trial(self._param, report=self._report, stop=lambda: self._stop,
                          outcomes=self._outcomes, **self._kwargs)
        except BaseException as error:  # noqa: BLE001 - handed to step(), where Tune records it
            self._reports.put(error)

    def _report(self, result: dict[str, Any]) -> None:
        """Called by the trial's thread: hand ``result`` to Tune, then wait for the go-ahead."""
        self._reports.put(result)
        if result.get("done") or self._stop is not None:
            return
        self._go.acquire()
        if self._stop == "interrupt":
            raise KeyboardInterrupt("the sweep was stopped")

    def step(self) -> dict[str, Any]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="fmc-trial", daemon=True)
            self._thread.start()
        else:
            if self._board is not None and self._stop is None and \
                    ray.get(self._board.stopped_at.remote(self.trial_id)) is not None:
                self._stop = "early"  # the scheduler's decision on the last report: score at this epoch
            self._go.release()
        item = self._reports.get()
        if isinstance(item, BaseException):
            raise item
        self._done = bool(item.get("done"))
        return item

    def cleanup(self) -> None:
        if self._thread is not None and self._thread.is_alive() and not self._done:
            self._stop = "interrupt"  # stopped before its end: the runs close KILLED
            self._go.release()
        if self._thread is not None:
            self._thread.join(INTERRUPT_WAIT_S)
        if self._board is not None and self._outcomes:
            ray.get(self._board.put.remote(self.trial_id, dict(self._outcomes)))
