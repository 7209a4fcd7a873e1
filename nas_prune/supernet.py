"""A BERT/RoBERTa encoder whose sub-networks are selected by slicing weights.

This one file is the whole model. It is the weight-sharing *supernet* of two-stage NAS
(Klein et al., "Structural Pruning of Pre-trained Language Models via Neural Architecture
Search", TMLR 2024): `set_sub_network` selects, per layer, which attention heads and which
FFN neurons are kept, and the forward pass runs on *slices* of the weight tensors, so a
sub-network with 25% of the encoder costs about 25% of the compute (the reference code masks
instead, which computes the full network whatever the mask).

A sub-network also keeps a prefix of the hidden (embedding) channels (Minitron, Muralidharan et
al. 2024): of the embedding tables, of every weight that reads the residual stream (Q/K/V, FFN up,
the head's dense layer: input columns) or writes it (attention output, FFN down: output rows and
biases) and of every LayerNorm, which then takes mean and variance over the kept channels only
and applies their weights and biases, as the extracted model (hidden size = kept width) does.
Q/K/V keep heads x head_dim rows and the head's dense layer its output width at any hidden width.

Heads, neurons and hidden channels can first be sorted by importance (nas_prune.importance:
DynaBERT, Hou et al. 2020, "network rewiring"), so that the prefixes the search spaces select
are the most important units; the full network's function does not change.

The same class, built with per-layer sizes (`EncoderConfig.layer_heads` / `layer_units`), is the
physically smaller *exported* model: `extract_sub_network` copies the kept slices into it.
This file imports only torch and transformers, so it can travel with an exported checkpoint
and load through the transformers Auto classes with `trust_remote_code=True`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.activations import ACT2FN
from transformers.modeling_outputs import SequenceClassifierOutput

log = logging.getLogger(__name__)

FAMILIES = ("bert", "roberta")
"""Hugging Face `model_type`s whose weights load into this encoder."""

POOLINGS = ("cls", "mean")
"""What the classification head reads: the first token's hidden state ("cls", BERT/RoBERTa's
own heads) or the mean over the real tokens ("mean", how sentence-transformers models such as
all-MiniLM-L6-v2 were trained)."""


class IllegalSubNetworkError(ValueError):
    """A sub-network that the supernet cannot select (wrong layer count, too many units, ...)."""


Selection = int | tuple[int, ...]
"""What is kept of one block: the first k units (an int), or the sorted indices of kept units."""


def _normalise(selection: Selection | Sequence[int]) -> Selection:
    # int, numpy integer, 0-d tensor; a 1-d array/tensor also has __index__ but lists indices
    if hasattr(selection, "__index__") and getattr(selection, "ndim", 0) == 0:
        return int(selection)
    indices = tuple(sorted(int(i) for i in selection))
    if len(set(indices)) != len(indices):
        raise IllegalSubNetworkError(f"duplicate unit indices in {indices}")
    return len(indices) if indices == tuple(range(len(indices))) else indices


def _count(selection: Selection) -> int:
    return selection if isinstance(selection, int) else len(selection)


@dataclass(frozen=True)
class SubNetwork:
    """Which attention heads and FFN neurons of each layer, and how many hidden channels, a
    sub-network keeps.

    Entry i of `heads` (`units`) describes layer i: an int k keeps the first k heads (neurons), a
    tuple keeps exactly those indices. 0 removes the block: a layer with 0 heads and 0 units is
    skipped entirely (the identity), as layer dropping does.
    """

    heads: tuple[Selection, ...]
    """Per layer: the first k attention heads, or the indices of the kept heads."""
    units: tuple[Selection, ...]
    """Per layer: the first k FFN neurons, or the indices of the kept neurons."""
    hidden: int | None = None
    """How many hidden (embedding) channels are kept, the first ones; None keeps them all."""

    def __post_init__(self) -> None:
        if self.hidden is not None:
            object.__setattr__(self, "hidden", int(self.hidden))
            if self.hidden < 1:
                raise IllegalSubNetworkError(f"hidden={self.hidden}: keep at least 1 channel")
        object.__setattr__(self, "heads", tuple(_normalise(h) for h in self.heads))
        object.__setattr__(self, "units", tuple(_normalise(u) for u in self.units))
        if len(self.heads) != len(self.units):
            raise IllegalSubNetworkError(
                f"heads has {len(self.heads)} layers but units has {len(self.units)}; "
                "give one entry per layer in both"
            )
        for selection in (*self.heads, *self.units):
            if isinstance(selection, int) and selection < 0:
                raise IllegalSubNetworkError(f"negative unit count {selection}")
            if isinstance(selection, tuple) and selection and selection[0] < 0:
                raise IllegalSubNetworkError(f"negative unit index in {selection}")

    @classmethod
    def uniform(cls, total_layers: int, num_layers: int, num_heads: int, num_units: int,
                hidden: int | None = None) -> SubNetwork:
        """The first `num_layers` layers keep their first `num_heads` heads and `num_units`
        neurons; the other layers are dropped; the first `hidden` channels are kept."""
        layers = range(total_layers)
        return cls(
            heads=tuple(num_heads if i < num_layers else 0 for i in layers),
            units=tuple(num_units if i < num_layers else 0 for i in layers),
            hidden=hidden,
        )

    @property
    def num_heads(self) -> tuple[int, ...]:
        """Number of kept heads per layer."""
        return tuple(_count(h) for h in self.heads)

    @property
    def num_units(self) -> tuple[int, ...]:
        """Number of kept FFN neurons per layer."""
        return tuple(_count(u) for u in self.units)

    @property
    def is_prefix(self) -> bool:
        """True when every block keeps a prefix of its units (so slicing needs no copy)."""
        return all(isinstance(s, int) for s in (*self.heads, *self.units))


class EncoderConfig(PretrainedConfig):
    """Architecture of the encoder (supernet or exported sub-network)."""

    model_type = "nas_prune_encoder"

    family: str = "bert"
    """Which Hugging Face family the weights come from: "bert" or "roberta"."""
    vocab_size: int = 30522
    hidden_size: int = 768
    """Residual-stream width: the kept hidden channels of an exported sub-network."""
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    """Heads per layer of the full (super)network."""
    head_dim: int = 64
    intermediate_size: int = 3072
    """FFN neurons per layer of the full (super)network."""
    layer_heads: list[int] | None = None
    """Per-layer head counts of an exported sub-network; None means the full network."""
    layer_units: list[int] | None = None
    """Per-layer FFN widths of an exported sub-network; None means the full network."""
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    pooling: str = "cls"
    """Input of the classification head, one of POOLINGS."""
    pooler_size: int | None = None
    """Output width of the head's dense (pooler) layer; None means hidden_size. An exported
    sub-network with fewer hidden channels keeps the supernet's pooler width."""

    @property
    def pooler_width(self) -> int:
        return self.pooler_size or self.hidden_size

    @property
    def heads_per_layer(self) -> list[int]:
        if self.layer_heads is not None:
            return list(self.layer_heads)
        return [self.num_attention_heads] * self.num_hidden_layers

    @property
    def units_per_layer(self) -> list[int]:
        if self.layer_units is not None:
            return list(self.layer_units)
        return [self.intermediate_size] * self.num_hidden_layers


