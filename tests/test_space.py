"""Tests for nas_prune.space: dimensions, sampling, mutation, special configs, the mapping to
sub-networks, validation, bounds and the Ray Tune parameter space."""

from __future__ import annotations

import numpy as np
import pytest

from nas_prune import registry
from nas_prune.space import (
    Dim,
    LargeSpace,
    LayerSpace,
    MediumSpace,
    SearchSpace,
    SearchSpaceError,
    SmallSpace,
    make_space,
)
from nas_prune.supernet import (
    EncoderConfig,
    EncoderForSequenceClassification,
    IllegalSubNetworkError,
    SubNetwork,
)

L, H, F = 3, 4, 48
ALL_SPACES = [SmallSpace, MediumSpace, LayerSpace, LargeSpace]


@pytest.fixture(scope="module")
def supernet() -> EncoderForSequenceClassification:
    config = EncoderConfig(vocab_size=100, hidden_size=32, num_hidden_layers=L,
                           num_attention_heads=H, head_dim=8, intermediate_size=F,
                           max_position_embeddings=64, num_labels=2)
    return EncoderForSequenceClassification(config).eval()


def _ranges(space: SearchSpace) -> dict[str, tuple[int, int]]:
    return {d.name: (d.low, d.high) for d in space.dims}


# ------------------------------------------------------------------------------- dimensions


def test_small_space_dims():
    space = SmallSpace(L, H, F)
    assert _ranges(space) == {"num_layers": (0, 3), "num_heads": (1, 4), "num_units": (1, 48)}
    assert len(space) == 3


def test_medium_space_dims():
    space = MediumSpace(L, H, F)
    expected = {f"heads_{i}": (0, H) for i in range(L)} | {f"units_{i}": (0, F) for i in range(L)}
    assert _ranges(space) == expected
    assert len(space) == 6


def test_layer_space_dims():
    space = LayerSpace(L, H, F)
    assert _ranges(space) == {"layer_0": (0, 1), "layer_1": (0, 1), "layer_2": (0, 1)}


def test_large_space_dims():
    space = LargeSpace(L, H, F)
    assert len(space) == 3 * (4 + 48)
    ranges = _ranges(space)
    assert set(ranges.values()) == {(0, 1)}
    assert "head_2_3" in ranges and "head_2_4" not in ranges
    assert "unit_0_47" in ranges and "unit_0_48" not in ranges


def test_spaces_registry_and_make_space(supernet):
    encoders = {"small", "medium", "layer", "large"}
    assert set(registry.SPACES) == encoders | {"decoder_small", "decoder_medium",
                                               "decoder_middle"}
    for name in registry.SPACES:
        cls = registry.load(registry.SPACES, name, "search space")
        assert cls.name == name
        if name not in encoders:
            continue  # decoder spaces: tests/test_decoder_pipeline.py
        space = make_space(name, supernet.config)
        assert type(space) is cls and cls.name == name
        assert (space.num_layers, space.num_heads, space.num_units) == (L, H, F)


def test_make_space_unknown_name_lists_known_names(supernet):
    with pytest.raises(SearchSpaceError, match="unknown space 'tiny'") as info:
        make_space("tiny", supernet.config)
    for name in ("small", "medium", "layer", "large"):
        assert name in str(info.value)


# -------------------------------------------------------------------------- sample / mutate


@pytest.mark.parametrize("cls", ALL_SPACES)
def test_sample_is_inside_bounds_and_reproducible(cls):
    space = cls(L, H, F)
    rng = np.random.default_rng(7)
    configs = [space.sample(rng) for _ in range(200)]
    again = np.random.default_rng(7)
    assert [space.sample(again) for _ in range(200)] == configs
    assert space.sample(np.random.default_rng(8)) != configs[0]
    for config in configs:
        assert space.validate(config) == config
        assert all(type(v) is int for v in config.values())
    # every value of a dimension is reachable (the upper end is included)
    for d in space.dims[:6]:
        seen = {c[d.name] for c in configs}
        if d.high - d.low <= 4:
            assert seen == set(range(d.low, d.high + 1))
        else:
            assert min(seen) >= d.low and max(seen) <= d.high


@pytest.mark.parametrize("cls", ALL_SPACES)
def test_mutate_changes_exactly_one_dimension(cls):
    space = cls(L, H, F)
    rng = np.random.default_rng(0)
    config = space.sample(rng)
    changed_dims = set()
    for _ in range(200):
        mutated = space.mutate(config, rng)
        diff = [k for k in config if mutated[k] != config[k]]
        assert len(diff) == 1
        assert space.validate(mutated) == mutated
        changed_dims.add(diff[0])
        config = mutated
    assert len(changed_dims) >= min(len(space), 3)


