"""A Llama-family decoder (Llama, SmolLM2, Qwen2) whose sub-networks are selected by slicing.

The decoder sibling of `nas_prune.supernet`, and like it one file that is the whole model: the
weight-sharing *supernet* of two-stage NAS (Klein et al., TMLR 2024; whittle brings the same
search to GPT-style decoders: embedding width, heads, MLP size, layers). `set_sub_network`
selects, per layer, a prefix of the key/value heads, a prefix of the query heads inside every
KV group, a prefix of the MLP neurons (gate, up and down together) and whether the layer is kept,
and globally a prefix of the hidden (embedding) channels; the forward pass runs on *slices* of
the weight tensors, so a smaller sub-network computes less.

Grouped-query attention (Ainslie et al. 2023): query heads come in groups that share one
key/value head. A layer keeps its first `kv_heads` groups and the first `queries_per_kv` query
heads of *each* kept group, the same count in every group, so the sliced layer is again a valid
GQA shape (kv_heads * queries_per_kv query heads, kv_heads key/value heads). An extracted
uniform sub-network's tensors load as they are into a stock `LlamaForCausalLM` /
`Qwen2ForCausalLM` (whose config also wants the hidden size a multiple of the query heads).

The hidden dimension (Minitron, Muralidharan et al. 2024; SliceGPT, Ashkboos et al. 2024 deletes
channels after a rotation instead) keeps the first `hidden` channels of the residual stream: of
the token embeddings, of every weight that reads the stream (q/k/v, gate/up input columns) or
writes it (o/down output rows and biases), of every RMSNorm weight and of the head. RMSNorm
is computed over the kept channels only: x / sqrt(mean over the kept channels of x^2 + eps),
times the kept weights. That is what the extracted smaller model, whose hidden size *is* the
kept width, computes, so selection and extraction agree exactly.

Channels, heads and neurons are first sorted by importance (nas_prune.decoder_importance:
Minitron's activation-based scores; DynaBERT rewiring), so prefixes are the best units; the full
network's function does not change. Parameter names equal transformers' Llama names, so weights
load without a map, and the model equals transformers in fp32 for the full configuration.

Two heads share the body, the selection, the costs and extraction (`DecoderModel`):
`DecoderForCausalLM` (the LM head) and `DecoderForSequenceClassification` (transformers'
`score` head on the last real token, found from the attention mask).

This file imports only torch, transformers and its sibling `supernet.py` (for the shared error
type), so an exported checkpoint can carry them and load with `trust_remote_code=True`; loading
Hugging Face checkpoints lives in `nas_prune.decoder_loading`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutput
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .supernet import IllegalSubNetworkError

FAMILIES = ("llama", "qwen2")
"""Hugging Face `model_type`s whose weights load into this decoder."""

ROPE_TYPES = ("default", "linear", "llama3", "yarn")
"""Rotary scalings supported: those whose frequencies do not depend on the sequence length."""


@dataclass(frozen=True)
class DecoderSubNetwork:
    """What a decoder sub-network keeps: per layer prefixes of KV groups, of the query heads in
    each group and of the MLP neurons, and globally a prefix of the hidden channels.

    A layer with `kv_heads` 0 (then `queries_per_kv` must be 0 too) has no attention block, one
    with `units` 0 no MLP block; a layer with neither is dropped (the identity).
    """

    kv_heads: tuple[int, ...]
    """Per layer: how many key/value heads (GQA groups) are kept, the first ones."""
    queries_per_kv: tuple[int, ...]
    """Per layer: how many query heads each kept group keeps, the first ones of every group."""
    units: tuple[int, ...]
    """Per layer: how many MLP neurons are kept, the first ones."""
    hidden: int | None = None
    """How many hidden (embedding) channels are kept, the first ones; None keeps them all."""

    def __post_init__(self) -> None:
        for name in ("kv_heads", "queries_per_kv", "units"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.hidden is not None:
            object.__setattr__(self, "hidden", int(self.hidden))
            if self.hidden < 1:
                raise IllegalSubNetworkError(f"hidden={self.hidden}: keep at least 1 channel")
        if not len(self.kv_heads) == len(self.queries_per_kv) == len(self.units):
            raise IllegalSubNetworkError(
                f"kv_heads, queries_per_kv and units have {len(self.kv_heads)}, "
                f"{len(self.queries_per_kv)} and {len(self.units)} entries; give one per layer"
            )
        for i, (k, g, n) in enumerate(zip(self.kv_heads, self.queries_per_kv, self.units,
                                          strict=True)):
            if min(k, g, n) < 0:
                raise IllegalSubNetworkError(f"layer {i} keeps a negative count ({k}, {g}, {n})")
            if (k == 0) != (g == 0):
                raise IllegalSubNetworkError(
                    f"layer {i} keeps {k} KV heads and {g} queries per KV head; set both to 0 "
                    "to remove the attention block, or both above 0"
                )

    @classmethod
    def uniform(cls, total_layers: int, num_layers: int, kv_heads: int, queries_per_kv: int,
                units: int, hidden: int | None = None) -> DecoderSubNetwork:
        """The first `num_layers` layers keep the same shape; the other layers are dropped."""
        keep = [i < num_layers for i in range(total_layers)]
        return cls(tuple(kv_heads * k for k in keep), tuple(queries_per_kv * k for k in keep),
                   tuple(units * k for k in keep), hidden)

    @property
    def layers(self) -> tuple[bool, ...]:
        """Per layer: whether it keeps anything."""
        return tuple(bool(k or n) for k, n in zip(self.kv_heads, self.units, strict=True))


class DecoderConfig(PretrainedConfig):
    """Architecture of the decoder (supernet or exported sub-network)."""

    model_type = "nas_prune_decoder"

    family: str = "llama"
    """Which Hugging Face family the weights come from, one of FAMILIES."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    """Query heads per layer of the full (super)network."""
    num_key_value_heads: int = 32
    """Key/value heads (GQA groups) per layer of the full (super)network."""
    head_dim: int = 128
    intermediate_size: int = 11008
    """MLP neurons per layer of the full (super)network."""
    layer_kv_heads: list[int] | None = None
    """Per-layer KV head counts of an exported sub-network; None means the full network."""
    layer_queries_per_kv: list[int] | None = None
    """Per-layer queries per KV head of an exported sub-network; None means the full network."""
    layer_units: list[int] | None = None
    """Per-layer MLP widths of an exported sub-network; None means the full network."""
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_parameters: dict | None = None
    """transformers' rotary settings: rope_type (one of ROPE_TYPES), rope_theta, scaling keys."""
    attention_bias: bool = False
    """Biases on the q/k/v projections (Llama's attention_bias; always on for Qwen2)."""
    o_proj_bias: bool = False
    """Bias on the output projection (Llama's attention_bias; never for Qwen2)."""
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    """The LM head reuses the token embedding matrix."""
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}; GQA needs equal groups"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_type {self.rope_type!r} is not supported (its frequencies change with the "
                f"sequence length); use a checkpoint with one of {ROPE_TYPES}"
            )

    @property
    def rope_type(self) -> str:
        return (self.rope_parameters or {}).get("rope_type", "default")

    @property
    def queries_per_group(self) -> int:
        """Query heads per KV group in the full (super)network."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def kv_heads_per_layer(self) -> list[int]:
        return list(self.layer_kv_heads or [self.num_key_value_heads] * self.num_hidden_layers)

    @property
    def queries_per_kv_per_layer(self) -> list[int]:
        return list(self.layer_queries_per_kv
                    or [self.queries_per_group] * self.num_hidden_layers)

    @property
    def units_per_layer(self) -> list[int]:
        return list(self.layer_units or [self.intermediate_size] * self.num_hidden_layers)


def rope_frequencies(config: DecoderConfig) -> tuple[torch.Tensor, float]:
    """Rotary inverse frequencies (fp32, on the CPU) and the cos/sin scale, as transformers
    computes them for `config.rope_parameters`."""
    params = {"rope_type": "default", "rope_theta": 10000.0, **(config.rope_parameters or {})}
    if params["rope_type"] == "default":
        dim = config.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0
    stand_in = LlamaConfig(
        hidden_size=config.head_dim, num_attention_heads=1, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rope_parameters=params,
    )
    with torch.device("cpu"):  # also when the model is being built on the meta device
        return ROPE_INIT_FUNCTIONS[params["rope_type"]](stand_in, "cpu")


def _take(weight: torch.Tensor | None, dim: int, sel: int | torch.Tensor | None):
    """Slice `weight` along `dim`: None keeps all, an int a prefix (a free view), a tensor
    those indices."""
    if weight is None or sel is None:
        return weight
    if isinstance(sel, int):
        return weight.narrow(dim, 0, sel)
    return weight.index_select(dim, sel)


def query_rows(kv_heads: int, queries_per_kv: int, group_size: int, head_dim: int,
               device=None) -> torch.Tensor:
    """Rows of q_proj (columns of o_proj) kept when the first `queries_per_kv` query heads of
    each of the first `kv_heads` groups of `group_size` are kept (query head j belongs to
    group j // group_size, as in transformers' repeat_kv)."""
    heads = torch.arange(kv_heads, device=device)[:, None] * group_size
    heads = (heads + torch.arange(queries_per_kv, device=device)).flatten()
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=device)).flatten()


