"""Multi-objective searchers over sub-network configs, as Ray Tune `Searcher`s.

* `random`: uniform samples of the search space.
* `local`: local search with a Pareto archive (Klein et al. 2024): the first suggestions are the
  largest, the smallest and the middle config; afterwards a random archive member with exactly
  one dimension re-sampled.
* `morea`: multi-objective regularised evolution (Real et al. 2019, multi-objective as in
  syne-tune): a fixed-size population ages out its oldest member; each child mutates the best
  of a random sample, "best" meaning lowest multi-objective rank (non-dominated sort, then
  epsilon-net spread).
* `nsga2`: Optuna's NSGA-II sampler through Ray's `OptunaSearch`.

All are seeded: the same seed, space and results give the same suggestions. Every searcher
minimises each objective after the sign flip of its mode, done once in the constructor.
Only results at full fidelity (the last report of a trial that was not stopped early) enter the
archives, so the searchers combine with MO-ASHA's early stopping.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from ray.tune.search import Searcher

from nas_prune.search import pareto
from nas_prune.space import SearchSpace

log = logging.getLogger(__name__)


def _signs(objectives: Sequence[str], modes: Sequence[str] | str) -> np.ndarray:
    if isinstance(modes, str):
        modes = [modes] * len(objectives)
    if len(modes) != len(objectives):
        raise ValueError(f"{len(objectives)} objectives but {len(modes)} modes")
    bad = [m for m in modes if m not in ("min", "max")]
    if bad:
        raise ValueError(f"modes must be 'min' or 'max', got {bad}")
    return np.array([1.0 if m == "min" else -1.0 for m in modes])


class MultiObjectiveSearcher(Searcher):
    """Shared plumbing: objectives and signs, seeded RNG, full-fidelity filtering, save/restore.

    Args:
        space: the search space configs come from.
        objectives: result keys to minimise (after the sign of `modes`).
        modes: "min"/"max" per objective (or one for all).
        seed: seed of every random choice.
        fidelity_attr: result key holding the fidelity (e.g. validation examples seen).
        max_fidelity: fidelity of a complete evaluation; lower ones are not archived.
    """

    def __init__(
        self,
        space: SearchSpace,
        objectives: Sequence[str],
        modes: Sequence[str] | str = "min",
        seed: int = 0,
        fidelity_attr: str = "fidelity",
        max_fidelity: float | None = None,
    ):
        self._signs = _signs(objectives, modes)
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

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the space and objectives were given to the constructor

    def suggest(self, trial_id: str) -> dict[str, int] | None:
        """The next config; one that selects an already suggested sub-network (e.g. any
        width with 0 layers) is drawn again, up to `max_retries` times."""
        for _ in range(self.max_retries):
            config = self._next_config()
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
            self._observe(config, vector)

    def _observe(self, config: dict[str, int], vector: np.ndarray) -> None:
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

    def _observe(self, config, vector):
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

    def _observe(self, config, vector):
        points = np.array([v for _, v in self.archive] + [vector])
        keep = pareto.pareto_mask(points)
        entries = [*self.archive, (config, vector)]
        self.archive = [e for e, k in zip(entries, keep, strict=True) if k]


class MOREASearcher(MultiObjectiveSearcher):
    """Multi-objective regularised evolution.

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
        ranks = pareto.rank(np.array([members[i][1] for i in picks]))
        parent = members[picks[int(np.argmin(ranks))]][0]
        return self.space.mutate(parent, self.rng)

    def _observe(self, config, vector):
        self.population.append((config, vector))


def _nsga2(space: SearchSpace, objectives, modes="min", seed=0, population_size=20, **_):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    modes = list(modes) if not isinstance(modes, str) else [modes] * len(objectives)
    _signs(objectives, modes)
    sampler = optuna.samplers.NSGAIISampler(population_size=population_size, seed=seed)
    return OptunaSearch(space=space.param_space(), metric=list(objectives), mode=modes,
                        sampler=sampler)


SEARCHERS: dict[str, Callable[..., Searcher]] = {
    "random": RandomSearcher,
    "local": LocalSearcher,
    "morea": MOREASearcher,
    "nsga2": _nsga2,
}
"""Searchers by name (factories; Optuna is imported only when `nsga2` is used)."""

EARLY_STOPPING_OK = {"random", "local", "morea"}
"""Searchers that can run under MO-ASHA. NSGA-II is not among them: Optuna's multi-objective
studies cannot take pruned (early-stopped) trials, and each generation needs complete ones."""


def make_searcher(name: str, space: SearchSpace, objectives, modes="min", seed=0, **kwargs):
    """Build searcher `name`; see SEARCHERS."""
    if name not in SEARCHERS:
        raise ValueError(f"unknown searcher {name!r}; choose one of {', '.join(SEARCHERS)}")
    return SEARCHERS[name](space, objectives, modes, seed, **kwargs)