def test_mutate_does_not_modify_its_argument():
    space = SmallSpace(L, H, F)
    config = {"num_layers": 2, "num_heads": 2, "num_units": 10}
    space.mutate(config, np.random.default_rng(0))
    assert config == {"num_layers": 2, "num_heads": 2, "num_units": 10}


def test_mutate_skips_fixed_dimensions_and_fails_when_all_are_fixed():
    space = SmallSpace(L, H, F, bounds={"num_layers": (2, 2), "num_heads": (4, 4)})
    rng = np.random.default_rng(1)
    config = space.largest()
    for _ in range(50):
        config = space.mutate(config, rng)
        assert config["num_layers"] == 2 and config["num_heads"] == 4
    fixed = SmallSpace(L, H, F, bounds={"num_layers": (2, 2), "num_heads": (4, 4),
                                        "num_units": (9, 9)})
    with pytest.raises(SearchSpaceError, match="fixed"):
        fixed.mutate(fixed.largest(), rng)


# ------------------------------------------------------------------ largest / smallest / middle


def test_small_space_special_configs():
    space = SmallSpace(L, H, F)
    assert space.largest() == {"num_layers": 3, "num_heads": 4, "num_units": 48}
    assert space.to_sub_network(space.largest()) == SubNetwork((4, 4, 4), (48, 48, 48))
    assert space.smallest() == {"num_layers": 0, "num_heads": 1, "num_units": 1}
    assert space.to_sub_network(space.smallest()) == SubNetwork((0, 0, 0), (0, 0, 0))
    # halfway, rounded up: (0+3+1)//2 = 2, (1+4+1)//2 = 3, (1+48+1)//2 = 25
    assert space.middle() == {"num_layers": 2, "num_heads": 3, "num_units": 25}
    assert space.to_sub_network(space.middle()) == SubNetwork((3, 3, 0), (25, 25, 0))


def test_medium_space_special_configs():
    space = MediumSpace(L, H, F)
    assert space.to_sub_network(space.largest()) == SubNetwork((4, 4, 4), (48, 48, 48))
    assert space.to_sub_network(space.smallest()) == SubNetwork((0, 0, 0), (0, 0, 0))
    assert space.to_sub_network(space.middle()) == SubNetwork((2, 2, 2), (24, 24, 24))


def test_layer_space_special_configs():
    space = LayerSpace(L, H, F)
    assert space.to_sub_network(space.largest()) == SubNetwork((4, 4, 4), (48, 48, 48))
    assert space.to_sub_network(space.smallest()) == SubNetwork((0, 0, 0), (0, 0, 0))
    assert space.middle() == {"layer_0": 1, "layer_1": 1, "layer_2": 0}  # first half, rounded up
    assert LayerSpace(4, H, F).middle() == {"layer_0": 1, "layer_1": 1, "layer_2": 0,
                                            "layer_3": 0}


def test_large_space_special_configs():
    space = LargeSpace(L, H, F)
    assert space.to_sub_network(space.largest()) == SubNetwork((4, 4, 4), (48, 48, 48))
    assert space.to_sub_network(space.smallest()) == SubNetwork((0, 0, 0), (0, 0, 0))
    middle = space.to_sub_network(space.middle())
    assert middle == SubNetwork((2, 2, 2), (24, 24, 24))
    assert middle.is_prefix
    odd = LargeSpace(1, 3, 5).to_sub_network(LargeSpace(1, 3, 5).middle())
    assert odd == SubNetwork((2,), (3,))


def test_middle_honours_narrowed_bounds():
    space = LayerSpace(L, H, F, bounds={"layer_2": (1, 1), "layer_0": (0, 0)})
    assert space.middle() == {"layer_0": 0, "layer_1": 1, "layer_2": 1}
    small = SmallSpace(L, H, F, bounds={"num_units": (10, 20)})
    assert small.middle()["num_units"] == 15


# ------------------------------------------------------------------------- to_sub_network


def test_to_sub_network_small():
    space = SmallSpace(L, H, F)
    sub = space.to_sub_network({"num_layers": 2, "num_heads": 1, "num_units": 30})
    assert sub == SubNetwork(heads=(1, 1, 0), units=(30, 30, 0))


def test_to_sub_network_medium():
    space = MediumSpace(L, H, F)
    config = {"heads_0": 4, "heads_1": 0, "heads_2": 1, "units_0": 0, "units_1": 7, "units_2": 48}
    assert space.to_sub_network(config) == SubNetwork(heads=(4, 0, 1), units=(0, 7, 48))


def test_to_sub_network_layer():
    space = LayerSpace(L, H, F)
    sub = space.to_sub_network({"layer_0": 0, "layer_1": 1, "layer_2": 0})
    assert sub == SubNetwork(heads=(0, 4, 0), units=(0, 48, 0))