class _Active(NamedTuple):
    """One layer's selection, ready for slicing."""

    kv: int
    queries: int
    q_rows: int | torch.Tensor | None
    kv_rows: int | None
    units: int
    unit_sel: int | None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021) in transformers' half-split layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019) over however many channels the input has."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, hidden: int | None = None) -> torch.Tensor:
        dtype, x = x.dtype, x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return _take(self.weight, 0, hidden) * x.to(dtype)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary positions."""

    def __init__(self, config: DecoderConfig, kv_heads: int, queries_per_kv: int):
        super().__init__()
        d, width = config.head_dim, kv_heads * queries_per_kv * config.head_dim
        self.head_dim, self.dropout = d, config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, width, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_heads * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=config.o_proj_bias)
        self.heads_out = nn.Identity()
        """Sees the heads' outputs (batch, tokens, heads * head_dim): a place for hooks."""

    def forward(self, x, cos, sin, mask, s: _Active, hidden, past):
        b, t, _ = x.shape

        def project(linear: nn.Linear, rows, heads: int) -> torch.Tensor:
            weight = _take(_take(linear.weight, 0, rows), 1, hidden)
            y = F.linear(x, weight, _take(linear.bias, 0, rows))
            return y.view(b, t, heads, self.head_dim).transpose(1, 2)

        q = rotate(project(self.q_proj, s.q_rows, s.kv * s.queries), cos, sin)
        k = rotate(project(self.k_proj, s.kv_rows, s.kv), cos, sin)
        v = project(self.v_proj, s.kv_rows, s.kv)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        context = F.scaled_dot_product_attention(
            q, k.repeat_interleave(s.queries, dim=1), v.repeat_interleave(s.queries, dim=1),
            attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            scale=self.head_dim**-0.5,
        )
        context = self.heads_out(context.transpose(1, 2).reshape(b, t, -1))
        weight = _take(_take(self.o_proj.weight, 1, s.q_rows), 0, hidden)
        return F.linear(context, weight, _take(self.o_proj.bias, 0, hidden)), (k, v)


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)) (SwiGLU, Shazeer 2020)."""

    def __init__(self, config: DecoderConfig, units: int):
        super().__init__()
        h, bias = config.hidden_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, units, bias=bias)
        self.up_proj = nn.Linear(h, units, bias=bias)
        self.down_proj = nn.Linear(units, h, bias=bias)
        self.act = ACT2FN[config.hidden_act]
        self.neurons = nn.Identity()
        """Sees the neurons' activations (batch, tokens, units): a place for hooks."""

    def forward(self, x: torch.Tensor, units: int | None, hidden: int | None) -> torch.Tensor:
        def read(linear: nn.Linear) -> torch.Tensor:
            weight = _take(_take(linear.weight, 0, units), 1, hidden)
            return F.linear(x, weight, _take(linear.bias, 0, units))

        h = self.neurons(self.act(read(self.gate_proj)) * read(self.up_proj))
        weight = _take(_take(self.down_proj.weight, 1, units), 0, hidden)
        return F.linear(h, weight, _take(self.down_proj.bias, 0, hidden))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); a block kept with 0 units is
    not built."""

    def __init__(self, config: DecoderConfig, kv_heads: int, queries_per_kv: int, units: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Attention(config, kv_heads, queries_per_kv) if kv_heads else None
        self.input_layernorm = RMSNorm(config.hidden_size, eps) if kv_heads else None
        self.mlp = MLP(config, units) if units else None
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps) if units else None

    def forward(self, x, cos, sin, mask, s: _Active, hidden, past):
        kv = None
        if s.kv:
            out, kv = self.self_attn(self.input_layernorm(x, hidden), cos, sin, mask, s, hidden,
                                     past)
            x = x + out
        if s.units:
            x = x + self.mlp(self.post_attention_layernorm(x, hidden), s.unit_sel, hidden)
        return x, kv


class DecoderBody(nn.Module):
    """Token embeddings, layers and the final norm (transformers' `LlamaModel` names)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        shapes = zip(config.kv_heads_per_layer, config.queries_per_kv_per_layer,
                     config.units_per_layer, strict=True)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, *shape) for shape in shapes)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.embed_out = nn.Identity()
        """Sees the embedded tokens (the residual stream's start): a place for hooks."""


