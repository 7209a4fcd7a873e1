"""A BERT/RoBERTa encoder whose sub-networks are selected by slicing weights.

This one file is the whole model. It is the weight-sharing *supernet* of two-stage NAS
(Klein et al., "Structural Pruning of Pre-trained Language Models via Neural Architecture
Search", TMLR 2024): `set_sub_network` selects, per layer, which attention heads and which
FFN neurons are kept, and the forward pass runs on *slices* of the weight tensors, so a
sub-network with 25% of the encoder costs about 25% of the compute (the reference code masks
instead, which computes the full network whatever the mask).

Heads and neurons can first be sorted by importance (nas_prune.importance: DynaBERT, Hou et al.
2020, "network rewiring"), so that the prefixes the search spaces select are the most important
units; the full network's function does not change.

The same class, built with per-layer sizes (`EncoderConfig.layer_heads` / `layer_units`), is the
physically smaller *exported* model: `extract_sub_network` copies the kept slices into it.
This file imports only torch and transformers, so it can travel with an exported checkpoint
and load through the transformers Auto classes with `trust_remote_code=True`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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
    """Which attention heads and FFN neurons of each layer a sub-network keeps.

    Entry i of `heads` (`units`) describes layer i: an int k keeps the first k heads (neurons), a
    tuple keeps exactly those indices. 0 removes the block: a layer with 0 heads and 0 units is
    skipped entirely (the identity), as layer dropping does.
    """

    heads: tuple[Selection, ...]
    """Per layer: the first k attention heads, or the indices of the kept heads."""
    units: tuple[Selection, ...]
    """Per layer: the first k FFN neurons, or the indices of the kept neurons."""

    def __post_init__(self) -> None:
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
    def uniform(cls, total_layers: int, num_layers: int, num_heads: int, num_units: int):
        """The first `num_layers` layers keep their first `num_heads` heads and `num_units`
        neurons; the other layers are dropped."""
        layers = range(total_layers)
        return cls(
            heads=tuple(num_heads if i < num_layers else 0 for i in layers),
            units=tuple(num_units if i < num_layers else 0 for i in layers),
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

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        if self.family == "roberta":
            # RoBERTa numbers real tokens from pad_token_id + 1 and gives padding pad_token_id.
            not_pad = input_ids.ne(self.pad_token_id).int()
            positions = torch.cumsum(not_pad, dim=1) * not_pad + self.pad_token_id
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


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

    def forward(self, x, mask, heads: int, rows: int | torch.Tensor | None) -> torch.Tensor:
        """`heads` heads are kept; `rows` selects their rows of Q/K/V (None: all)."""
        batch, length, _ = x.shape

        def project(linear: nn.Linear) -> torch.Tensor:
            y = F.linear(x, _take(linear.weight, 0, rows), _take(linear.bias, 0, rows))
            return y.view(batch, length, heads, self.head_dim).transpose(1, 2)

        context = F.scaled_dot_product_attention(
            project(self.query),
            project(self.key),
            project(self.value),
            attn_mask=mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        context = context.transpose(1, 2).reshape(batch, length, heads * self.head_dim)
        out = F.linear(context, _take(self.out.weight, 1, rows), self.out.bias)
        return self.norm(x + self.dropout(out))


class FeedForward(nn.Module):
    """Position-wise FFN with residual + LayerNorm."""

    def __init__(self, config: EncoderConfig, num_units: int):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, num_units)
        self.down = nn.Linear(num_units, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, units: int | torch.Tensor | None) -> torch.Tensor:
        h = self.act(F.linear(x, _take(self.up.weight, 0, units), _take(self.up.bias, 0, units)))
        out = F.linear(h, _take(self.down.weight, 1, units), self.down.bias)
        return self.norm(x + self.dropout(out))


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
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.num_labels)
        self.dropout = nn.Dropout(p)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        x = pool(hidden, attention_mask, self.pooling)
        if self.family == "roberta":
            x = self.dropout(x)
        return self.out(self.dropout(torch.tanh(self.dense(x))))


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
                idx = torch.tensor(h_sel, device=device)
                rows = (idx[:, None] * dim + torch.arange(dim, device=device)).flatten()
            if isinstance(u_sel, int):
                cols = None if u_sel == full_u else u_sel
            else:
                cols = torch.tensor(u_sel, device=device)
            active.append((_count(h_sel), rows, _count(u_sel), cols))
        self._active = active
        self.sub_network = sub

    def reset_super_network(self) -> None:
        """Select the full network again."""
        heads, units = self.config.heads_per_layer, self.config.units_per_layer
        self._active = [(h, None, u, None) for h, u in zip(heads, units, strict=True)]
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
        x = self.embeddings(input_ids, token_type_ids)
        mask = None if attention_mask is None else additive_mask(attention_mask, x.dtype)
        for layer, (heads, rows, units, cols) in zip(self.layers, self._active, strict=True):
            if heads:
                x = layer.attention(x, mask, heads, rows)
            if units:
                x = layer.ffn(x, cols)
        logits = self.head(x, attention_mask)
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
        hidden, dim = self.config.hidden_size, self.config.head_dim
        total = 0
        for h, n in zip(sub.num_heads, sub.num_units, strict=True):
            if h:  # Q, K, V (weight + bias), output projection, LayerNorm
                total += 3 * (hidden * h * dim + h * dim) + h * dim * hidden + hidden + 2 * hidden
            if n:  # up, down, LayerNorm
                total += hidden * n + n + n * hidden + hidden + 2 * hidden
        if not encoder_only:
            total += sum(p.numel() for p in self.embeddings.parameters())
            total += sum(p.numel() for p in self.head.parameters())
        return total

    def flops(self, sub: SubNetwork | None = None, seq_len: int = 128) -> int:
        """Floating-point operations (2 x multiply-adds of the matrix products) to classify one
        sequence of `seq_len` tokens with sub-network `sub`. Element-wise work is not counted."""
        sub = sub or self.full_sub_network
        self.validate(sub)
        hidden, dim, t = self.config.hidden_size, self.config.head_dim, seq_len
        total = 0
        for h, n in zip(sub.num_heads, sub.num_units, strict=True):
            width = h * dim
            total += 2 * t * hidden * width * 4  # Q, K, V and output projections
            total += 2 * t * t * width * 2  # scores and weighted values
            total += 2 * t * hidden * n * 2  # FFN up and down
        total += 2 * hidden * hidden + 2 * hidden * self.config.num_labels  # the head
        return total

    # ------------------------------------------------------------------------------ extract
    def extract_sub_network(self, sub: SubNetwork) -> EncoderForSequenceClassification:
        """A physically smaller model holding copies of `sub`'s weights. Layers that keep
        nothing are left out; its outputs equal this model's with `sub` selected."""
        self.validate(sub)
        pairs = enumerate(zip(sub.num_heads, sub.num_units, strict=True))
        kept = [i for i, (h, n) in pairs if h or n]
        config = EncoderConfig.from_dict(self.config.to_dict())
        config.num_hidden_layers = len(kept)
        config.layer_heads = [sub.num_heads[i] for i in kept]
        config.layer_units = [sub.num_units[i] for i in kept]
        small = type(self)(config).to(self.device, self.dtype)
        state = self.state_dict()
        new_state = {k: v for k, v in state.items() if not k.startswith("layers.")}
        dim = self.config.head_dim
        for j, i in enumerate(kept):
            h_sel, u_sel = sub.heads[i], sub.units[i]
            rows = _rows(h_sel, dim)
            units = torch.arange(u_sel) if isinstance(u_sel, int) else torch.tensor(u_sel)
            src, dst = f"layers.{i}.", f"layers.{j}."
            if sub.num_heads[i]:
                for name in ("query", "key", "value"):
                    for p in ("weight", "bias"):
                        new_state[f"{dst}attention.{name}.{p}"] = state[
                            f"{src}attention.{name}.{p}"
                        ][rows]
                new_state[f"{dst}attention.out.weight"] = state[f"{src}attention.out.weight"][
                    :, rows
                ]
                for p in ("out.bias", "norm.weight", "norm.bias"):
                    new_state[f"{dst}attention.{p}"] = state[f"{src}attention.{p}"]
            if sub.num_units[i]:
                new_state[f"{dst}ffn.up.weight"] = state[f"{src}ffn.up.weight"][units]
                new_state[f"{dst}ffn.up.bias"] = state[f"{src}ffn.up.bias"][units]
                new_state[f"{dst}ffn.down.weight"] = state[f"{src}ffn.down.weight"][:, units]
                for p in ("down.bias", "norm.weight", "norm.bias"):
                    new_state[f"{dst}ffn.{p}"] = state[f"{src}ffn.{p}"]
        small.load_state_dict({k: v.clone() for k, v in new_state.items()}, strict=True)
        return small.train(self.training)

    # ------------------------------------------------------------------------------ rewiring
    @torch.no_grad()
    def reorder(self, head_order: Sequence[torch.Tensor], unit_order: Sequence[torch.Tensor]):
        """Permute heads and neurons of each layer (new unit j = old unit order[j]). The full
        network computes the same function afterwards."""
        if self.config.layer_heads is not None or self.config.layer_units is not None:
            raise ValueError("reorder applies to a full supernet, not an exported sub-network")
        dim = self.config.head_dim
        for layer, h_order, u_order in zip(self.layers, head_order, unit_order, strict=True):
            rows = (h_order.long()[:, None] * dim + torch.arange(dim)).flatten()
            rows = rows.to(self.device)
            att, ffn = layer.attention, layer.ffn
            for linear in (att.query, att.key, att.value):
                linear.weight.copy_(linear.weight[rows])
                linear.bias.copy_(linear.bias[rows])
            att.out.weight.copy_(att.out.weight[:, rows])
            u_order = u_order.long().to(self.device)
            ffn.up.weight.copy_(ffn.up.weight[u_order])
            ffn.up.bias.copy_(ffn.up.bias[u_order])
            ffn.down.weight.copy_(ffn.down.weight[:, u_order])
        self.reset_super_network()


def _rows(selection: Selection, dim: int) -> torch.Tensor:
    heads = torch.arange(selection) if isinstance(selection, int) else torch.tensor(selection)
    return (heads[:, None] * dim + torch.arange(dim)).flatten()


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
    hf_model, loading = AutoModelForSequenceClassification.from_pretrained(
        name_or_path, config=config, output_loading_info=True, **hf_kwargs
    )
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
