"""Tests for the decoder's pipeline pieces: the decoder search spaces (nas_prune.space), export
as a stock Llama / Qwen2 checkpoint or with our class (nas_prune.export), loaded in a fresh
process that cannot import nas_prune, and prefill / decode latency (nas_prune.profile)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import NamedTuple

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from nas_prune.decoder import DecoderConfig, DecoderForCausalLM, DecoderSubNetwork
from nas_prune.decoder_loading import from_hf
from nas_prune.errors import ProfileError, SearchSpaceError
from nas_prune.export import (
    SUBNETWORK_FILE,
    decoder_stock_shape,
    export_decoder,
    to_stock_decoder,
)
from nas_prune.profile import decoder_latency
from nas_prune.space import DecoderMediumSpace, DecoderMiddleSpace, DecoderSmallSpace
from nas_prune.supernet import IllegalSubNetworkError
from tests.test_decoder import (  # the same tiny transformers causal LMs
    ATOL,
    HIDDEN,
    LAYERS,
    VOCAB,
    make_hf,
)

SPACES = [DecoderSmallSpace, DecoderMediumSpace, DecoderMiddleSpace]


@pytest.fixture(scope="module")
def supernet() -> DecoderForCausalLM:
    """Llama, 2 KV heads of 2 query heads each."""
    return from_hf(make_hf("llama", 2)).eval()


def _ranges(space) -> dict[str, tuple[int, int]]:
    return {d.name: (d.low, d.high) for d in space.dims}


def _logits(model: DecoderForCausalLM, sub: DecoderSubNetwork | None, ids, **kwargs):
    if sub is None:
        model.reset_super_network()
    else:
        model.set_sub_network(sub)
    try:
        with torch.no_grad():
            return model(ids, **kwargs).logits
    finally:
        model.reset_super_network()


# ------------------------------------------------------------------------------ spaces
def test_decoder_space_dims_and_names(supernet):
    small = DecoderSmallSpace.for_model(supernet.config)
    assert small.name == "decoder_small"
    assert _ranges(small) == {"num_layers": (0, 3), "kv_heads": (1, 2),
                              "queries_per_kv": (1, 2), "units": (1, 48)}
    medium = DecoderMediumSpace.for_model(supernet.config)
    assert medium.name == "decoder_medium"
    assert _ranges(medium) == ({f"kv_heads_{i}": (0, 2) for i in range(LAYERS)}
                               | {f"queries_per_kv_{i}": (1, 2) for i in range(LAYERS)}
                               | {f"units_{i}": (0, 48) for i in range(LAYERS)})
    for cls in SPACES:
        space = cls.for_model(supernet.config, hidden=True)
        assert space.dims[-1].name == "hidden"
        assert list(space.dims[-1].values) == [8, 16, 24, 32]  # HIDDEN_STEP = 8
        assert list(cls.for_model(supernet.config, hidden=True, hidden_step=4).dims[-1].values) \
            == list(range(4, 33, 4))
    narrowed = DecoderSmallSpace.for_model(supernet.config, {"units": (16, 32), "hidden": (16, 24)},
                                           hidden=True)
    assert _ranges(narrowed)["units"] == (16, 32) and _ranges(narrowed)["hidden"] == (16, 24)


def test_for_model_takes_a_transformers_config_and_refuses_others(supernet):
    hf_config = make_hf("qwen2", 4).config
    space = DecoderSmallSpace.for_model(hf_config)
    assert _ranges(space)["kv_heads"] == (1, 4) and _ranges(space)["queries_per_kv"] == (1, 1)
    with pytest.raises(SearchSpaceError, match="decoder_small space is for decoders"):
        DecoderSmallSpace.for_model(BertConfig())
    small = supernet.extract_sub_network(DecoderSubNetwork.uniform(LAYERS, 2, 1, 1, 8))
    with pytest.raises(SearchSpaceError, match="full supernet's config"):
        DecoderMediumSpace.for_model(small.config)
    with pytest.raises(SearchSpaceError, match="leave the model's range"):
        DecoderSmallSpace.for_model(supernet.config, {"kv_heads": (1, 3)})
    with pytest.raises(SearchSpaceError, match="unknown dimension 'heads_0'"):
        DecoderMediumSpace.for_model(supernet.config, {"heads_0": (0, 1)})


@pytest.mark.parametrize("hidden", [False, True], ids=["plain", "hidden"])
@pytest.mark.parametrize("cls", SPACES, ids=lambda c: c.name)
def test_space_configs_are_legal_sub_networks(supernet, cls, hidden):
    space = cls.for_model(supernet.config, hidden=hidden)
    rng = np.random.default_rng(0)
    configs = [space.largest(), space.smallest(), space.middle()]
    configs += [space.sample(rng) for _ in range(15)]
    configs += [space.mutate(c, rng) for c in configs[:10]]
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    for config in configs:
        assert space.validate(config) == config
        sub = space.to_sub_network(config)
        assert isinstance(sub, DecoderSubNetwork)
        supernet.validate(sub)
        assert sub.hidden == (config["hidden"] if hidden else None)
        logits = _logits(supernet, sub, ids)
        assert logits.shape == (2, 7, VOCAB) and torch.isfinite(logits).all()
    for config in configs[:10]:
        mutated = space.mutate(config, rng)
        assert sum(mutated[k] != config[k] for k in config) == 1


@pytest.mark.parametrize("hidden", [False, True], ids=["plain", "hidden"])
@pytest.mark.parametrize("cls", SPACES, ids=lambda c: c.name)
def test_largest_is_the_full_network_and_params_are_ordered(supernet, cls, hidden):
    space = cls.for_model(supernet.config, hidden=hidden)
    largest = space.to_sub_network(space.largest())
    full = supernet.full_sub_network
    assert (largest.kv_heads, largest.queries_per_kv, largest.units) == \
        (full.kv_heads, full.queries_per_kv, full.units)
    assert largest.hidden in (None, full.hidden)
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(supernet, largest, ids), _logits(supernet, None, ids),
                               atol=0, rtol=0)
    params = [supernet.num_params(space.to_sub_network(c))
              for c in (space.smallest(), space.middle(), space.largest())]
    assert params[0] < params[1] < params[2] == supernet.num_params()


def test_medium_space_removes_blocks_and_layers(supernet):
    space = DecoderMediumSpace.for_model(supernet.config)
    config = space.largest() | {"kv_heads_0": 0, "units_1": 0, "kv_heads_2": 0, "units_2": 0,
                                "queries_per_kv_1": 1}
    sub = space.to_sub_network(config)
    assert sub == DecoderSubNetwork((0, 2, 0), (0, 1, 0), (48, 0, 0))
    assert sub.layers == (True, True, False)
    with pytest.raises(IllegalSubNetworkError, match="queries_per_kv_0=0 is outside"):
        space.to_sub_network(config | {"queries_per_kv_0": 0})


def test_middle_space_prunes_the_middle_layers_and_keeps_the_ends_whole():
    space = DecoderMiddleSpace(num_layers=8, num_kv_heads=4, queries_per_group=2, num_units=64)
    assert _ranges(space) == {"kv_heads": (1, 4), "queries_per_kv": (1, 2), "units": (1, 64),
                              "whole_first": (0, 2), "whole_last": (0, 2)}
    sub = space.to_sub_network({"kv_heads": 3, "queries_per_kv": 1, "units": 16,
                                "whole_first": 2, "whole_last": 1})
    assert sub.kv_heads == (4, 4, 3, 3, 3, 3, 3, 4)
    assert sub.queries_per_kv == (2, 2, 1, 1, 1, 1, 1, 2)
    assert sub.units == (64, 64, 16, 16, 16, 16, 16, 64) and sub.hidden is None
    every = space.to_sub_network(space.smallest())
    assert every == DecoderSubNetwork.uniform(8, 8, 1, 1, 1)  # no whole ends: every layer cut
    # a layer kept whole costs parameters: more whole layers, more parameters
    model = DecoderForCausalLM(DecoderConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=8,
                                             num_attention_heads=8, num_key_value_heads=4,
                                             head_dim=4, intermediate_size=64))
    params = [model.num_params(space.to_sub_network(space.smallest() | {"whole_first": k}))
              for k in range(3)]
    assert params[0] < params[1] < params[2]
    one_layer = DecoderMiddleSpace(num_layers=1, num_kv_heads=2, queries_per_group=1,
                                   num_units=8)
    assert _ranges(one_layer)["whole_first"] == (0, 1)


# ------------------------------------------------------------------------------ export
def test_decoder_stock_shape():
    llama = from_hf(make_hf("llama", 4)).config
    qwen2 = from_hf(make_hf("qwen2", 4)).config
    uniform = DecoderSubNetwork.uniform
    assert decoder_stock_shape(llama, uniform(LAYERS, 2, 2, 1, 20)) == (2, 2, 1, 20, HIDDEN)
    assert decoder_stock_shape(llama, uniform(LAYERS, 3, 2, 1, 20, 24)) == (3, 2, 1, 20, 24)
    # Llama wants the hidden size a multiple of the query heads (3 here); Qwen2 does not
    assert decoder_stock_shape(llama, uniform(LAYERS, 2, 3, 1, 20, 16)) is None
    assert decoder_stock_shape(qwen2, uniform(LAYERS, 2, 3, 1, 20, 16)) == (2, 3, 1, 20, 16)
    # dropped layers are fine, a layer keeping one block or another shape is not
    assert decoder_stock_shape(llama, DecoderSubNetwork((2, 0, 2), (1, 0, 1), (9, 0, 9))) \
        == (2, 2, 1, 9, HIDDEN)
    assert decoder_stock_shape(llama, DecoderSubNetwork((2, 2, 2), (1, 1, 1), (9, 0, 9))) is None
    assert decoder_stock_shape(llama, DecoderSubNetwork((2, 2, 2), (1, 1, 1), (9, 8, 9))) is None
    assert decoder_stock_shape(llama, DecoderSubNetwork((0, 0, 0), (0, 0, 0), (9, 9, 9))) is None


def test_to_stock_decoder_refuses_a_non_uniform_model():
    model = from_hf(make_hf("llama", 2))
    small = model.extract_sub_network(DecoderSubNetwork((2, 1, 2), (1, 1, 1), (9, 9, 9)))
    with pytest.raises(ValueError, match="does not fit a stock llama config"):
        to_stock_decoder(small)


def _tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary: "w2 w7" -> [2, 7]."""
    vocab = {"<pad>": 0, "<s>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                   bos_token="<s>")


class Case(NamedTuple):
    """One export: the source model, the sub-network and the class it should load as."""

    family: str
    kv: int
    tied: bool
    sub: DecoderSubNetwork
    stock_class: str | None
    """The transformers class of a stock export; None for our class (remote code)."""
    seed: int
    """Weight seed, chosen so that the greedy continuation varies (not one repeated token)."""
    overrides: dict = {}
    """More transformers config fields."""


EXPORTS = {
    "llama stock, narrower hidden": Case(
        "llama", 2, False, DecoderSubNetwork.uniform(LAYERS, 2, 1, 2, 20, 24),
        "LlamaForCausalLM", 2),
    "llama stock, rope theta 500, biases": Case(
        "llama", 2, False, DecoderSubNetwork.uniform(LAYERS, 3, 2, 1, 24, 16),
        "LlamaForCausalLM", 1,
        {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
         "attention_bias": True, "mlp_bias": True}),
    "qwen2 stock, tied, hidden not a multiple of the heads": Case(
        "qwen2", 4, True, DecoderSubNetwork.uniform(LAYERS, 3, 3, 1, 30, 16),
        "Qwen2ForCausalLM", 3),
    "llama uniform, hidden not a multiple of the heads": Case(
        "llama", 4, True, DecoderSubNetwork.uniform(LAYERS, 2, 3, 1, 30, 16), None, 4),
    "llama non-uniform": Case(
        "llama", 2, False, DecoderSubNetwork((2, 0, 1), (1, 0, 2), (0, 30, 48), 24), None, 1),
    "qwen2 non-uniform, fewer queries": Case(
        "qwen2", 2, False, DecoderSubNetwork((2, 2, 2), (1, 2, 1), (48, 1, 9)), None, 2),
}
NEW_TOKENS = 20

_FRESH_LOADER = """
import json, sys
sys.modules["nas_prune"] = None  # any import of nas_prune now raises ImportError
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
cases = json.loads(open(sys.argv[1]).read())
inputs = torch.load(sys.argv[2])
new_tokens = int(sys.argv[4])
results = {}
for name, (path, stock) in cases.items():
    # a stock checkpoint must load without remote code; ours needs it
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=not stock).eval()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        if stock:  # transformers' own greedy search
            tokens = model.generate(ids, attention_mask=mask, do_sample=False,
                                    max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        else:  # the exported class's generate
            tokens = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens)
    results[name] = {
        "logits": logits, "tokens": tokens, "class": type(model).__name__,
        "module": type(model).__module__,
        "params": sum(p.numel() for p in model.parameters()),
        "tokenizer": PreTrainedTokenizerFast.from_pretrained(path)("w5 w9 w2").input_ids,
    }
results["nas_prune_loaded"] = any(m.startswith("nas_prune") and sys.modules[m] is not None
                                  for m in sys.modules)
torch.save(results, sys.argv[3])
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every EXPORTS case exported, then loaded and run in ONE fresh process that cannot import
    nas_prune; returns (supernets, directories, inputs, that process's results)."""
    tmp = tmp_path_factory.mktemp("decoder_exports")
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(2, VOCAB, (2, 7), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # the second prompt is left-padded
    inputs = {"input_ids": ids, "attention_mask": mask}
    models, dirs, cases = {}, {}, {}
    tokenizer = _tokenizer()
    for i, (name, case) in enumerate(EXPORTS.items()):
        hf = make_hf(case.family, case.kv, case.tied, case.seed, **case.overrides)
        models[name] = model = from_hf(hf).eval()
        dirs[name] = export_decoder(model, case.sub, tmp / f"model{i}", tokenizer,
                                    metadata={"case": name})
        cases[name] = (str(dirs[name]), case.stock_class is not None)
    (tmp / "cases.json").write_text(json.dumps(cases))
    torch.save(inputs, tmp / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp / "hf_modules"),
               TRANSFORMERS_VERBOSITY="error")
    command = [sys.executable, "-c", _FRESH_LOADER, "cases.json", "inputs.pt", "results.pt",
               str(NEW_TOKENS)]
    result = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return models, dirs, inputs, torch.load(tmp / "results.pt")


@pytest.mark.parametrize("name", EXPORTS)
def test_export_is_stock_exactly_when_the_shape_is(exported, name):
    models, dirs, _, results = exported
    family, sub, stock_class = EXPORTS[name].family, EXPORTS[name].sub, EXPORTS[name].stock_class
    out, loaded = dirs[name], results[name]
    config = json.loads((out / "config.json").read_text())
    info = json.loads((out / SUBNETWORK_FILE).read_text())
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert results["nas_prune_loaded"] is False
    if stock_class:
        assert loaded["class"] == stock_class
        assert loaded["module"].startswith("transformers.models.")
        assert config["model_type"] == family and "auto_map" not in config
        assert "decoder.py" not in files
    else:
        assert loaded["class"] == "DecoderForCausalLM"
        assert loaded["module"].startswith("transformers_modules")
        assert config["model_type"] == "nas_prune_decoder"
        assert config["auto_map"]["AutoModelForCausalLM"] == "decoder.DecoderForCausalLM"
        assert {"decoder.py", "supernet.py"} <= files
    model = models[name]
    assert info["stock"] is (stock_class is not None) and info["case"] == name
    assert (info["kv_heads"], info["queries_per_kv"], info["units"]) == \
        (list(sub.kv_heads), list(sub.queries_per_kv), list(sub.units))
    assert info["hidden"] == (sub.hidden or HIDDEN) and info["family"] == family
    assert info["params"] == model.num_params(sub) == loaded["params"]
    assert info["flops"] == model.flops(sub, 128) and 0 < info["params_ratio"] < 1
    assert loaded["tokenizer"] == [5, 9, 2]


@pytest.mark.parametrize("name", EXPORTS)
def test_exported_model_equals_the_sub_network(exported, name):
    """The same logits on the real (not padded) positions, and the same 20 greedy tokens: the
    stock model through transformers' `generate(do_sample=False)`, ours through its own."""
    models, _, inputs, results = exported
    model, sub = models[name], EXPORTS[name].sub
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    expected = _logits(model, sub, ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(results[name]["logits"][real], expected[real], atol=ATOL, rtol=0)
    model.set_sub_network(sub)
    try:
        tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, attention_mask=mask)
    finally:
        model.reset_super_network()
    assert tokens.shape == (2, ids.shape[1] + NEW_TOKENS)
    assert len(set(tokens[:, ids.shape[1]:].flatten().tolist())) >= 5  # not one token repeated
    assert torch.equal(results[name]["tokens"], tokens)


def test_stock_export_with_scaled_rope(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    model = from_hf(make_hf("llama", 2, rope_parameters=rope)).eval()
    sub = DecoderSubNetwork.uniform(LAYERS, 2, 1, 2, 20, 24)
    out = export_decoder(model, sub, tmp_path / "model")
    loaded = LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(2, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = loaded(ids).logits
    torch.testing.assert_close(theirs, _logits(model, sub, ids), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------ latency
def test_decoder_latency_reports_prefill_and_per_token_decode():
    model = from_hf(make_hf("qwen2", 2, tied=True)).eval()
    model.set_sub_network(DecoderSubNetwork((2, 0, 1), (1, 0, 2), (0, 30, 48), 24))
    result = decoder_latency(model, batch_size=2, prompt_len=8, new_tokens=4, device="cpu",
                             warmup=1, repeats=3)
    for key in ("prefill_ms", "prefill_p90_ms", "decode_ms_per_token",
                "decode_p90_ms_per_token", "decode_tokens_per_s"):
        assert result[key] > 0, key
    assert (result["batch_size"], result["prompt_len"], result["new_tokens"]) == (2, 8, 4)
    assert model.sub_network is not None and not model.training  # selection left as it was
    with pytest.raises(ProfileError, match="at least 1"):
        decoder_latency(model, new_tokens=0)
    with pytest.raises(ProfileError, match="clock must be one of"):
        decoder_latency(model, clock="sundial")


def test_half_size_sub_network_prefills_faster():
    """Hidden 256, 4 layers, 8 query heads of 32 (4 KV heads), 688 MLP neurons, 128 tokens;
    the sub-network keeps half the KV heads and neurons in every layer (about half the FLOPs).
    One thread timed with its own CPU time (time.thread_time), so other processes on a shared
    machine do not count; median of 7."""
    config = DecoderConfig(vocab_size=512, hidden_size=256, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                           intermediate_size=688, max_position_embeddings=256)
    torch.manual_seed(0)
    supernet = DecoderForCausalLM(config).eval()
    half = DecoderSubNetwork.uniform(4, 4, 2, 2, 344)
    assert supernet.flops(half, 128) < 0.55 * supernet.flops(None, 128)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = {}
        for name, sub in (("full", supernet.full_sub_network), ("half", half)):
            small = supernet.extract_sub_network(sub).eval()
            times[name] = decoder_latency(small, batch_size=1, prompt_len=128, new_tokens=2,
                                          device="cpu", warmup=2, repeats=7, clock="thread")
    finally:
        torch.set_num_threads(threads)
    assert times["half"]["prefill_ms"] < 0.9 * times["full"]["prefill_ms"], times