class DecoderCache:
    """Keys and values of the tokens seen so far, per layer, for one sub-network: it holds the
    selected heads' states, so keep the selection fixed while decoding with it."""

    def __init__(self):
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.length = 0
        """Tokens cached so far (the next token's position when nothing is padded)."""


def causal_mask(attention_mask: torch.Tensor | None, batch: int, length: int, past: int,
                dtype: torch.dtype, device) -> torch.Tensor:
    """Additive attention bias (batch or 1, 1, length, past + length): 0 where query i (at
    position past + i) may see key j (j <= past + i, and key j is not padding), else the dtype's
    most negative value. Built the same way for every batch (no branch on the mask's values)."""
    keys = torch.arange(past + length, device=device)
    allowed = (keys[None, :] <= keys[past:, None])[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)


class DecoderModel(PreTrainedModel):
    """What both heads share: the body, the rotary frequencies, the sub-network selection, the
    costs and extraction. Subclasses add a head (any parameter outside `model.` is a head
    matrix whose columns read the residual stream) and `forward`."""

    config_class = DecoderConfig
    base_model_prefix = "model"

    def __init__(self, config: DecoderConfig):
        super().__init__(config)
        self.model = DecoderBody(config)
        self.inv_freq, self.rope_scale = rope_frequencies(config)
        self._active: list[_Active] = []
        self._hidden: int | None = None
        self.sub_network: DecoderSubNetwork | None = None
        self.reset_super_network()

    # ----------------------------------------------------------------------------- selection
    @property
    def full_sub_network(self) -> DecoderSubNetwork:
        c = self.config
        return DecoderSubNetwork(tuple(c.kv_heads_per_layer), tuple(c.queries_per_kv_per_layer),
                                 tuple(c.units_per_layer), c.hidden_size)

    def validate(self, sub: DecoderSubNetwork) -> None:
        """Raise IllegalSubNetworkError unless this network can select `sub`."""
        full = self.full_sub_network
        if len(sub.units) != len(full.units):
            raise IllegalSubNetworkError(
                f"sub-network has {len(sub.units)} layers, this model has {len(full.units)}"
            )
        if sub.hidden is not None and sub.hidden > full.hidden:
            raise IllegalSubNetworkError(
                f"hidden={sub.hidden} but the model has {full.hidden} channels"
            )
        for what in ("kv_heads", "queries_per_kv", "units"):
            for i, (mine, limit) in enumerate(zip(getattr(sub, what), getattr(full, what),
                                                  strict=True)):
                if mine > limit:
                    raise IllegalSubNetworkError(
                        f"layer {i} keeps {what}={mine} but has only {limit}"
                    )

    def set_sub_network(self, sub: DecoderSubNetwork) -> None:
        """Run every following forward pass on sub-network `sub` (sliced weights, no masks)."""
        self.validate(sub)
        full, c = self.full_sub_network, self.config
        device = self.model.embed_tokens.weight.device
        active = []
        for i, (k, g, n) in enumerate(zip(sub.kv_heads, sub.queries_per_kv, sub.units,
                                          strict=True)):
            full_k, full_g, full_n = full.kv_heads[i], full.queries_per_kv[i], full.units[i]
            if g == full_g:
                q_rows = None if k == full_k else k * g * c.head_dim
            else:
                q_rows = query_rows(k, g, full_g, c.head_dim, device)
            kv_rows = None if k == full_k else k * c.head_dim
            active.append(_Active(k, g, q_rows, kv_rows, n, None if n == full_n else n))
        self._active = active
        self._hidden = None if sub.hidden in (None, full.hidden) else sub.hidden
        self.sub_network = sub

    def reset_super_network(self) -> None:
        """Select the full network again."""
        full = self.full_sub_network
        self._active = [_Active(k, g, None, None, n, None) for k, g, n in
                        zip(full.kv_heads, full.queries_per_kv, full.units, strict=True)]
        self._hidden = None
        self.sub_network = None

    # ------------------------------------------------------------------------------ forward
    def run_body(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, cache: DecoderCache | None = None,
                 output_hidden_states: bool = False,
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The final-normed residual stream (batch, tokens, kept channels) of the selected
        sub-network and, with `output_hidden_states`, transformers' `hidden_states`: the
        residual stream after the embeddings and after each layer, the last one final-normed.
        Layers that keep no block are left out, so a sliced sub-network and its extracted
        model give the same tuple."""
        past = cache.length if cache is not None else 0
        batch, length = input_ids.shape
        device, hidden = input_ids.device, self._hidden
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=device)[None]
        x = self.model.embed_out(F.embedding(input_ids, _take(self.model.embed_tokens.weight,
                                                              1, hidden)))
        freqs = position_ids[..., None].float() * self.inv_freq.to(device)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos = (angles.cos() * self.rope_scale).to(x.dtype)
        sin = (angles.sin() * self.rope_scale).to(x.dtype)
        mask = causal_mask(attention_mask, batch, length, past, x.dtype, device)
        states = [x]
        for i, (layer, s) in enumerate(zip(self.model.layers, self._active, strict=True)):
            x, kv = layer(x, cos, sin, mask, s, hidden,
                          cache.layers.get(i) if cache is not None else None)
            if cache is not None and kv is not None:
                cache.layers[i] = kv
            if s.kv or s.units:
                states.append(x)
        if cache is not None:
            cache.length += length
        states[-1] = x = self.model.norm(x, hidden)
        return x, tuple(states) if output_hidden_states else None

    # ------------------------------------------------------------------------------ costs
    def head_costs(self, hidden: int, seq_len: int) -> tuple[int, int]:
        """(parameters, FLOPs over one sequence of `seq_len` tokens) of the head alone."""
        raise NotImplementedError

    def num_params(self, sub: DecoderSubNetwork | None = None) -> int:
        """Exact parameter count of sub-network `sub` (default: the full network); equals the
        parameter count of `extract_sub_network(sub)` (a tied LM head counts once)."""
        sub = sub or self.full_sub_network
        self.validate(sub)
        c, h = self.config, sub.hidden or self.config.hidden_size
        total = c.vocab_size * h + h + self.head_costs(h, 1)[0]  # embeddings, norm, head
        for k, g, n in zip(sub.kv_heads, sub.queries_per_kv, sub.units, strict=True):
            q, kv = k * g * c.head_dim, k * c.head_dim
            if k:  # q, k, v, o projections and the input norm
                total += 2 * h * q + 2 * h * kv + h
                total += (q + 2 * kv) * c.attention_bias + h * c.o_proj_bias
            if n:  # gate, up, down and the post-attention norm
                total += 3 * h * n + h + (2 * n + h) * c.mlp_bias
        return total

    def flops(self, sub: DecoderSubNetwork | None = None, seq_len: int = 128) -> int:
        """Floating-point operations (2 x multiply-adds of the matrix products, attention over
        all seq_len x seq_len pairs as the kernels compute it) of one forward pass over one
        sequence of `seq_len` tokens, head included. Element-wise work is not counted."""
        sub = sub or self.full_sub_network
        self.validate(sub)
        c, h, t = self.config, sub.hidden or self.config.hidden_size, seq_len
        total = self.head_costs(h, t)[1]
        for k, g, n in zip(sub.kv_heads, sub.queries_per_kv, sub.units, strict=True):
            q, kv = k * g * c.head_dim, k * c.head_dim
            total += 2 * t * h * (2 * q + 2 * kv)  # q, k, v, o projections
            total += 2 * t * t * q * 2  # scores and weighted values, per query head
            total += 2 * t * h * n * 3  # gate, up, down
        return total

    # ------------------------------------------------------------------------------ extract
    def extract_sub_network(self, sub: DecoderSubNetwork) -> DecoderModel:
        """A physically smaller model of this class holding copies of `sub`'s weights. Layers
        that keep nothing are left out; its outputs equal this model's with `sub` selected."""
        self.validate(sub)
        c, full = self.config, self.full_sub_network
        h = sub.hidden or c.hidden_size
        kept = [i for i, keep in enumerate(sub.layers) if keep]
        config = type(c).from_dict({
            **c.to_dict(), "hidden_size": h, "num_hidden_layers": len(kept),
            "layer_kv_heads": [sub.kv_heads[i] for i in kept],
            "layer_queries_per_kv": [sub.queries_per_kv[i] for i in kept],
            "layer_units": [sub.units[i] for i in kept],
        })
        state, device = self.state_dict(), self.model.embed_tokens.weight.device
        new = {"model.embed_tokens.weight": state["model.embed_tokens.weight"][:, :h],
               "model.norm.weight": state["model.norm.weight"][:h]}
        new.update({name: v[:, :h] for name, v in state.items() if not name.startswith("model.")})
        for j, i in enumerate(kept):
            k, g, n = sub.kv_heads[i], sub.queries_per_kv[i], sub.units[i]
            rows = query_rows(k, g, full.queries_per_kv[i], c.head_dim, device)
            kv = k * c.head_dim
            # (tensor, kept output rows, kept input columns or None for a vector)
            plan = [("self_attn.q_proj", rows, h), ("self_attn.k_proj", kv, h),
                    ("self_attn.v_proj", kv, h), ("self_attn.o_proj", h, rows),
                    ("input_layernorm", h, None)] if k else []
            plan += [("mlp.gate_proj", n, h), ("mlp.up_proj", n, h), ("mlp.down_proj", h, n),
                     ("post_attention_layernorm", h, None)] if n else []
            for name, out_sel, in_sel in plan:
                for p in ("weight", "bias"):
                    src = state.get(f"model.layers.{i}.{name}.{p}")
                    if src is not None:
                        sliced = _take(src, 0, out_sel)
                        if p == "weight" and in_sel is not None:
                            sliced = _take(sliced, 1, in_sel)
                        new[f"model.layers.{j}.{name}.{p}"] = sliced
        with torch.device("meta"):
            small = type(self)(config)
        small.load_state_dict({key: v.clone() for key, v in new.items()}, strict=True,
                              assign=True)
        return small.train(self.training)


class DecoderForCausalLM(DecoderModel):
    """Decoder + LM head; the supernet when built with the full configuration."""

    def __init__(self, config: DecoderConfig):
        super().__init__(config)
        self.lm_head = (None if config.tie_word_embeddings else
                        nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: DecoderCache | None = None, use_cache: bool = False,
                output_hidden_states: bool = False, **_: object) -> CausalLMOutputWithPast:
        """Next-token logits (batch, tokens, vocab); with `labels`, the mean cross-entropy of
        predicting token t+1 from tokens <= t (labels -100 are ignored). `attention_mask`
        covers the cached and the new tokens. With `use_cache` or a `cache`, the cache is
        extended in place and returned. `output_hidden_states`: see `run_body`."""
        if cache is None and use_cache:
            cache = DecoderCache()
        x, states = self.run_body(input_ids, attention_mask, position_ids, cache,
                                  output_hidden_states)
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        logits = F.linear(x, _take(head.weight, 1, self._hidden))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten().to(x.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache,
                                      hidden_states=states)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20,
                 attention_mask: torch.Tensor | None = None,
                 eos_token_id: int | list[int] | None = None) -> torch.Tensor:
        """Greedy decoding with the KV cache on the selected sub-network: the prompt (left
        padded if batched, with its `attention_mask`) followed by up to `max_new_tokens` tokens.
        A sequence that has produced `eos_token_id` (default: the config's) continues with the
        pad token; decoding stops early once every sequence has."""
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else (eos or []),
                           device=input_ids.device)
        pad = self.config.pad_token_id
        pad = pad if pad is not None else (int(eos[0]) if len(eos) else 0)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache, tokens = DecoderCache(), input_ids
        done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        out = self(input_ids, attention_mask=mask, position_ids=positions, cache=cache)
        for step in range(max_new_tokens):
            if step:  # feed the last token
                mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
                positions = positions[:, -1:] + 1
                out = self(tokens[:, -1:], attention_mask=mask, position_ids=positions,
                           cache=cache)
            new = out.logits[:, -1].argmax(-1).masked_fill(done, pad)
            done = done | torch.isin(new, eos)
            tokens = torch.cat((tokens, new[:, None]), dim=1)
            if bool(done.all()):
                break
        return tokens

    def head_costs(self, hidden: int, seq_len: int) -> tuple[int, int]:
        weights = self.config.vocab_size * hidden
        return (0 if self.config.tie_word_embeddings else weights), 2 * seq_len * weights