def _take(weight: torch.Tensor, dim: int, selection: int | torch.Tensor | None) -> torch.Tensor:
    """Slice `weight` along `dim`: a prefix is a free view, an index set a gather."""
    if selection is None:
        return weight
    if isinstance(selection, int):
        return weight.narrow(dim, 0, selection)
    return weight.index_select(dim, selection)


# With nothing sliced away the module itself runs, so that its hooks (ZeRO-3 gathers a
# module's parameters when it is called) see the call.
def _norm(norm: nn.LayerNorm, x: torch.Tensor, hidden: int | None) -> torch.Tensor:
    """LayerNorm over x's (kept) channels: their mean and variance, their weights and biases."""
    if hidden is None:
        return norm(x)
    return F.layer_norm(x, (hidden,), norm.weight[:hidden], norm.bias[:hidden], norm.eps)


def _linear(x, linear: nn.Linear, rows=None, cols=None) -> torch.Tensor:
    """`linear` restricted to output rows `rows` and input columns `cols` (see _take)."""
    if rows is None and cols is None:
        return linear(x)
    weight = _take(_take(linear.weight, 0, rows), 1, cols)
    return F.linear(x, weight, _take(linear.bias, 0, rows))


class Embeddings(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.family = config.family
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                hidden: int | None = None) -> torch.Tensor:
        if self.family == "roberta":
            # RoBERTa numbers real tokens from pad_token_id + 1 and gives padding pad_token_id.
            not_pad = input_ids.ne(self.pad_token_id).int()
            positions = torch.cumsum(not_pad, dim=1) * not_pad + self.pad_token_id
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
        return self.dropout(_norm(self.norm, _take(x, 2, hidden), hidden))  # lookups: no FLOPs