def test_to_sub_network_large():
    space = LargeSpace(L, H, F)
    config = dict.fromkeys((d.name for d in space.dims), 0)
    config.update({"head_0_1": 1, "head_0_3": 1, "unit_0_0": 1, "unit_0_47": 1,
                   "head_2_0": 1, "head_2_1": 1, "unit_1_5": 1})
    sub = space.to_sub_network(config)
    assert sub == SubNetwork(heads=((1, 3), (), 2), units=((0, 47), (5,), ()))
    assert sub.heads == ((1, 3), 0, 2)


# ------------------------------------------------------------------------------ validation


def test_validate_missing_key():
    space = SmallSpace(L, H, F)
    with pytest.raises(IllegalSubNetworkError, match=r"missing \[num_units\]"):
        space.to_sub_network({"num_layers": 1, "num_heads": 1})


def test_validate_unknown_key():
    space = SmallSpace(L, H, F)
    config = {"num_layers": 1, "num_heads": 1, "num_units": 1, "num_experts": 2}
    with pytest.raises(IllegalSubNetworkError, match=r"unknown \[num_experts\]"):
        space.validate(config)


@pytest.mark.parametrize(("key", "value"), [("num_heads", 5), ("num_heads", 0),
                                            ("num_layers", -1), ("num_units", 49)])
def test_validate_out_of_range(key, value):
    space = SmallSpace(L, H, F)
    config = {"num_layers": 1, "num_heads": 1, "num_units": 1, key: value}
    with pytest.raises(IllegalSubNetworkError, match=f"{key}={value} is outside"):
        space.to_sub_network(config)


def test_validate_returns_clean_ints():
    space = MediumSpace(L, H, F)
    config = {d.name: np.int64(1) for d in space.dims}
    clean = space.validate(config)
    assert clean == dict.fromkeys(config, 1)
    assert all(type(v) is int for v in clean.values())


# -------------------------------------------------------------------------------- bounds


def test_narrowed_bounds_are_honoured_by_sample():
    space = SmallSpace(L, H, F, bounds={"num_units": (10, 12), "num_layers": (2, 3)})
    assert _ranges(space)["num_heads"] == (1, 4)
    rng = np.random.default_rng(3)
    configs = [space.sample(rng) for _ in range(100)]
    assert {c["num_units"] for c in configs} == {10, 11, 12}
    assert {c["num_layers"] for c in configs} == {2, 3}
    with pytest.raises(IllegalSubNetworkError, match="outside"):
        space.validate({"num_layers": 2, "num_heads": 1, "num_units": 13})


def test_inverted_bounds():
    with pytest.raises(SearchSpaceError, match=r"bounds for 'num_units' are inverted: \(5, 2\)"):
        SmallSpace(L, H, F, bounds={"num_units": (5, 2)})


@pytest.mark.parametrize("bounds", [(0, 4), (1, 5)])
def test_bounds_outside_model_range(bounds):
    with pytest.raises(SearchSpaceError, match=r"leave the model's range \[1, 4\]"):
        SmallSpace(L, H, F, bounds={"num_heads": bounds})


def test_unknown_bound_name(supernet):
    with pytest.raises(SearchSpaceError, match="unknown dimension 'heads' for the small space"):
        make_space("small", supernet.config, bounds={"heads": (1, 2)})


def test_invalid_model_shape_and_empty_dim():
    with pytest.raises(SearchSpaceError, match="must be positive"):
        SmallSpace(0, H, F)
    with pytest.raises(SearchSpaceError, match="empty"):
        Dim("x", 3, 2)


# ---------------------------------------------------------------------------- ray tune


def test_param_space_is_ray_tune_randint_with_inclusive_bounds():
    from ray import tune
    from ray.tune.search.sample import Domain, Integer

    space = SmallSpace(L, H, F, bounds={"num_units": (8, 16)})
    params = space.param_space()
    assert set(params) == {"num_layers", "num_heads", "num_units"}
    assert all(isinstance(p, Domain) and isinstance(p, Integer) for p in params.values())
    # tune.randint's upper end is exclusive
    expected = {"num_layers": (0, 4), "num_heads": (1, 5), "num_units": (8, 17)}
    assert {k: (p.lower, p.upper) for k, p in params.items()} == expected
    assert type(params["num_heads"].get_sampler()) is type(tune.randint(0, 2).get_sampler())


def test_large_param_space_has_one_bit_per_unit():
    params = LargeSpace(L, H, F).param_space()
    assert len(params) == 3 * (4 + 48)
    assert {(p.lower, p.upper) for p in params.values()} == {(0, 2)}


# ---------------------------------------------------------------- costs of sampled configs


