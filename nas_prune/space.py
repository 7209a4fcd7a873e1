"""Search spaces over sub-networks (Klein et al. 2024, section 3).

A *config* is a flat ``dict[str, int]`` (what Ray Tune samples and what the results store
flattens into columns); a space turns it into the `SubNetwork` the supernet selects. Every space
is a product of integer ranges (`Dim`), so sampling, one-dimension mutation (local search), the
largest / smallest / middle configs and the Ray Tune ``param_space`` are written once here;
each space says only what its dimensions are and what a config keeps.

For a model with L layers, H heads and F FFN neurons per layer:

========  ============================================================  =========
space     config                                                        dims
========  ============================================================  =========
small     num_layers in [0, L], num_heads in [1, H], num_units in        3
          [1, F]; the same for every kept layer (the first num_layers)
medium    heads_i in [0, H], units_i in [0, F] per layer; 0 removes       2L
          that block
layer     layer_i in {0, 1}: keep or drop layer i                        L
large     head_i_j, unit_i_k in {0, 1}: one bit per head and neuron       L(H+F)
========  ============================================================  =========

The small and medium spaces can also search the hidden size (``for_model(..., hidden=True)``,
``make_space(..., hidden=True)``): one more dimension, ``hidden`` in {s, 2s, ..., d} for a
model with d hidden channels and a step s (HIDDEN_STEP = 8 by default), the number of hidden
(embedding) channels kept, the first ones after importance sorting. Without the flag the spaces
are what they were.

For a Llama-family decoder (nas_prune.decoder) with L layers, K key/value heads (GQA groups),
G query heads per group and F MLP neurons per layer:

==============  ====================================================  =========
space           config                                                dims
==============  ====================================================  =========
decoder_small   num_layers in [0, L], kv_heads in [1, K],              4
                queries_per_kv in [1, G], units in [1, F]; the same
                for every kept layer (the first num_layers)
decoder_medium  kv_heads_i in [0, K], queries_per_kv_i in [1, G],      3L
                units_i in [0, F] per layer; kv_heads_i 0 removes the
                attention block (queries_per_kv_i is then ignored),
                units_i 0 the MLP block, both the layer
decoder_middle  kv_heads in [1, K], queries_per_kv in [1, G], units    5
                in [1, F] for every layer but the first whole_first
                and the last whole_last (each in [0, max(1, L // 4)]),
                which stay whole
==============  ====================================================  =========

Both take the hidden dimension the same way, in steps of HIDDEN_STEP (8) channels by default:
the decoder's head size is fixed, so any multiple of 8 is a legal width. A uniform
decoder_small sub-network exports as a stock Llama checkpoint only when its hidden width is also
a multiple of its query head count (transformers' LlamaConfig requires it; Qwen2's does not);
`nas_prune.export.export_decoder` uses our class otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from nas_prune import registry
from nas_prune.decoder import DecoderConfig, DecoderSubNetwork
from nas_prune.decoder_loading import config_from_hf
from nas_prune.errors import SearchSpaceError
from nas_prune.supernet import IllegalSubNetworkError, SubNetwork

Config = dict[str, int]

HIDDEN_STEP = 8
"""Default step of the hidden dimension: multiples of 8 channels keep the matrix shapes aligned
for vectorised and tensor-core kernels (any head count fits: the head size does not change)."""


@dataclass(frozen=True)
class Dim:
    """One integer dimension of a search space: low, low + step, ..., high (both included)."""

    name: str
    low: int
    high: int
    step: int = 1
    """Distance between neighbouring values; with a step above 1 both ends are multiples of it
    (Ray Tune's ``qrandint`` draws multiples of the step)."""

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise SearchSpaceError(
                f"range of {self.name!r} is empty: low {self.low} > high {self.high}; "
                "give bounds with low <= high"
            )
        if self.step < 1 or (self.step > 1 and (self.low % self.step or self.high % self.step)):
            raise SearchSpaceError(
                f"range [{self.low}, {self.high}] of {self.name!r} does not fit its step "
                f"{self.step}; give bounds that are multiples of {self.step}"
            )

    @property
    def size(self) -> int:
        """Number of values."""
        return (self.high - self.low) // self.step + 1

    @property
    def values(self) -> range:
        """Every value, in increasing order."""
        return range(self.low, self.high + 1, self.step)


class SearchSpace:
    """A product of integer ranges whose configs map to sub-networks of one model shape.

    Args:
        num_layers: layers of the full model (L).
        num_heads: attention heads per layer (H).
        num_units: FFN neurons per layer (F).
        bounds: optional narrower ranges, ``{dim name: (low, high)}``, inside the defaults.
        hidden_size: hidden channels of the model; given, the space also searches ``hidden``,
            the number of channels kept, in multiples of `hidden_step` (small and medium only).
        hidden_step: step of the hidden dimension; it must divide `hidden_size`.
    """

    name: ClassVar[str]
    supports_hidden: ClassVar[bool] = False
    """Whether the space can add the ``hidden`` dimension."""

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        num_units: int,
        bounds: Mapping[str, tuple[int, int]] | None = None,
        hidden_size: int | None = None,
        hidden_step: int = HIDDEN_STEP,
    ):
        if min(num_layers, num_heads, num_units) < 1:
            raise SearchSpaceError(
                f"model shape must be positive, got layers={num_layers}, heads={num_heads}, "
                f"units={num_units}"
            )
        self.num_layers, self.num_heads, self.num_units = num_layers, num_heads, num_units
        self._set_dims(bounds, hidden_size, hidden_step)

    def _set_dims(self, bounds: Mapping[str, tuple[int, int]] | None, hidden_size: int | None,
                  hidden_step: int) -> None:
        """Build `dims` from `_default_dims`, the optional hidden dimension and `bounds`
        (the model's shape is already set)."""
        self.hidden_size = hidden_size
        dims = {d.name: d for d in self._default_dims()}
        if hidden_size is not None:
            if not self.supports_hidden:
                raise SearchSpaceError(
                    f"the {self.name} space has no hidden dimension; use the small or medium "
                    "space to search the hidden size"
                )
            if hidden_step < 1 or hidden_size % hidden_step:
                raise SearchSpaceError(
                    f"hidden_step {hidden_step} does not divide the hidden size {hidden_size}; "
                    "choose a step that does (e.g. 8, or 1 for any width)"
                )
            dims["hidden"] = Dim("hidden", hidden_step, hidden_size, hidden_step)
        for key, value in (bounds or {}).items():
            if key not in dims:
                raise SearchSpaceError(
                    f"unknown dimension {key!r} for the {self.name} space; "
                    f"its dimensions are {_preview(list(dims))}"
                )
            low, high = (int(v) for v in value)
            full = dims[key]
            if low > high:
                raise SearchSpaceError(
                    f"bounds for {key!r} are inverted: ({low}, {high}); give (low, high)"
                )
            if low < full.low or high > full.high:
                raise SearchSpaceError(
                    f"bounds for {key!r} ({low}, {high}) leave the model's range "
                    f"[{full.low}, {full.high}]"
                )
            dims[key] = Dim(key, low, high, full.step)
        self.dims: list[Dim] = list(dims.values())
        self._index = {d.name: d for d in self.dims}

    @classmethod
    def for_model(cls, model_config: Any, bounds=None, hidden: bool = False,
                  hidden_step: int = HIDDEN_STEP) -> SearchSpace:
        """The space for a supernet's `EncoderConfig`; with `hidden`, it also searches the
        hidden size in steps of `hidden_step` channels."""
        return cls(
            model_config.num_hidden_layers,
            model_config.num_attention_heads,
            model_config.intermediate_size,
            bounds,
            hidden_size=model_config.hidden_size if hidden else None,
            hidden_step=hidden_step,
        )

    # -- what each space defines ------------------------------------------------------------
    def _default_dims(self) -> list[Dim]:
        raise NotImplementedError

    def _sub_network(self, config: Config) -> SubNetwork:
        raise NotImplementedError

    def middle(self) -> Config:
        """The config halfway between smallest and largest in every dimension."""
        return {d.name: d.low + d.step * (d.size // 2) for d in self.dims}

    # -- shared -----------------------------------------------------------------------------
    def validate(self, config: Mapping[str, int]) -> Config:
        """Return `config` as a clean dict, or raise IllegalSubNetworkError naming the problem."""
        missing = [d.name for d in self.dims if d.name not in config]
        extra = [k for k in config if k not in self._index]
        if missing or extra:
            raise IllegalSubNetworkError(
                f"config does not fit the {self.name} space: missing {_preview(missing)}, "
                f"unknown {_preview(extra)}"
            )
        clean = {}
        for d in self.dims:
            value = int(config[d.name])
            if not d.low <= value <= d.high:
                raise IllegalSubNetworkError(
                    f"{d.name}={value} is outside [{d.low}, {d.high}] of the {self.name} space"
                )
            if (value - d.low) % d.step:
                raise IllegalSubNetworkError(
                    f"{d.name}={value} is not one of {d.low}, {d.low + d.step}, ..., {d.high} "
                    f"(steps of {d.step}) in the {self.name} space"
                )
            clean[d.name] = value
        return clean

    def to_sub_network(self, config: Mapping[str, int]) -> SubNetwork:
        """The supernet selection for `config`."""
        config = self.validate(config)
        sub = self._sub_network(config)
        return replace(sub, hidden=config["hidden"]) if "hidden" in config else sub

    def sample(self, rng: np.random.Generator) -> Config:
        """A config drawn uniformly from each dimension."""
        lows = np.array([d.low for d in self.dims])
        steps = np.array([d.step for d in self.dims])
        sizes = np.array([d.size for d in self.dims])
        values = lows + steps * rng.integers(0, sizes)
        return {d.name: int(v) for d, v in zip(self.dims, values, strict=True)}

    def sample_within(self, rng: np.random.Generator, size: Callable[[Config], float],
                      low: float, high: float, n: int, tries: int = 20_000) -> list[Config]:
        """Up to `n` configs of distinct sub-networks, drawn uniformly from the space, whose
        `size` (e.g. params ratio) lies in (low, high]: rejection sampling, so fewer when
        `tries` draws find fewer. A search that must deliver a model at a budget starts from
        these: with 60 trials, local search on decoder_middle found nothing good at 0.5 of the
        parameters (best one-shot validation perplexity 695) where configs filled to the
        budget reach 212 (benchmarks/README.md)."""
        found: dict[Any, Config] = {}
        for _ in range(tries):
            if len(found) >= n:
                break
            config = self.sample(rng)
            if low < size(config) <= high:
                found.setdefault(self.to_sub_network(config), config)
        return list(found.values())

    def sample_below(self, rng: np.random.Generator, model: Any, budget: float, band: float,
                     n: int, tries: int = 20_000) -> list[Config]:
        """`sample_within` on the params ratio of `model` (anything with ``num_params(sub)``,
        e.g. the supernet or its meta-device twin): configs with ratio in
        (budget - band, budget]."""
        full = model.num_params()
        return self.sample_within(rng, lambda c: model.num_params(self.to_sub_network(c)) / full,
                                  budget - band, budget, n, tries)

    def mutate(self, config: Mapping[str, int], rng: np.random.Generator) -> Config:
        """`config` with exactly one dimension re-sampled to a different value (local search)."""
        config = self.validate(config)
        free = [d for d in self.dims if d.high > d.low]
        if not free:
            raise SearchSpaceError(f"every dimension of the {self.name} space is fixed")
        d = free[rng.integers(len(free))]
        other = int(rng.integers(0, d.size - 1))  # the index of one of the other values
        index = (config[d.name] - d.low) // d.step
        config[d.name] = d.low + d.step * (other if other < index else other + 1)
        return config

    def largest(self) -> Config:
        return {d.name: d.high for d in self.dims}

    def smallest(self) -> Config:
        return {d.name: d.low for d in self.dims}

    def param_space(self) -> dict[str, Any]:
        """Ray Tune ``param_space``: one ``tune.randint`` per dimension (``tune.qrandint`` for
        a dimension with a step)."""
        from ray import tune

        return {d.name: tune.randint(d.low, d.high + 1) if d.step == 1 else
                tune.qrandint(d.low, d.high, d.step) for d in self.dims}

    def __len__(self) -> int:
        return len(self.dims)

    def __repr__(self) -> str:
        hidden = "" if self.hidden_size is None else f", hidden={self.hidden_size}"
        return (
            f"{type(self).__name__}(layers={self.num_layers}, heads={self.num_heads}, "
            f"units={self.num_units}{hidden}, dims={len(self.dims)})"
        )


def _preview(names: list[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return f"[{shown}{', ...' if len(names) > n else ''}]" if names else "[]"


class SmallSpace(SearchSpace):
    """The same number of heads and neurons in each of the first `num_layers` layers."""

    name = "small"
    supports_hidden = True

    def _default_dims(self) -> list[Dim]:
        return [
            Dim("num_layers", 0, self.num_layers),
            Dim("num_heads", 1, self.num_heads),
            Dim("num_units", 1, self.num_units),
        ]

    def _sub_network(self, config: Config) -> SubNetwork:
        return SubNetwork.uniform(
            self.num_layers, config["num_layers"], config["num_heads"], config["num_units"]
        )


class MediumSpace(SearchSpace):
    """Heads and neurons chosen per layer; 0 removes the attention or FFN block."""

    name = "medium"
    supports_hidden = True

    def _default_dims(self) -> list[Dim]:
        layers = range(self.num_layers)
        return [Dim(f"heads_{i}", 0, self.num_heads) for i in layers] + [
            Dim(f"units_{i}", 0, self.num_units) for i in layers
        ]

    def _sub_network(self, config: Config) -> SubNetwork:
        layers = range(self.num_layers)
        return SubNetwork(
            heads=tuple(config[f"heads_{i}"] for i in layers),
            units=tuple(config[f"units_{i}"] for i in layers),
        )


class LayerSpace(SearchSpace):
    """Keep or drop each whole layer."""

    name = "layer"

    def _default_dims(self) -> list[Dim]:
        return [Dim(f"layer_{i}", 0, 1) for i in range(self.num_layers)]

    def _sub_network(self, config: Config) -> SubNetwork:
        keep = [config[f"layer_{i}"] for i in range(self.num_layers)]
        return SubNetwork(
            heads=tuple(self.num_heads * k for k in keep),
            units=tuple(self.num_units * k for k in keep),
        )

    def middle(self) -> Config:
        """The first half of the layers (rounded up)."""
        half = (self.num_layers + 1) // 2
        return {d.name: min(d.high, max(d.low, int(i < half))) for i, d in enumerate(self.dims)}


class LargeSpace(SearchSpace):
    """One bit per attention head and per FFN neuron (any subset, not only prefixes)."""

    name = "large"

    def _default_dims(self) -> list[Dim]:
        dims = []
        for i in range(self.num_layers):
            dims += [Dim(f"head_{i}_{j}", 0, 1) for j in range(self.num_heads)]
            dims += [Dim(f"unit_{i}_{k}", 0, 1) for k in range(self.num_units)]
        return dims

    def _sub_network(self, config: Config) -> SubNetwork:
        layers = range(self.num_layers)
        return SubNetwork(
            heads=tuple(
                tuple(j for j in range(self.num_heads) if config[f"head_{i}_{j}"]) for i in layers
            ),
            units=tuple(
                tuple(k for k in range(self.num_units) if config[f"unit_{i}_{k}"]) for i in layers
            ),
        )

    def middle(self) -> Config:
        """The first half of every layer's heads and neurons (rounded up)."""
        config = {}
        for d in self.dims:
            kind, _, index = d.name.split("_")
            half = ((self.num_heads if kind == "head" else self.num_units) + 1) // 2
            config[d.name] = min(d.high, max(d.low, int(int(index) < half)))
        return config


class DecoderSearchSpace(SearchSpace):
    """A product of integer ranges whose configs map to sub-networks of one decoder shape
    (`nas_prune.decoder.DecoderSubNetwork`).

    Args:
        num_layers: layers of the full model (L).
        num_kv_heads: key/value heads (GQA groups) per layer (K).
        queries_per_group: query heads per key/value head (G).
        num_units: MLP neurons per layer (F).
        bounds: optional narrower ranges, ``{dim name: (low, high)}``, inside the defaults.
        hidden_size: hidden channels of the model; given, the space also searches ``hidden``,
            the number of channels kept, in multiples of `hidden_step`.
        hidden_step: step of the hidden dimension; it must divide `hidden_size`.
    """

    supports_hidden = True

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        queries_per_group: int,
        num_units: int,
        bounds: Mapping[str, tuple[int, int]] | None = None,
        hidden_size: int | None = None,
        hidden_step: int = HIDDEN_STEP,
    ):
        if min(num_layers, num_kv_heads, queries_per_group, num_units) < 1:
            raise SearchSpaceError(
                f"decoder shape must be positive, got layers={num_layers}, "
                f"kv_heads={num_kv_heads}, queries_per_kv={queries_per_group}, "
                f"units={num_units}"
            )
        self.num_layers, self.num_units = num_layers, num_units
        self.num_kv_heads, self.queries_per_group = num_kv_heads, queries_per_group
        self.num_heads = num_kv_heads * queries_per_group
        """Query heads per layer of the full model."""
        self._set_dims(bounds, hidden_size, hidden_step)

    @classmethod
    def for_model(cls, model_config: Any, bounds=None, hidden: bool = False,
                  hidden_step: int = HIDDEN_STEP) -> DecoderSearchSpace:
        """The space for a decoder supernet's `DecoderConfig` (or the transformers Llama / Qwen2
        config it is built from); with `hidden`, it also searches the hidden size in steps of
        `hidden_step` channels."""
        if not isinstance(model_config, DecoderConfig):
            try:
                model_config = config_from_hf(model_config)
            except ValueError as error:
                raise SearchSpaceError(f"the {cls.name} space is for decoders: {error}") from None
        c = model_config
        if any(v is not None for v in (c.layer_kv_heads, c.layer_queries_per_kv, c.layer_units)):
            raise SearchSpaceError(
                f"the {cls.name} space needs the full supernet's config, not an extracted "
                "sub-network's (it has per-layer shapes); build it from the supernet"
            )
        return cls(c.num_hidden_layers, c.num_key_value_heads, c.queries_per_group,
                   c.intermediate_size, bounds,
                   hidden_size=c.hidden_size if hidden else None, hidden_step=hidden_step)

    def to_sub_network(self, config: Mapping[str, int]) -> DecoderSubNetwork:
        """The decoder supernet selection for `config` (hidden None: all channels)."""
        return super().to_sub_network(config)

    def __repr__(self) -> str:
        hidden = "" if self.hidden_size is None else f", hidden={self.hidden_size}"
        return (
            f"{type(self).__name__}(layers={self.num_layers}, kv_heads={self.num_kv_heads}, "
            f"queries_per_kv={self.queries_per_group}, units={self.num_units}{hidden}, "
            f"dims={len(self.dims)})"
        )


class DecoderSmallSpace(DecoderSearchSpace):
    """The same KV heads, queries per KV head and MLP neurons in each of the first `num_layers`
    layers: every sub-network has a stock Llama / Qwen2 shape."""

    name = "decoder_small"

    def _default_dims(self) -> list[Dim]:
        return [
            Dim("num_layers", 0, self.num_layers),
            Dim("kv_heads", 1, self.num_kv_heads),
            Dim("queries_per_kv", 1, self.queries_per_group),
            Dim("units", 1, self.num_units),
        ]

    def _sub_network(self, config: Config) -> DecoderSubNetwork:
        return DecoderSubNetwork.uniform(self.num_layers, config["num_layers"],
                                         config["kv_heads"], config["queries_per_kv"],
                                         config["units"])


class DecoderMediumSpace(DecoderSearchSpace):
    """KV heads, queries per KV head and MLP neurons chosen per layer; 0 KV heads removes the
    attention block, 0 units the MLP block."""

    name = "decoder_medium"

    def _default_dims(self) -> list[Dim]:
        layers = range(self.num_layers)
        return ([Dim(f"kv_heads_{i}", 0, self.num_kv_heads) for i in layers]
                + [Dim(f"queries_per_kv_{i}", 1, self.queries_per_group) for i in layers]
                + [Dim(f"units_{i}", 0, self.num_units) for i in layers])

    def _sub_network(self, config: Config) -> DecoderSubNetwork:
        layers = range(self.num_layers)
        kv = tuple(config[f"kv_heads_{i}"] for i in layers)
        return DecoderSubNetwork(
            kv_heads=kv,
            queries_per_kv=tuple(config[f"queries_per_kv_{i}"] if kv[i] else 0 for i in layers),
            units=tuple(config[f"units_{i}"] for i in layers),
        )


class DecoderMiddleSpace(DecoderSearchSpace):
    """The same KV heads, queries per KV head and MLP neurons in every layer but the first
    `whole_first` and the last `whole_last`, which stay whole: LLM-Pruner's finding (Ma et al.
    2023) that the first and last layers suffer most from pruning, as two searched dimensions.
    Measured one-shot on SmolLM2-135M (activation-rewired, 48 validation blocks of 64 tokens):
    one KV group and 42% of the MLP neurons removed from layers 4..27 keeps 0.750 of the
    parameters at perplexity 96.3; one KV group and a third of the neurons removed from every
    layer keeps 0.737 at 139.9. Sub-networks with whole ends have two layer shapes, so they
    export with our model class, not as a stock Llama checkpoint."""

    name = "decoder_middle"

    def _default_dims(self) -> list[Dim]:
        ends = min(self.num_layers, max(1, self.num_layers // 4))
        return [
            Dim("kv_heads", 1, self.num_kv_heads),
            Dim("queries_per_kv", 1, self.queries_per_group),
            Dim("units", 1, self.num_units),
            Dim("whole_first", 0, ends),
            Dim("whole_last", 0, ends),
        ]

    def _sub_network(self, config: Config) -> DecoderSubNetwork:
        total = self.num_layers
        middle = range(config["whole_first"], total - config["whole_last"])

        def per_layer(pruned: int, whole: int) -> tuple[int, ...]:
            return tuple(pruned if i in middle else whole for i in range(total))

        return DecoderSubNetwork(
            kv_heads=per_layer(config["kv_heads"], self.num_kv_heads),
            queries_per_kv=per_layer(config["queries_per_kv"], self.queries_per_group),
            units=per_layer(config["units"], self.num_units),
        )


def make_space(name: str, model_config: Any, bounds=None, hidden: bool = False,
               hidden_step: int = HIDDEN_STEP) -> SearchSpace:
    """The search space `name` (nas_prune.registry.SPACES) for a supernet with config
    `model_config`; with `hidden` (small and medium spaces), it also searches the hidden size
    in steps of `hidden_step` channels. For a decoder, small and medium mean decoder_small and
    decoder_medium."""
    from nas_prune.models import family_space

    registry.check_space(name, SearchSpaceError)
    name = family_space(model_config, name)  # small -> decoder_small for a decoder
    base = name.removesuffix(registry.HIDDEN_SUFFIX)
    cls = registry.load(registry.SPACES, base, "search space", SearchSpaceError)
    return cls.for_model(model_config, bounds, hidden=hidden or base != name,
                         hidden_step=hidden_step)