class Attention(nn.Module):
    """Multi-head self-attention with residual + LayerNorm (post-norm, as in BERT)."""

    def __init__(self, config: EncoderConfig, num_heads: int):
        super().__init__()
        width = num_heads * config.head_dim
        self.num_heads, self.head_dim = num_heads, config.head_dim
        self.query = nn.Linear(config.hidden_size, width)
        self.key = nn.Linear(config.hidden_size, width)
        self.value = nn.Linear(config.hidden_size, width)
        self.out = nn.Linear(width, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attention_dropout = config.attention_probs_dropout_prob

    def forward(self, x, mask, heads: int, rows: int | torch.Tensor | None,
                hidden: int | None = None) -> torch.Tensor:
        """`heads` heads are kept; `rows` selects their rows of Q/K/V (None: all); `hidden`
        the first channels of the residual stream (None: all)."""
        batch, length, _ = x.shape

        def project(linear: nn.Linear) -> torch.Tensor:
            y = _linear(x, linear, rows, hidden)
            return y.view(batch, length, heads, self.head_dim).transpose(1, 2)

        context = F.scaled_dot_product_attention(
            project(self.query),
            project(self.key),
            project(self.value),
            attn_mask=mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        context = context.transpose(1, 2).reshape(batch, length, heads * self.head_dim)
        out = _linear(context, self.out, hidden, rows)
        return _norm(self.norm, x + self.dropout(out), hidden)


class FeedForward(nn.Module):
    """Position-wise FFN with residual + LayerNorm."""

    def __init__(self, config: EncoderConfig, num_units: int):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, num_units)
        self.down = nn.Linear(num_units, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, units: int | torch.Tensor | None,
                hidden: int | None = None) -> torch.Tensor:
        h = self.act(_linear(x, self.up, units, hidden))
        out = _linear(h, self.down, hidden, units)
        return _norm(self.norm, x + self.dropout(out), hidden)


class Layer(nn.Module):
    def __init__(self, config: EncoderConfig, num_heads: int, num_units: int):
        super().__init__()
        self.attention = Attention(config, num_heads) if num_heads else None
        self.ffn = FeedForward(config, num_units) if num_units else None


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The attention bias for a (batch, length) 0/1 padding mask: 0 where a key is a real token,
    the dtype's most negative value where it is padding, shaped (batch, 1, 1, length).

    It is applied to every batch, padded or not: a branch on the mask's values (skipping it when
    nothing is padded) would be data-dependent control flow, which a trace or an ONNX export
    records for the example batch only."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """One vector per sequence: the first token's state, or the mean over unmasked tokens."""
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(1)
    weights = attention_mask[..., None].to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