def last_token(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               pad_token_id: int | None) -> torch.Tensor:
    """Per sequence, the position of its last real token: the last position whose
    `attention_mask` is 1 (right or left padding); without a mask, transformers' rule for
    `...ForSequenceClassification`: the last token that is not `pad_token_id` (a batch of one
    without a pad token: the last position). The two agree when real tokens never equal the
    pad token."""
    if attention_mask is None and pad_token_id is None and len(input_ids) > 1:
        raise ValueError("cannot find the last token of a batch without an attention_mask or "
                         "config.pad_token_id; pass the attention_mask or set pad_token_id")
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    if attention_mask is not None:
        return (positions * attention_mask.to(input_ids.device).bool()).argmax(-1)
    if pad_token_id is None:  # one sequence, nothing to tell padding by: all of it is real
        return positions[-1:]
    return (positions * (input_ids != pad_token_id)).argmax(-1)


class DecoderForSequenceClassification(DecoderModel):
    """Decoder + `score` (transformers' `LlamaForSequenceClassification` head: a bias-free
    linear layer on the final-normed state of each sequence's last real token, `last_token`);
    the supernet when built with the full configuration."""

    def __init__(self, config: DecoderConfig):
        super().__init__(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, output_hidden_states: bool = False,
                **_: object) -> SequenceClassifierOutput:
        """Logits (batch, num_labels); with `labels`, the cross-entropy (MSE for one label, a
        regression). `output_hidden_states`: see `run_body`."""
        x, states = self.run_body(input_ids, attention_mask,
                                  output_hidden_states=output_hidden_states)
        last = last_token(input_ids, attention_mask, self.config.pad_token_id)
        pooled = x[torch.arange(x.shape[0], device=x.device), last]
        logits = F.linear(pooled, _take(self.score.weight, 1, self._hidden))
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=states)

    def head_costs(self, hidden: int, seq_len: int) -> tuple[int, int]:
        weights = hidden * self.config.num_labels
        return weights, 2 * weights  # it reads the last token only


AutoConfig.register(DecoderConfig.model_type, DecoderConfig, exist_ok=True)
AutoModelForCausalLM.register(DecoderConfig, DecoderForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(DecoderConfig, DecoderForSequenceClassification,
                                            exist_ok=True)
DecoderConfig.register_for_auto_class()
DecoderForCausalLM.register_for_auto_class("AutoModelForCausalLM")
DecoderForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
