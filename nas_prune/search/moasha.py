"""MO-ASHA: multi-objective asynchronous successive halving as a Ray Tune trial scheduler.

Schmucker, Donini, Zafar, Salinas, Archambeau: "Multi-objective asynchronous successive
halving", arXiv 2106.12639 (2021); ASHA: Li et al., arXiv 1810.05934. Klein et al. (TMLR 2024,
arXiv 2405.02267) use it for standard NAS, where every sub-network is fine-tuned for a few epochs.

Rungs sit at ``grace_period * reduction_factor**k`` up to ``max_t`` (in units of ``time_attr``).
When a trial first reports a ``time_attr`` at or past a rung, its objective vector is recorded
there (signed so that every objective is minimised) and ranked against the vectors already
recorded at that rung with `nas_prune.search.pareto.rank` (Pareto fronts, epsilon-net inside a
front). With ``n`` vectors at the rung, the newcomer included, the trial continues iff

    rank < ceil(n / reduction_factor)

i.e. iff it is in the top ``1 / reduction_factor`` (rounded up). The first trial at a rung
always continues, like ASHA with an empty rung. The newcomer is ranked first among exact ties
(ASHA also continues a trial equal to its cutoff). Ray's ASHA only takes one metric, hence this
class; it copies the structure of ``ray.tune.schedulers.AsyncHyperBandScheduler``.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

from nas_prune.search import pareto

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController

logger = logging.getLogger(__name__)



def rung_levels(grace_period: float, reduction_factor: float, max_t: float) -> list[int | float]:
    """Milestones ``grace_period * reduction_factor**k`` that do not exceed ``max_t``.

    Args:
        grace_period: The first milestone.
        reduction_factor: Ratio between consecutive milestones (> 1).
        max_t: The largest allowed milestone.

    Returns:
        Milestones in increasing order (integers when both factors are integers).
    """
    levels = []
    level = grace_period
    while level <= max_t * (1 + 1e-9):
        levels.append(level)
        level = level * reduction_factor
    return levels


@dataclass
class _Rung:
    milestone: int | float
    recorded: dict[str, np.ndarray] = field(default_factory=dict)
    """Trial id -> signed (minimised) objective vector, in order of arrival."""


class MOASHA(FIFOScheduler):
    """Multi-objective asynchronous successive halving (stopping variant).

    Brackets work like Ray's ``AsyncHyperBandScheduler``: bracket ``s`` has its first rung at
    ``grace_period * reduction_factor**s``. Trials are assigned to brackets round-robin, in the
    order Tune adds them (deterministic, unlike Ray's soft-max draw). Every trial is stopped once
    its ``time_attr`` reaches ``max_t``. See the module docstring for the continue/stop rule.
    After ``Tuner.restore``, refill the rungs with `record_history` (Tune does not call
    `restore` on schedulers).

    Args:
        metrics: Result keys of the objectives (flattened with ``/`` for nested results).
        modes: ``"min"`` or ``"max"`` per metric, or one mode for all.
        time_attr: Monotonically increasing result key measuring progress.
        grace_period: First rung; no trial is stopped before it (except by ``max_t``).
        reduction_factor: Ratio between rungs; the top ``1 / reduction_factor`` continue.
        max_t: Stop every trial when ``time_attr`` reaches it; the last rung is at most this.
        brackets: Number of brackets (at most the number of rungs).
        rank_method: Order inside a Pareto front, ``"epsilon_net"`` or ``"nondominated"``
            (see `nas_prune.search.pareto.sort_order`).

        history: Called once, before the first trial is added, for the results an
            interrupted run reported (see `record_history`): Tune 2.60 restores a scheduler as
            pickled when the search started, so a resumed search rebuilds its rungs so.

    Raises:
        ValueError: For inconsistent arguments; the message says which.
    """

    def __init__(
        self,
        metrics: Sequence[str],
        modes: Sequence[str] | str = "min",
        time_attr: str = "training_iteration",
        grace_period: int | float = 1,
        reduction_factor: float = 3,
        max_t: int | float = 81,
        brackets: int = 1,
        rank_method: str = "epsilon_net",
        history: Callable[[], Iterable[tuple[str, float, Mapping[str, float]]]] | None = None,
    ) -> None:
        metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        modes = [modes] * len(metrics) if isinstance(modes, str) else list(modes)
        if not metrics:
            raise ValueError("MOASHA needs at least one metric")
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"metrics must be distinct, got {metrics}")
        signs = pareto.mode_signs(modes, len(metrics))
        if not grace_period > 0:
            raise ValueError(f"grace_period must be > 0, got {grace_period}")
        if not reduction_factor > 1:
            raise ValueError(f"reduction_factor must be > 1, got {reduction_factor}")
        if not max_t >= grace_period:
            raise ValueError(f"max_t ({max_t}) must be >= grace_period ({grace_period})")
        if rank_method not in pareto.RANK_METHODS:
            raise ValueError(
                f"rank_method must be one of {pareto.RANK_METHODS}, got {rank_method!r}"
            )
        levels = rung_levels(grace_period, reduction_factor, max_t)
        if not 1 <= brackets <= len(levels):
            raise ValueError(
                f"brackets must be between 1 and the number of rungs ({len(levels)}: {levels}), "
                f"got {brackets}"
            )
        super().__init__()
        self._metrics = metrics
        self._modes = modes
        self._signs = signs
        self._time_attr = time_attr
        self._reduction_factor = reduction_factor
        self._max_t = max_t
        self._rank_method = rank_method
        self._brackets = [[_Rung(level) for level in levels[s:]] for s in range(brackets)]
        self._trial_bracket: dict[str, int] = {}
        self._num_stopped = 0
        self._history = history

    @property
    def metrics(self) -> list[str]:
        """The objective keys."""
        return list(self._metrics)

    @property
    def modes(self) -> list[str]:
        """``"min"`` or ``"max"`` per objective."""
        return list(self._modes)

    def milestones(self, bracket: int = 0) -> list[int | float]:
        """The rung milestones of one bracket, in increasing order."""
        return [rung.milestone for rung in self._brackets[bracket]]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        """Accepts Tune's ``TuneConfig(metric=..., mode=...)`` when it agrees with ``metrics``.

        Tune calls this with ``metric=None`` when the user gives no single metric; that is
        accepted. A metric that is one of ``metrics`` (with its mode, or no mode) is accepted too.
        Anything else returns False, and Tune then raises its "already instantiated with their
        own metric and mode" error.
        """
        if metric is None:
            return True
        if metric in self._metrics and mode in (None, self._modes[self._metrics.index(metric)]):
            return True
        logger.error(
            "TuneConfig(metric=%r, mode=%r) conflicts with MOASHA's objectives %s",
            metric,
            mode,
            self._describe_objectives(),
        )
        return False

    def on_trial_add(self, tune_controller: TuneController | None, trial: Trial) -> None:
        """Assigns the trial to a bracket, round-robin (after putting back the `history` of an
        interrupted run, the first time)."""
        if self._history is not None:
            history, self._history = self._history, None
            self.record_history(history())
        self._bracket_of(trial.trial_id)

    def on_trial_result(
        self, tune_controller: TuneController | None, trial: Trial, result: Mapping[str, Any]
    ) -> str:
        """Records the result at a newly reached rung and decides there; stops at ``max_t``.

        Raises:
            ValueError: If ``result`` lacks ``time_attr`` or one of the metrics.
        """
        progress, vector = self._read(result)
        action = self._record(trial.trial_id, progress, vector, decide=True)
        if progress >= self._max_t:
            return TrialScheduler.STOP  # finished its budget: not counted as stopped early
        if action == TrialScheduler.STOP:
            self._num_stopped += 1
        return action

    def on_trial_complete(
        self, tune_controller: TuneController | None, trial: Trial, result: Mapping[str, Any]
    ) -> None:
        """Records the final result at a rung not yet recorded (no decision to take).

        A result without ``time_attr`` or a metric (a trial that never reported) is skipped.
        """
        if self._time_attr in result and all(m in result for m in self._metrics):
            progress, vector = self._read(result)
            self._record(trial.trial_id, progress, vector, decide=False)

    def record_history(
        self, rows: Iterable[tuple[str, float, Mapping[str, float]]]
    ) -> None:
        """Rebuilds the rungs from results reported before an interruption.

        Ray Tune (2.60) never calls a scheduler's `save`/`restore`, so after ``Tuner.restore``
        the rungs start empty. Feed this the results recorded before the interruption, and
        every rung holds the objective vectors it held then; later trials are ranked against
        them. Each row is recorded as `on_trial_complete` records a result: at the highest rung
        its progress reaches, if the trial is not there yet, without deciding anything.

        Rows are taken in the given order (the order they were reported, so that brackets are
        assigned round-robin as before); each trial's own rows are first put in increasing
        progress, so a rung holds the trial's first report at or past it. ``num_stopped``
        counts only stops made after the rebuild.

        Args:
            rows: ``(trial_id, progress, objectives)`` per reported result: ``progress`` is the
                value of ``time_attr`` and ``objectives`` maps every metric to its reported
                (unsigned) value; other keys are ignored.

        Raises:
            ValueError: If a row lacks one of the metrics.
        """
        rows = list(rows)
        slots: dict[str, list[int]] = {}
        for i, (trial_id, _, _) in enumerate(rows):
            slots.setdefault(trial_id, []).append(i)
        ordered = list(rows)
        for positions in slots.values():
            by_progress = sorted((rows[i] for i in positions), key=lambda row: float(row[1]))
            for i, row in zip(positions, by_progress, strict=True):
                ordered[i] = row
        for trial_id, progress, objectives in ordered:
            progress, vector = self._read({**objectives, self._time_attr: progress})
            self._record(trial_id, progress, vector, decide=False)

    def debug_string(self) -> str:
        """One line for the settings, one per bracket with the number of trials per rung.

        ``num_stopped`` counts the trials stopped early at a rung, not those that reached
        ``max_t``.
        """
        lines = [
            f"Using MOASHA: objectives {self._describe_objectives()}, "
            f"{self._time_attr} max_t={self._max_t}, reduction_factor={self._reduction_factor}, "
            f"rank={self._rank_method}, num_stopped={self._num_stopped}"
        ]
        for s, rungs in enumerate(self._brackets):
            cells = " | ".join(f"t={r.milestone}: {len(r.recorded)} trials" for r in rungs)
            lines.append(f"Bracket {s}: {cells}")
        return "\n".join(lines)

    def save(self, checkpoint_path: str) -> None:
        """Pickles the rungs and bracket assignments (temp file + ``os.replace``)."""
        state = {
            "settings": self._settings(),
            "recorded": [[dict(r.recorded) for r in rungs] for rungs in self._brackets],
            "trial_bracket": dict(self._trial_bracket),
            "num_stopped": self._num_stopped,
        }
        directory = os.path.dirname(os.path.abspath(checkpoint_path))
        fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".moasha-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                pickle.dump(state, handle)
            os.replace(tmp_path, checkpoint_path)
        except BaseException:
            os.unlink(tmp_path)
            raise

    def restore(self, checkpoint_path: str) -> None:
        """Restores what `save` wrote.

        Raises:
            ValueError: If the checkpoint was saved by a scheduler with other objectives,
                ``time_attr`` or rungs.
        """
        with open(checkpoint_path, "rb") as handle:
            state = pickle.load(handle)
        if state["settings"] != self._settings():
            raise ValueError(
                f"cannot restore MOASHA state saved with {state['settings']} into a scheduler "
                f"with {self._settings()}"
            )
        for rungs, recorded in zip(self._brackets, state["recorded"], strict=True):
            for rung, trials in zip(rungs, recorded, strict=True):
                rung.recorded = dict(trials)
        self._trial_bracket = dict(state["trial_bracket"])
        self._num_stopped = state["num_stopped"]

    def _settings(self) -> dict[str, Any]:
        return {
            "metrics": self._metrics,
            "modes": self._modes,
            "time_attr": self._time_attr,
            "milestones": [self.milestones(s) for s in range(len(self._brackets))],
        }

    def _describe_objectives(self) -> str:
        pairs = zip(self._metrics, self._modes, strict=True)
        return ", ".join(f"{metric} ({mode})" for metric, mode in pairs)

    def _bracket_of(self, trial_id: str) -> int:
        if trial_id not in self._trial_bracket:
            self._trial_bracket[trial_id] = len(self._trial_bracket) % len(self._brackets)
        return self._trial_bracket[trial_id]

    def _read(self, result: Mapping[str, Any]) -> tuple[float, np.ndarray]:
        missing = [k for k in [self._time_attr, *self._metrics] if k not in result]
        if missing:
            raise ValueError(
                f"MOASHA needs the result keys {missing}, missing from a reported result; keys "
                f"present: {sorted(result)}. Report every objective with tune.report(...)."
            )
        vector = self._signs * np.array([float(result[m]) for m in self._metrics])
        return float(result[self._time_attr]), vector

    def _record(self, trial_id: str, progress: float, vector: np.ndarray, decide: bool) -> str:
        rungs = self._brackets[self._bracket_of(trial_id)]
        reached = [rung for rung in rungs if rung.milestone <= progress]
        if not reached or trial_id in reached[-1].recorded:
            return TrialScheduler.CONTINUE
        rung = reached[-1]
        action = self._decide(rung, vector) if decide else TrialScheduler.CONTINUE
        rung.recorded[trial_id] = vector
        logger.debug("trial %s at rung %s: %s", trial_id, rung.milestone, action)
        return action

    def _decide(self, rung: _Rung, vector: np.ndarray) -> str:
        points = np.vstack([vector, *rung.recorded.values()])  # newcomer first: wins exact ties
        newcomer_rank = pareto.rank(points, self._rank_method)[0]
        keep = math.ceil(len(points) / self._reduction_factor - 1e-9)
        return TrialScheduler.CONTINUE if newcomer_rank < keep else TrialScheduler.STOP