class ClassificationHead(nn.Module):
    """BERT: pooler (dense + tanh on the first token) then classifier; RoBERTa: the same dense
    + tanh layer inside its head. Both are dense -> tanh -> dropout -> out on token 0, or on
    the mean of the tokens with `pooling="mean"`."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        if config.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {config.pooling!r}")
        p = config.classifier_dropout
        p = config.hidden_dropout_prob if p is None else p
        self.family, self.pooling = config.family, config.pooling
        self.dense = nn.Linear(config.hidden_size, config.pooler_width)
        self.out = nn.Linear(config.pooler_width, config.num_labels)
        self.dropout = nn.Dropout(p)

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor | None,
                hidden: int | None = None) -> torch.Tensor:
        x = pool(states, attention_mask, self.pooling)
        if self.family == "roberta":
            x = self.dropout(x)
        return self.out(self.dropout(torch.tanh(_linear(x, self.dense, None, hidden))))


class EncoderForSequenceClassification(PreTrainedModel):
    """Encoder + classification head; the supernet when built with the full configuration."""

    config_class = EncoderConfig
    base_model_prefix = "encoder"
    _supports_sdpa = True

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        heads, units = config.heads_per_layer, config.units_per_layer
        if len(heads) != len(units):
            raise ValueError("layer_heads and layer_units must have one entry per layer")
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config, h, u) for h, u in zip(heads, units, strict=True))
        self.head = ClassificationHead(config)
        self._active: list[tuple[int, int | torch.Tensor | None, int, int | torch.Tensor | None]]
        self._hidden: int | None = None
        self.sub_network: SubNetwork | None = None
        self.reset_super_network()
        self.post_init()

    # ----------------------------------------------------------------------------- selection
    @property
    def full_sub_network(self) -> SubNetwork:
        """The whole network as a SubNetwork."""
        return SubNetwork(tuple(self.config.heads_per_layer), tuple(self.config.units_per_layer))

    def validate(self, sub: SubNetwork) -> None:
        """Raise IllegalSubNetworkError unless this network can select `sub`."""
        heads, units = self.config.heads_per_layer, self.config.units_per_layer
        if len(sub.heads) != len(heads):
            raise IllegalSubNetworkError(
                f"sub-network has {len(sub.heads)} layers, this model has {len(heads)}"
            )
        if sub.hidden is not None and sub.hidden > self.config.hidden_size:
            raise IllegalSubNetworkError(
                f"hidden={sub.hidden} but the model has {self.config.hidden_size} channels"
            )
        for i, (sh, su, h, u) in enumerate(zip(sub.heads, sub.units, heads, units, strict=True)):
            for what, sel, limit in (("heads", sh, h), ("units", su, u)):
                top = sel if isinstance(sel, int) else (sel[-1] + 1 if sel else 0)
                if top > limit:
                    raise IllegalSubNetworkError(
                        f"layer {i} keeps {what} up to {top} but has only {limit}"
                    )

    def set_sub_network(self, sub: SubNetwork) -> None:
        """Run every following forward pass on sub-network `sub` (sliced weights, no masks)."""
        self.validate(sub)
        device = self.embeddings.word.weight.device
        dim = self.config.head_dim
        active = []
        full = zip(self.config.heads_per_layer, self.config.units_per_layer, strict=True)
        for (full_h, full_u), h_sel, u_sel in zip(full, sub.heads, sub.units, strict=True):
            if isinstance(h_sel, int):
                rows = None if h_sel == full_h else h_sel * dim
            else:
                rows = _rows(h_sel, dim).to(device)
            if isinstance(u_sel, int):
                cols = None if u_sel == full_u else u_sel
            else:
                cols = torch.tensor(u_sel, device=device)
            active.append((_count(h_sel), rows, _count(u_sel), cols))
        self._active = active
        self._hidden = None if sub.hidden == self.config.hidden_size else sub.hidden
        self.sub_network = sub

    def reset_super_network(self) -> None:
        """Select the full network again."""
        heads, units = self.config.heads_per_layer, self.config.units_per_layer
        self._active = [(h, None, u, None) for h, u in zip(heads, units, strict=True)]
        self._hidden = None
        self.sub_network = None

    # ------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: object,
    ) -> SequenceClassifierOutput:
        hidden = self._hidden
        x = self.embeddings(input_ids, token_type_ids, hidden)
        mask = None if attention_mask is None else additive_mask(attention_mask, x.dtype)
        for layer, (heads, rows, units, cols) in zip(self.layers, self._active, strict=True):
            if heads:
                x = layer.attention(x, mask, heads, rows, hidden)
            if units:
                x = layer.ffn(x, cols, hidden)
        logits = self.head(x, attention_mask, hidden)
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    # ------------------------------------------------------------------------------ costs
    def num_params(self, sub: SubNetwork | None = None, *, encoder_only: bool = False) -> int:
        """Exact parameter count of sub-network `sub` (default: the full network), which equals
        the parameter count of the model `extract_sub_network(sub)` / export produce.
        `encoder_only` counts the transformer layers alone (no embeddings, no head)."""
        sub = sub or self.full_sub_network
        self.validate(sub)
        c = self.config
        hidden, dim, pooler = sub.hidden or c.hidden_size, c.head_dim, c.pooler_width
        total = 0
        for h, n in zip(sub.num_heads, sub.num_units, strict=True):
            if h:  # Q, K, V (weight + bias), output projection, LayerNorm
                total += 3 * (hidden * h * dim + h * dim) + h * dim * hidden + hidden + 2 * hidden
            if n:  # up, down, LayerNorm
                total += hidden * n + n + n * hidden + hidden + 2 * hidden
        if not encoder_only:  # the three embedding tables and their LayerNorm; the head
            total += (c.vocab_size + c.max_position_embeddings + c.type_vocab_size + 2) * hidden
            total += hidden * pooler + pooler + pooler * c.num_labels + c.num_labels
        return total

    def flops(self, sub: SubNetwork | None = None, seq_len: int = 128) -> int:
        """Floating-point operations (2 x multiply-adds of the matrix products) to classify one
        sequence of `seq_len` tokens with sub-network `sub`. Element-wise work is not counted."""
        sub = sub or self.full_sub_network
        self.validate(sub)
        c, t = self.config, seq_len
        hidden, dim, pooler = sub.hidden or c.hidden_size, c.head_dim, c.pooler_width
        total = 0
        for h, n in zip(sub.num_heads, sub.num_units, strict=True):
            width = h * dim
            total += 2 * t * hidden * width * 4  # Q, K, V and output projections
            total += 2 * t * t * width * 2  # scores and weighted values
            total += 2 * t * hidden * n * 2  # FFN up and down
        total += 2 * hidden * pooler + 2 * pooler * c.num_labels  # the head
        return total

    # ------------------------------------------------------------------------------ extract
    def extract_sub_network(self, sub: SubNetwork) -> EncoderForSequenceClassification:
        """A physically smaller model holding copies of `sub`'s weights (hidden size: the kept
        width). Layers that keep nothing are left out; its outputs equal this model's with `sub`
        selected."""
        self.validate(sub)
        c = self.config
        kept = [i for i, (h, n) in enumerate(zip(sub.num_heads, sub.num_units, strict=True))
                if h or n]
        hidden = sub.hidden or c.hidden_size
        config = EncoderConfig.from_dict(c.to_dict())
        config.hidden_size, config.pooler_size = hidden, c.pooler_width
        config.num_hidden_layers = len(kept)
        config.layer_heads = [sub.num_heads[i] for i in kept]
        config.layer_units = [sub.num_units[i] for i in kept]
        small = type(self)(config).to(self.device, self.dtype)
        chosen = {i: {"attention": _rows(sub.heads[i], c.head_dim), "ffn": _rows(sub.units[i], 1)}
                  for i in kept}
        new_state = {}
        for name, tensor in self.state_dict().items():
            layer, key = _split(name)
            block, unit_axis, hidden_axis = _AXES.get(key, (None, None, None))
            if layer is not None:
                if layer not in chosen or not len(chosen[layer][block]):
                    continue  # a dropped layer or block
                if unit_axis is not None:
                    tensor = tensor.index_select(unit_axis, chosen[layer][block].to(self.device))
                name = f"layers.{kept.index(layer)}.{key}"
            if hidden_axis is not None:
                tensor = tensor.narrow(hidden_axis, 0, hidden)
            new_state[name] = tensor.clone()
        small.load_state_dict(new_state, strict=True)
        return small.train(self.training)

    # ------------------------------------------------------------------------------ rewiring
    @torch.no_grad()
    def reorder(self, head_order: Sequence[torch.Tensor], unit_order: Sequence[torch.Tensor],
                hidden_order: torch.Tensor | None = None) -> None:
        """Permute heads and neurons of each layer (new unit j = old unit order[j]) and, given
        `hidden_order`, the hidden channels in every tensor that reads or writes the residual
        stream (a LayerNorm's mean and variance do not depend on the channels' order). The full
        network computes the same function afterwards."""
        if self.config.layer_heads is not None or self.config.layer_units is not None:
            raise ValueError("reorder applies to a full supernet, not an exported sub-network")
        orders = [{"attention": _rows(h, self.config.head_dim), "ffn": u.long()}
                  for _, h, u in zip(self.layers, head_order, unit_order, strict=True)]
        for name, param in self.named_parameters():
            layer, key = _split(name)
            block, unit_axis, hidden_axis = _AXES.get(key, (None, None, None))
            if layer is not None and unit_axis is not None:
                param.copy_(param.index_select(unit_axis, orders[layer][block].to(param.device)))
            if hidden_order is not None and hidden_axis is not None:
                param.copy_(param.index_select(hidden_axis, hidden_order.long().to(param.device)))
        self.reset_super_network()


_AXES: dict[str, tuple[str | None, int | None, int | None]] = {
    **{f"embeddings.{t}.weight": (None, None, 1) for t in ("word", "position", "token_type")},
    "embeddings.norm.weight": (None, None, 0), "embeddings.norm.bias": (None, None, 0),
    **{f"attention.{n}.{p}": ("attention", 0, 1 if p == "weight" else None)
       for n in ("query", "key", "value") for p in ("weight", "bias")},
    "attention.out.weight": ("attention", 1, 0), "attention.out.bias": ("attention", None, 0),
    "ffn.up.weight": ("ffn", 0, 1), "ffn.up.bias": ("ffn", 0, None),
    "ffn.down.weight": ("ffn", 1, 0), "ffn.down.bias": ("ffn", None, 0),
    **{f"{b}.norm.{p}": (b, None, 0) for b in ("attention", "ffn") for p in ("weight", "bias")},
    "head.dense.weight": (None, None, 1),
}
"""How each parameter is sliced (name inside a layer without "layers.i."): (block, axis over the
block's heads' rows or FFN neurons, axis over the hidden channels). Others are never sliced."""


def _split(name: str) -> tuple[int | None, str]:
    """(layer index, name inside the layer) of a parameter; (None, name) outside the layers."""
    if not name.startswith("layers."):
        return None, name
    _, index, key = name.split(".", 2)
    return int(index), key


def _rows(selection: Selection | torch.Tensor, dim: int) -> torch.Tensor:
    """Rows of units `selection` (a count, indices or an index tensor) of `dim` rows each."""
    units = torch.as_tensor(range(selection) if isinstance(selection, int) else selection,
                            dtype=torch.long)
    return (units[:, None] * dim + torch.arange(dim)).flatten()


# ---------------------------------------------------------------------------------- loading
def hf_state_map(family: str, num_layers: int, prefix: str) -> dict[str, str]:
    """Our parameter name -> the Hugging Face checkpoint's name."""
    m = {
        "embeddings.word.weight": "embeddings.word_embeddings.weight",
        "embeddings.position.weight": "embeddings.position_embeddings.weight",
        "embeddings.token_type.weight": "embeddings.token_type_embeddings.weight",
        "embeddings.norm.weight": "embeddings.LayerNorm.weight",
        "embeddings.norm.bias": "embeddings.LayerNorm.bias",
    }
    m = {k: prefix + v for k, v in m.items()}
    for i in range(num_layers):
        ours, theirs = f"layers.{i}.", f"{prefix}encoder.layer.{i}."
        for p in ("weight", "bias"):
            for name in ("query", "key", "value"):
                m[f"{ours}attention.{name}.{p}"] = f"{theirs}attention.self.{name}.{p}"
            m[f"{ours}attention.out.{p}"] = f"{theirs}attention.output.dense.{p}"
            m[f"{ours}attention.norm.{p}"] = f"{theirs}attention.output.LayerNorm.{p}"
            m[f"{ours}ffn.up.{p}"] = f"{theirs}intermediate.dense.{p}"
            m[f"{ours}ffn.down.{p}"] = f"{theirs}output.dense.{p}"
            m[f"{ours}ffn.norm.{p}"] = f"{theirs}output.LayerNorm.{p}"
    for p in ("weight", "bias"):
        if family == "bert":
            m[f"head.dense.{p}"] = f"{prefix}pooler.dense.{p}"
            m[f"head.out.{p}"] = f"classifier.{p}"
        else:
            m[f"head.dense.{p}"] = f"classifier.dense.{p}"
            m[f"head.out.{p}"] = f"classifier.out_proj.{p}"
    return m


