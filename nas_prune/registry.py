"""Everything a user picks by name, and where it lives (a lazy registry, like Ray Tune's
``SEARCH_ALG_IMPORT``).

Each registry maps a name to ``"module:attribute"`` (or a module, for baselines); :func:`load`
imports it only when it is used, so validating options and building the CLI's choice lists never
imports torch or Ray, and one method's dependencies never burden another. These dicts are the
only lists of names: the option dataclasses validate against them, the CLI's choices come from
them, and the factories (``make_space``, ``make_searcher``, ...) resolve through them.
"""

from __future__ import annotations

import importlib
from typing import Any

from nas_prune.errors import NasPruneError

STRATEGIES: dict[str, str] = {
    "standard": "nas_prune.strategies:Standard",
    "random": "nas_prune.strategies:Random",
    "random_linear": "nas_prune.strategies:RandomLinear",
    "sandwich": "nas_prune.strategies:Sandwich",
    "kd": "nas_prune.strategies:KD",
    "full": "nas_prune.strategies:Full",
    "largest_kd": "nas_prune.strategies:LargestKD",
}
"""Supernet training strategies (METHODS.md section 1)."""

SPACES: dict[str, str] = {
    "small": "nas_prune.space:SmallSpace",
    "medium": "nas_prune.space:MediumSpace",
    "layer": "nas_prune.space:LayerSpace",
    "large": "nas_prune.space:LargeSpace",
    "decoder_small": "nas_prune.space:DecoderSmallSpace",
    "decoder_medium": "nas_prune.space:DecoderMediumSpace",
    "decoder_middle": "nas_prune.space:DecoderMiddleSpace",
}
"""Search spaces over sub-networks. `small` and `medium` also come with the hidden size as a
dimension: the name with HIDDEN_SUFFIX, e.g. ``small+hidden``."""

HIDDEN_SUFFIX = "+hidden"
"""Appended to a space name: the space also searches the hidden (embedding) size."""

SEARCHERS: dict[str, str] = {
    "random": "nas_prune.search.searchers:RandomSearcher",
    "local": "nas_prune.search.searchers:LocalSearcher",
    "morea": "nas_prune.search.searchers:MOREASearcher",
    "nsga2": "nas_prune.search.searchers:NSGA2Searcher",
}
"""Ray Tune searchers (factories taking space, objectives, modes, seed)."""

EARLY_STOPPING_OK = ("random", "local", "morea")
"""Searchers that can run under MO-ASHA. NSGA-II is not among them: Optuna's multi-objective
studies cannot take pruned (early-stopped) trials, and each generation needs complete ones."""

SCHEDULERS: dict[str, str | None] = {
    "fifo": None,  # Tune's default: every trial runs to max_t
    "moasha": "nas_prune.search.moasha:MOASHA",
}
"""Ray Tune trial schedulers."""

BASELINES: dict[str, str] = {
    "pins": "nas_prune.baselines.pins",
    "grain": "nas_prune.baselines.grain",
    "layer_drop": "nas_prune.baselines.layer_drop",
    "llm_pruner": "nas_prune.baselines.llm_pruner",
}
"""Published pruning methods (modules with ``Options`` and ``run``)."""

POOLINGS = ("cls", "mean")
"""What the classification head reads: the first token or the mean of the tokens."""


def check_space(name: str, error: type[NasPruneError] = NasPruneError) -> str:
    """`name` if it names a space (with or without HIDDEN_SUFFIX), else `error`."""
    base = name.removesuffix(HIDDEN_SUFFIX)
    check(SPACES, base, "space", error)
    if name != base and base not in ("small", "medium", "decoder_small", "decoder_medium",
                                     "decoder_middle"):
        raise error(f"the {base} space has no hidden dimension; use small{HIDDEN_SUFFIX} or "
                    f"medium{HIDDEN_SUFFIX} (decoder_small, decoder_medium, decoder_middle "
                    "likewise)")
    return name


def check(registry: dict[str, Any] | tuple[str, ...], name: str, what: str,
          error: type[NasPruneError] = NasPruneError) -> str:
    """`name` if `registry` has it, else `error` naming the choices."""
    if name not in registry:
        raise error(f"unknown {what} {name!r}; choose one of {', '.join(registry)}")
    return name


def load(registry: dict[str, str], name: str, what: str,
         error: type[NasPruneError] = NasPruneError) -> Any:
    """Import and return what `registry` maps `name` to (a module for ``"module"`` entries)."""
    target = registry[check(registry, name, what, error)]
    module, _, attribute = target.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attribute) if attribute else loaded
