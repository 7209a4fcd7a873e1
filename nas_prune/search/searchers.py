"""Multi-objective searchers over sub-network configs, as Ray Tune `Searcher`s.

* `random`: uniform samples of the search space.
* `local`: local search with a Pareto archive (Klein et al. 2024): the first suggestions are the
  largest, the smallest and the middle config; afterwards a random archive member with exactly
  one dimension re-sampled.
* `morea`: multi-objective regularised evolution (Real et al. 2019, multi-objective as in
  syne-tune): a fixed-size population ages out its oldest member; each child mutates a parent
  drawn uniformly from the non-dominated members of a random sample (not the sample's
  rank-0 member, which would always be its lowest-error one).
* `nsga2`: Optuna's NSGA-II sampler through Ray's `OptunaSearch`, never suggesting a
  sub-network twice (`NSGA2Searcher`).

Each takes `initial` configs to suggest first (the driver passes `SearchSpace.sample_within`
draws at `SearchOptions.budgets`). All are seeded: the same seed, space and results give the
same suggestions. Every searcher minimises each objective after the sign flip of its mode,
done once in the constructor.
Only results at full fidelity (the last report of a trial that was not stopped early) enter the
archives, so the searchers combine with MO-ASHA's early stopping.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import tempfile
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from nas_prune import registry
from nas_prune.errors import SearchError
from nas_prune.search import pareto
from nas_prune.space import SearchSpace

log = logging.getLogger(__name__)


class MultiObjectiveSearcher(Searcher):
    """Shared plumbing: objectives and signs, seeded RNG, full-fidelity filtering, save/restore.

    Args:
        space: the search space configs come from.
        objectives: result keys to minimise (after the sign of `modes`).
        modes: "min"/"max" per objective (or one for all).
        seed: seed of every random choice.
        fidelity_attr: result key holding the fidelity (e.g. validation examples seen).
        max_fidelity: fidelity of a complete evaluation; lower ones are not archived.
        initial: configs suggested first, in order, before the searcher's own (e.g.
            `SearchSpace.sample_within` draws at the user's budgets); their results feed the
            archive or population like any other.
    """

    def __init__(
        self,
        space: SearchSpace,
        objectives: Sequence[str],
        modes: Sequence[str] | str = "min",
        seed: int = 0,
        fidelity_attr: str = "fidelity",
        max_fidelity: float | None = None,
        initial: Sequence[Mapping[str, int]] = (),
    ):
        self._signs = pareto.mode_signs(modes, len(objectives))
        modes = list(modes) if not isinstance(modes, str) else [modes] * len(objectives)
        super().__init__(metric=list(objectives), mode=modes)
        self.space = space
        self.objectives = list(objectives)
        self.seed = seed
        self.fidelity_attr = fidelity_attr
        self.max_fidelity = max_fidelity
        self.rng = np.random.default_rng(seed)
        self.configs: dict[str, dict[str, int]] = {}
        self.seen: set = set()
        self.queued: deque = deque(space.validate(c) for c in initial)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the space and objectives were given to the constructor

    def suggest(self, trial_id: str) -> dict[str, int] | None:
        """The next config; one that selects an already suggested sub-network (e.g. any
        width with 0 layers) is drawn again, up to `max_retries` times. The `initial` configs
        come first."""
        for _ in range(self.max_retries):
            config = self.queued.popleft() if self.queued else self._next_config()
            key = self.space.to_sub_network(config)
            if key not in self.seen:
                break
        self.seen.add(key)
        self.configs[trial_id] = config
        return dict(config)

    max_retries = 20

    def _next_config(self) -> dict[str, int]:
        raise NotImplementedError

    def objective_vector(self, result: dict[str, Any]) -> np.ndarray | None:
        """The signed objective vector of a complete result, or None if it is incomplete."""
        if not result or any(k not in result for k in self.objectives):
            return None
        if self.max_fidelity is not None:
            if float(result.get(self.fidelity_attr, self.max_fidelity)) < self.max_fidelity:
                return None
        return self._signs * np.array([float(result[k]) for k in self.objectives])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error=False) -> None:
        config = self.configs.pop(trial_id, None)
        if error or config is None:
            return
        vector = self.objective_vector(result or {})
        if vector is not None and np.all(np.isfinite(vector)):
            self.observe(config, vector)

    def observe(self, config: dict[str, int], vector: np.ndarray) -> None:
        raise NotImplementedError

    # -- persistence: Tune calls these on experiment checkpoints and on restore -------------
    def get_state(self) -> dict:
        state = dict(self.__dict__)
        state["rng"] = self.rng.bit_generator.state
        state.pop("space", None)
        return state

    def set_state(self, state: dict) -> None:
        rng_state = state.pop("rng")
        self.__dict__.update(state)
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = rng_state

    def save(self, checkpoint_path: str) -> None:
        directory = os.path.dirname(checkpoint_path) or "."
        with tempfile.NamedTemporaryFile("wb", dir=directory, delete=False) as f:
            pickle.dump(self.get_state(), f)
        os.replace(f.name, checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))


class RandomSearcher(MultiObjectiveSearcher):
    """Uniform random configs."""

    def _next_config(self):
        return self.space.sample(self.rng)

    def observe(self, config, vector):
        pass


class LocalSearcher(MultiObjectiveSearcher):
    """Local search with a Pareto archive; starts from the largest, smallest and middle configs."""

    def __init__(self, space: SearchSpace, objectives, modes="min", seed=0, **kwargs):
        super().__init__(space, objectives, modes, seed, **kwargs)
        self.initial = deque([space.largest(), space.smallest(), space.middle()])
        self.archive: list[tuple[dict[str, int], np.ndarray]] = []

    def _next_config(self):
        if self.initial:
            return self.initial.popleft()
        if not self.archive:  # initial configs still running: explore meanwhile
            return self.space.sample(self.rng)
        parent, _ = self.archive[self.rng.integers(len(self.archive))]
        return self.space.mutate(parent, self.rng)

    def observe(self, config, vector):
        points = np.array([v for _, v in self.archive] + [vector])
        keep = pareto.pareto_mask(points)
        entries = [*self.archive, (config, vector)]
        self.archive = [e for e, k in zip(entries, keep, strict=True) if k]


class MOREASearcher(MultiObjectiveSearcher):
    """Multi-objective regularised evolution.

    Until the population is full, configs are uniform samples. Then each child mutates one
    dimension of a parent: ``sample_size`` members are drawn without replacement and the parent
    is drawn uniformly (with the searcher's RNG) from the sample's non-dominated members, so
    every trade-off in the sample can be improved, not only the lowest-error one.

    Args:
        population_size: members kept; the oldest is dropped when a child arrives.
        sample_size: members drawn to pick a parent from.
    """

    def __init__(self, space: SearchSpace, objectives, modes="min", seed=0,
                 population_size: int = 20, sample_size: int = 5, **kwargs):
        super().__init__(space, objectives, modes, seed, **kwargs)
        if population_size < 2 or not 1 <= sample_size <= population_size:
            raise ValueError(
                f"need population_size >= 2 and 1 <= sample_size <= population_size, got "
                f"{population_size} and {sample_size}"
            )
        self.population_size, self.sample_size = population_size, sample_size
        self.population: deque = deque(maxlen=population_size)

    def _next_config(self):
        if len(self.population) < self.population_size:
            return self.space.sample(self.rng)
        members = list(self.population)
        picks = self.rng.choice(len(members), size=self.sample_size, replace=False)
        front = picks[pareto.pareto_mask(np.array([members[i][1] for i in picks]))]
        if len(front) == 0:  # every sampled vector has a NaN (possible after a warm start)
            front = picks
        parent = members[front[self.rng.integers(len(front))]][0]
        return self.space.mutate(parent, self.rng)

    def observe(self, config, vector):
        self.population.append((config, vector))


class NSGA2Searcher(OptunaSearch):
    """Optuna's NSGA-II through Ray's `OptunaSearch`, without re-evaluating a sub-network.

    NSGA-II's crossover and mutation often reproduce a parent (about one suggestion in ten
    over 1,000 evaluations). Each Optuna trial asked for is checked against the sub-networks
    already handed to Tune (`SearchSpace.to_sub_network`, so configs that select the same
    sub-network count as one):

    * already evaluated: the Optuna trial is told that sub-network's result (values and state)
      at once and never reaches Tune, so the study still counts it in its generation;
    * still in flight: the Optuna trial waits and is told the same outcome when the running
      trial completes;

    then Optuna is asked again. After `max_retries` duplicates in a row, an unseen config (a
    seeded uniform draw, or the first unseen one in the space when draws keep hitting seen
    ones) is enqueued in the study and asked for, so Optuna records it as its own trial. When
    every sub-network of the space has been handed out, `suggest` returns `FINISHED`.

    Args:
        space: the search space configs come from.
        objectives: result keys of the objectives.
        modes: "min"/"max" per objective (or one for all).
        seed: seed of the sampler and of the fallback draws.
        population_size: NSGA-II's population size per generation.
        initial: configs enqueued in the study, so they are its first trials.
    """

    max_retries = 50
    """Duplicates in a row after which an unseen config is enqueued."""
    max_draws = 200
    """Uniform draws for an unseen config before walking the space in order."""

    def __init__(self, space: SearchSpace, objectives, modes="min", seed=0,
                 population_size: int = 20, initial: Sequence[Mapping[str, int]] = (), **_):
        modes = list(modes) if not isinstance(modes, str) else [modes] * len(objectives)
        pareto.mode_signs(modes, len(objectives))  # checks them
        sampler = _PicklableNSGAII(population_size=population_size, seed=seed)
        super().__init__(space=self.convert_search_space(space.param_space()),
                         metric=list(objectives), mode=modes, sampler=sampler)
        self.space = space
        self.rng = np.random.default_rng(seed)
        self.outcomes: dict[Any, tuple[list | None, TrialState]] = {}
        """Sub-network -> (values, Optuna state) it was told, once its trial completed."""
        self.in_flight: dict[Any, str] = {}
        """Sub-network -> id of the Tune trial evaluating it."""
        self.waiting: dict[str, list] = {}
        """Tune trial id -> Optuna trials of the same sub-network, told when it completes."""
        for config in initial:
            self._ot_study.enqueue_trial(space.validate(config))

    def suggest(self, trial_id: str) -> dict[str, int] | str | None:
        """The next config whose sub-network has not been handed out; `FINISHED` when the
        space has none left."""
        if trial_id in self._ot_trials:
            return super().suggest(trial_id)
        for _ in range(self.max_retries):
            ot_trial = self._ot_study.ask(fixed_distributions=self._space)
            key = self.space.to_sub_network(ot_trial.params)
            if key in self.outcomes:
                self._tell(ot_trial, *self.outcomes[key])
            elif key in self.in_flight:
                self.waiting.setdefault(self.in_flight[key], []).append(ot_trial)
            else:
                return self._hand_out(trial_id, ot_trial, key)
        config = self._unseen_config()
        if config is None:
            log.info("nsga2: every sub-network of the space has been suggested")
            return Searcher.FINISHED
        self._ot_study.enqueue_trial(config)
        ot_trial = self._ot_study.ask(fixed_distributions=self._space)
        return self._hand_out(trial_id, ot_trial, self.space.to_sub_network(ot_trial.params))

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        """Tells Optuna the result, and the same outcome to the waiting duplicates."""
        if trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)  # logs a warning
        super().on_trial_complete(trial_id, result, error)
        key = self.space.to_sub_network(self._ot_trials[trial_id].params)
        if self.in_flight.get(key) == trial_id:
            del self.in_flight[key]
        values = [result.get(m) for m in self.metric] if result else None
        if values is not None and any(v is None for v in values):
            values = None
        state = _optuna_state(values, error)
        self.outcomes[key] = (values, state)
        for ot_trial in self.waiting.pop(trial_id, []):
            self._tell(ot_trial, values, state)

    def _hand_out(self, trial_id: str, ot_trial, key) -> dict[str, int]:
        self._ot_trials[trial_id] = ot_trial
        self.in_flight[key] = trial_id
        return super().suggest(trial_id)

    def _tell(self, ot_trial, values, state) -> None:
        try:
            self._ot_study.tell(ot_trial, values, state=state)
        except Exception as exc:  # as OptunaSearch does, e.g. for NaN values
            log.warning(exc)

    def _seen(self, config: dict[str, int]) -> bool:
        key = self.space.to_sub_network(config)
        return key in self.outcomes or key in self.in_flight

    def _unseen_config(self) -> dict[str, int] | None:
        for _ in range(self.max_draws):
            config = self.space.sample(self.rng)
            if not self._seen(config):
                return config
        ranges = [d.values for d in self.space.dims]
        for values in itertools.product(*ranges):
            config = {d.name: v for d, v in zip(self.space.dims, values, strict=True)}
            if not self._seen(config):
                return config
        return None


class _PicklableNSGAII(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II sampler, picklable again: Optuna 5.1 gave it a `threading.Lock`
    without a `__getstate__`, and Ray Tune pickles the searcher (when the Tuner starts, and in
    `save` on resume)."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


def _optuna_state(values: list | None, error: bool) -> TrialState:
    """Optuna's state for a trial outcome, as `OptunaSearch.on_trial_complete` decides it."""
    if values is not None:
        return TrialState.COMPLETE
    return TrialState.FAIL if error else TrialState.PRUNED


def make_searcher(name: str, space: SearchSpace, objectives, modes="min", seed=0, **kwargs):
    """Build the searcher registered as `name` (nas_prune.registry.SEARCHERS)."""
    cls = registry.load(registry.SEARCHERS, name, "searcher", SearchError)
    return cls(space, objectives, modes, seed, **kwargs)