HF_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
    "type_vocab_size", "layer_norm_eps", "initializer_range", "pad_token_id", "num_labels",
    "id2label", "label2id", "problem_type", "classifier_dropout",
)
"""Config fields that mean the same in a BERT/RoBERTa config and in EncoderConfig."""


def config_from_hf(hf_config: PretrainedConfig) -> EncoderConfig:
    """Our EncoderConfig for a Hugging Face BERT/RoBERTa config."""
    family = getattr(hf_config, "model_type", None)
    if family not in FAMILIES:
        raise ValueError(
            f"model_type {family!r} is not supported; nas_prune loads BERT and RoBERTa "
            f"checkpoints ({', '.join(FAMILIES)}). Choose a BERT- or RoBERTa-family model."
        )
    if getattr(hf_config, "position_embedding_type", "absolute") not in ("absolute", None):
        raise ValueError("only absolute position embeddings are supported")
    shared = {name: getattr(hf_config, name, None) for name in HF_CONFIG_FIELDS}
    return EncoderConfig(
        family=family, head_dim=hf_config.hidden_size // hf_config.num_attention_heads, **shared
    )


def from_hf(hf_model: PreTrainedModel, share: bool = False,
            pooling: str = "cls") -> EncoderForSequenceClassification:
    """Copy a transformers BERT/RoBERTa `...ForSequenceClassification` model into our encoder
    (whose head reads `pooling`; only "cls" computes what `hf_model` computes).

    With `share`, our model takes over `hf_model`'s tensors instead of copying them (no second
    copy of the weights in memory); use it when `hf_model` is discarded afterwards.
    """
    config = config_from_hf(hf_model.config)
    config.pooling = pooling
    state = hf_model.state_dict()
    prefix = hf_model.base_model_prefix + "."
    names = hf_state_map(config.family, config.num_hidden_layers, prefix)
    missing = [theirs for theirs in names.values() if theirs not in state]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} expected tensors, e.g. {missing[:3]}")
    if share:
        with torch.device("meta"):
            model = EncoderForSequenceClassification(config)
    else:
        model = EncoderForSequenceClassification(config)
    model.load_state_dict({ours: state[theirs] for ours, theirs in names.items()}, strict=True,
                          assign=share)
    return model.to(hf_model.dtype).train(hf_model.training)


