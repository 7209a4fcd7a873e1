"""Supernet training strategies: which sub-networks one training step updates (Klein et al.
2024, section 4.1; METHODS.md section 1).

===============  ==========================================================================
standard         the full network
random           k random sub-networks (k = `num_random`, default 1)
random_linear    a random sub-network with probability t/T (rising linearly), else the full one
sandwich         the full network, k random ones (default 2) and the smallest, one update
kd               like random, but each sub-network distils from the full network's detached
                 logits (nas_prune.train.kd_loss)
full             sandwich + in-place distillation (the authors' final choice)
largest_kd       the full network and k random ones (default 2) distilled from it in place: `full`
                 without the smallest sub-network, for budgeted runs (`supernet.budgets`) where
                 the smallest is far below every budget
===============  ==========================================================================

A strategy only plans: it returns the step's `Pass`es; nas_prune.train runs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from nas_prune import registry
from nas_prune.errors import TrainingError

if TYPE_CHECKING:
    from nas_prune.space import SearchSpace
    from nas_prune.supernet import SubNetwork


@dataclass
class StepContext:
    """What a strategy needs to plan one training step."""

    space: SearchSpace | None
    rng: np.random.Generator
    step: int
    total_steps: int
    sample: Callable[[np.random.Generator], SubNetwork] | None = None
    """Draws the step's random sub-networks (nas_prune.train.budget_sampler); None: uniformly
    from `space`."""


@dataclass(frozen=True)
class Pass:
    """One forward/backward of a step: which sub-network, and whether it distils."""

    sub: SubNetwork | None  # None: the full network
    distil: bool = False


class Strategy:
    """Which sub-networks one training step updates (METHODS.md section 1)."""

    name: str
    kd = False

    def __init__(self, num_random: int | None = None, temperature: float = 1.0):
        self.num_random = self.default_random if num_random is None else int(num_random)
        if self.num_random < 1 and self.default_random > 0:
            raise TrainingError(f"{self.name}: num_random must be >= 1, got {self.num_random}")
        if temperature <= 0:
            raise TrainingError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    default_random = 0

    @property
    def passes_per_step(self) -> int:
        raise NotImplementedError

    def plan(self, ctx: StepContext) -> list[Pass]:
        raise NotImplementedError

    def _random(self, ctx: StepContext) -> SubNetwork:
        if ctx.sample is not None:
            return ctx.sample(ctx.rng)
        return ctx.space.to_sub_network(ctx.space.sample(ctx.rng))


class Standard(Strategy):
    name = "standard"

    @property
    def passes_per_step(self) -> int:
        return 1

    def plan(self, ctx):
        return [Pass(None)]


class Random(Strategy):
    name = "random"
    default_random = 1

    @property
    def passes_per_step(self) -> int:
        return self.num_random

    def plan(self, ctx):
        return [Pass(self._random(ctx), distil=self.kd) for _ in range(self.num_random)]


class RandomLinear(Strategy):
    name = "random_linear"

    @property
    def passes_per_step(self) -> int:
        return 1

    def plan(self, ctx):
        p = ctx.step / max(1, ctx.total_steps - 1)
        return [Pass(self._random(ctx) if ctx.rng.random() < p else None)]


class Sandwich(Strategy):
    name = "sandwich"
    default_random = 2
    with_smallest = True

    @property
    def passes_per_step(self) -> int:
        return self.num_random + 1 + self.with_smallest

    def plan(self, ctx):
        randoms = [Pass(self._random(ctx), distil=self.kd) for _ in range(self.num_random)]
        if not self.with_smallest:
            return [Pass(None), *randoms]
        smallest = ctx.space.to_sub_network(ctx.space.smallest())
        return [Pass(None), *randoms, Pass(smallest, distil=self.kd)]


class KD(Random):
    name = "kd"
    kd = True


class Full(Sandwich):
    name = "full"
    kd = True


class LargestKD(Full):
    name = "largest_kd"
    with_smallest = False


def make_strategy(name: str, num_random: int | None = None, temperature: float = 1.0
                  ) -> Strategy:
    """The strategy registered as `name` (nas_prune.registry.STRATEGIES)."""
    cls = registry.load(registry.STRATEGIES, name, "strategy", TrainingError)
    return cls(num_random=num_random, temperature=temperature)