@pytest.mark.parametrize("cls", ALL_SPACES)
def test_num_params_of_sampled_configs_equals_extracted_model(cls, supernet):
    space = cls.for_model(supernet.config)
    rng = np.random.default_rng(11)
    configs = [space.sample(rng) for _ in range(4)] + [space.smallest(), space.middle()]
    for config in configs:
        sub = space.to_sub_network(config)
        small = supernet.extract_sub_network(sub)
        assert supernet.num_params(sub) == sum(p.numel() for p in small.parameters())
    assert supernet.num_params(space.to_sub_network(space.largest())) == sum(
        p.numel() for p in supernet.parameters()
    )


# ------------------------------------------------------------------------ hidden dimension


def test_hidden_dimension_is_opt_in_for_small_and_medium(supernet):
    assert "hidden" not in _ranges(SmallSpace.for_model(supernet.config))
    small = SmallSpace.for_model(supernet.config, hidden=True)
    assert small.dims[-1] == Dim("hidden", 8, 32, 8)
    assert len(small) == 4 and "hidden=32" in repr(small)
    medium = make_space("medium", supernet.config, hidden=True, hidden_step=4)
    assert medium.dims[-1] == Dim("hidden", 4, 32, 4) and len(medium) == 2 * L + 1
    assert small.to_sub_network({"num_layers": 2, "num_heads": 3, "num_units": 10,
                                 "hidden": 24}) == SubNetwork((3, 3, 0), (10, 10, 0), 24)
    assert small.to_sub_network(small.largest()) == SubNetwork((4,) * L, (48,) * L, 32)
    assert small.smallest()["hidden"] == 8
    assert small.middle()["hidden"] == 24  # 8, 16, 24, 32: the upper middle value


def test_hidden_dimension_refusals(supernet):
    for name in ("layer", "large"):
        with pytest.raises(SearchSpaceError, match="use the small or medium space"):
            make_space(name, supernet.config, hidden=True)
    with pytest.raises(SearchSpaceError, match="hidden_step 5 does not divide"):
        SmallSpace.for_model(supernet.config, hidden=True, hidden_step=5)
    space = SmallSpace.for_model(supernet.config, hidden=True)
    with pytest.raises(IllegalSubNetworkError, match=r"hidden=12 is not one of 8, 16, \.\.\., 32"):
        space.validate({"num_layers": 1, "num_heads": 1, "num_units": 1, "hidden": 12})
    with pytest.raises(SearchSpaceError, match="does not fit its step 8"):
        SmallSpace.for_model(supernet.config, {"hidden": (12, 32)}, hidden=True)
    narrowed = SmallSpace.for_model(supernet.config, {"hidden": (16, 24)}, hidden=True)
    assert narrowed.dims[-1] == Dim("hidden", 16, 24, 8)


@pytest.mark.parametrize("cls", [SmallSpace, MediumSpace])
def test_sampled_and_mutated_hidden_widths_stay_on_the_grid(cls, supernet):
    space = cls.for_model(supernet.config, hidden=True)
    rng = np.random.default_rng(3)
    configs = [space.sample(rng) for _ in range(100)]
    assert {c["hidden"] for c in configs} == {8, 16, 24, 32}
    config, mutated_hidden = configs[0], set()
    for _ in range(300):
        mutated = space.mutate(config, rng)
        assert sum(mutated[k] != config[k] for k in config) == 1
        assert space.validate(mutated) == mutated
        if mutated["hidden"] != config["hidden"]:
            mutated_hidden.add(mutated["hidden"])
        config = mutated
    assert mutated_hidden == {8, 16, 24, 32}


def test_hidden_param_space_is_quantised_for_ray_tune_and_optuna(supernet):
    from ray.tune.search.optuna import OptunaSearch

    params = SmallSpace.for_model(supernet.config, hidden=True).param_space()
    assert set(params["hidden"].sample(size=200)) == {8, 16, 24, 32}
    converted = OptunaSearch.convert_search_space({"hidden": params["hidden"]})["hidden"]
    assert (converted.low, converted.high, converted.step) == (8, 32, 8)


@pytest.mark.parametrize("cls", [SmallSpace, MediumSpace])
def test_num_params_of_sampled_hidden_configs_equals_extracted_model(cls, supernet):
    space = cls.for_model(supernet.config, hidden=True)
    rng = np.random.default_rng(5)
    for config in [space.sample(rng) for _ in range(4)] + [space.smallest(), space.middle()]:
        sub = space.to_sub_network(config)
        assert sub.hidden == config["hidden"]
        small = supernet.extract_sub_network(sub)
        assert small.config.hidden_size == config["hidden"]
        assert supernet.num_params(sub) == sum(p.numel() for p in small.parameters())