def checkpoint_pooling(name_or_path: str, **hf_kwargs) -> str:
    """The pooling a checkpoint was trained with: "mean" for a sentence-transformers model that
    mean-pools (its ``1_Pooling/config.json`` says so), else "cls"."""
    from transformers.utils import cached_file

    where = {k: v for k, v in hf_kwargs.items() if k in ("cache_dir", "revision", "token")}
    try:
        path = cached_file(name_or_path, "1_Pooling/config.json",
                           _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **where)
    except OSError:  # cannot tell (no such repository, no network): the transformers default
        return "cls"
    if path is None:
        return "cls"
    with open(path) as f:
        settings = json.load(f)
    return "mean" if settings.get("pooling_mode_mean_tokens") else "cls"


class _HeldLoadReport(logging.Filter):
    """Holds back transformers' LOAD REPORT (a multi-line table logged as a warning whenever a
    checkpoint lacks weights the model has, as every base model under a new head does)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True


def from_pretrained_new_head(auto_class, name_or_path: str, head: str, **kwargs):
    """`auto_class.from_pretrained(name_or_path, output_loading_info=True, **kwargs)` for a
    model whose head (parameters named `head`...) may be new: transformers' LOAD REPORT is
    shown only when something else is off (other keys missing or unexpected, or the load fails:
    then it holds the details); a new head gets one info line. Returns (model, loading info)."""
    hf_log = logging.getLogger("transformers.modeling_utils")
    held = _HeldLoadReport()
    loading: Mapping[str, Sequence[str]] | None = None
    hf_log.addFilter(held)
    try:
        model, loading = auto_class.from_pretrained(name_or_path, output_loading_info=True,
                                                    **kwargs)
    finally:
        hf_log.removeFilter(held)
        missing = list(loading["missing_keys"]) if loading is not None else []
        if (loading is None or loading["unexpected_keys"]
                or any(not k.startswith(head) for k in missing)):
            for record in held.records:
                hf_log.handle(record)
    if missing:
        log.info("%s has no %s weights: a new head was initialised (it is trained next)",
                 name_or_path, head.rstrip("."))
    return model, loading


def load_pretrained(
    name_or_path: str, num_labels: int = 2, pooling: str = "auto", **hf_kwargs
) -> EncoderForSequenceClassification:
    """Load any Hugging Face BERT/RoBERTa checkpoint (hub name or local directory; a base model
    gets a freshly initialised classification head) or a nas_prune encoder checkpoint.

    `pooling` (one of POOLINGS, or "auto") chooses what the classification head reads. "auto"
    keeps a trained BERT/RoBERTa classifier on the first token it was trained on, and gives a new
    head the checkpoint's own pooling (`checkpoint_pooling`: mean for a mean-pooling
    sentence-transformers model). A nas_prune checkpoint keeps the pooling it was trained with;
    asking for another one is an error."""
    if pooling not in ("auto", *POOLINGS):
        raise ValueError(f"pooling must be 'auto' or one of {POOLINGS}, got {pooling!r}")
    config = AutoConfig.from_pretrained(name_or_path, num_labels=num_labels, **hf_kwargs)
    if isinstance(config, EncoderConfig):
        if pooling not in ("auto", config.pooling):
            raise ValueError(
                f"{name_or_path} was trained with {config.pooling!r} pooling; load it with "
                f"pooling='auto' or {config.pooling!r} (a head cannot switch its input)"
            )
        return EncoderForSequenceClassification.from_pretrained(name_or_path, config=config)
    config_from_hf(config)  # fail early, before loading weights, for other families
    hf_model, loading = from_pretrained_new_head(
        AutoModelForSequenceClassification, name_or_path, "classifier.", config=config,
        **hf_kwargs)
    if pooling == "auto":  # a classifier the checkpoint brings was trained on the first token
        new_head = any(k.startswith("classifier.") for k in loading["missing_keys"])
        pooling = checkpoint_pooling(name_or_path, **hf_kwargs) if new_head else "cls"
    model = from_hf(hf_model, share=True, pooling=pooling)
    del hf_model
    return model.eval()


AutoConfig.register(EncoderConfig.model_type, EncoderConfig, exist_ok=True)
AutoModelForSequenceClassification.register(
    EncoderConfig, EncoderForSequenceClassification, exist_ok=True
)
EncoderConfig.register_for_auto_class()
EncoderForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
