"""A BERT/RoBERTa classifier whose attention heads each have their own size (GRAIN).

GRAIN (Yang, Cui, Yao, Wang, "Gradient-based Intra-attention Pruning on Pre-trained Language
Models", ACL 2023) prunes *inside* attention heads: every head keeps its own number of
query/key dimensions and of value/output dimensions, and every layer its own FFN width. This
file is that model, in two uses:

* **Masked, full size (training).** `set_masks` multiplies FFN neurons, per-head Q/K dimensions
  and per-head V/O dimensions by 0/1 masks. A block (attention or FFN) whose units are all
  masked is skipped, so a layer with everything removed is the identity.
* **Physically smaller (after pruning).** `prune` copies the kept rows and columns into a new
  model whose config lists, per layer, the Q/K and V/O size of each kept head (`qk_dims`,
  `vo_dims`) and the FFN width (`ffn_units`); its logits equal the masked model's.

Weights are stored packed (only real rows), so parameter counts are exact. The forward pass is
batched over a layer's heads: the packed projections are scattered into a zero-padded
`(heads, max size)` layout, one `scaled_dot_product_attention` call runs every head (the zero
padding adds nothing to the scores), and the padded context is gathered back before the output
projection. Attention keeps the dense model's `1/sqrt(head_dim)` scale whatever a head's size;
a head that keeps V/O dims but no Q/K dims attends uniformly, as the masked model does.

Parameter names equal those of `nas_prune.supernet.EncoderForSequenceClassification`, so a
fine-tuned teacher maps in directly (`from_encoder`). This file imports only torch and
transformers, so it travels with an exported checkpoint and loads through the transformers
Auto classes with `trust_remote_code=True`.
"""

from __future__ import annotations

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


class GrainConfig(PretrainedConfig):
    """Architecture of a GRAIN model: a dense encoder's shape plus per-head pruned sizes."""

    model_type = "nas_prune_grain"

    family: str = "bert"
    """Which Hugging Face family the weights come from: "bert" or "roberta"."""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    """Heads per layer of the dense model."""
    head_dim: int = 64
    """Head size of the dense model; attention scores are scaled by 1/sqrt(head_dim)."""
    intermediate_size: int = 3072
    """FFN width of the dense model."""
    qk_dims: list[list[int]] | None = None
    """Per layer, per kept head: query/key dimensions. None: the dense model."""
    vo_dims: list[list[int]] | None = None
    """Per layer, per kept head: value/output dimensions (>= 1). None: the dense model."""
    ffn_units: list[int] | None = None
    """Per layer: FFN neurons. None: the dense model."""
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
    """Input of the classification head: the first token ("cls") or the mean of the tokens."""

    @property
    def layer_qk_dims(self) -> list[list[int]]:
        """Per layer, per head: query/key dimensions."""
        if self.qk_dims is not None:
            return [list(d) for d in self.qk_dims]
        return [[self.head_dim] * self.num_attention_heads for _ in range(self.num_hidden_layers)]

    @property
    def layer_vo_dims(self) -> list[list[int]]:
        """Per layer, per head: value/output dimensions."""
        if self.vo_dims is not None:
            return [list(d) for d in self.vo_dims]
        return [[self.head_dim] * self.num_attention_heads for _ in range(self.num_hidden_layers)]

    @property
    def layer_ffn_units(self) -> list[int]:
        """Per layer: FFN neurons."""
        if self.ffn_units is not None:
            return list(self.ffn_units)
        return [self.intermediate_size] * self.num_hidden_layers


@dataclass
class Masks:
    """Which units a model keeps (True), per layer, in the packed order of its weights: `qk`
    over the rows of the query (= key) projection, `vo` over the rows of the value projection
    (= columns of the output projection), `ffn` over the FFN neurons."""

    qk: list[torch.Tensor]
    vo: list[torch.Tensor]
    ffn: list[torch.Tensor]


# ------------------------------------------------------------------------------------ modules
class Embeddings(nn.Module):
    def __init__(self, config: GrainConfig):
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


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The attention bias for a (batch, length) 0/1 padding mask: 0 where a key is a real token,
    the dtype's most negative value where it is padding, shaped (batch, 1, 1, length).

    It is applied to every batch, padded or not: a branch on the mask's values (skipping it when
    nothing is padded) would be data-dependent control flow, which a trace or an ONNX export
    records for the example batch only."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _pad_positions(dims: list[int], width: int) -> list[int] | None:
    """Where each packed row goes in the (heads x width) padded layout; None if no padding."""
    if all(d == width for d in dims):
        return None
    return [h * width + i for h, d in enumerate(dims) for i in range(d)]


class Attention(nn.Module):
    """Self-attention over heads of individual sizes, with residual + LayerNorm (post-norm)."""

    def __init__(self, config: GrainConfig, qk_dims: list[int], vo_dims: list[int]):
        super().__init__()
        hidden = config.hidden_size
        self.qk_dims, self.vo_dims = list(qk_dims), list(vo_dims)
        self.num_heads = len(vo_dims)
        self.qk_width = max(max(qk_dims), 1)  # a layer of Q/K-less heads attends uniformly
        self.vo_width = max(vo_dims)
        # without any Q/K dimension every head attends uniformly: no (empty) projections
        self.query = nn.Linear(hidden, sum(qk_dims)) if sum(qk_dims) else None
        self.key = nn.Linear(hidden, sum(qk_dims)) if sum(qk_dims) else None
        self.value = nn.Linear(hidden, sum(vo_dims))
        self.out = nn.Linear(sum(vo_dims), hidden)
        self.norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attention_dropout = config.attention_probs_dropout_prob
        self.scale = config.head_dim**-0.5
        self._positions = {"qk": _pad_positions(self.qk_dims, self.qk_width),
                           "vo": _pad_positions(self.vo_dims, self.vo_width)}
        self._index: dict[str, torch.Tensor] = {}
        self.qk_mask: torch.Tensor | None = None
        self.vo_mask: torch.Tensor | None = None

    def _index_for(self, kind: str, device: torch.device) -> torch.Tensor | None:
        positions = self._positions[kind]
        if positions is None:
            return None
        index = self._index.get(kind)
        if index is None or index.device != device:
            index = self._index[kind] = torch.tensor(positions, dtype=torch.long, device=device)
        return index

    def _split_heads(self, y: torch.Tensor, kind: str, width: int) -> torch.Tensor:
        batch, length, _ = y.shape
        index = self._index_for(kind, y.device)
        if index is not None:
            y = y.new_zeros(batch, length, self.num_heads * width).index_copy(-1, index, y)
        return y.view(batch, length, self.num_heads, width).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, _ = x.shape
        v = self.value(x)
        if self.query is None:
            q = k = x.new_zeros(batch, length, 0)
        else:
            q, k = self.query(x), self.key(x)
        if self.qk_mask is not None:
            q, k = q * self.qk_mask, k * self.qk_mask
        if self.vo_mask is not None:
            v = v * self.vo_mask
        context = F.scaled_dot_product_attention(
            self._split_heads(q, "qk", self.qk_width),
            self._split_heads(k, "qk", self.qk_width),
            self._split_heads(v, "vo", self.vo_width),
            attn_mask=mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
            scale=self.scale,
        )
        context = context.transpose(1, 2).reshape(batch, length, self.num_heads * self.vo_width)
        index = self._index_for("vo", x.device)
        if index is not None:
            context = context.index_select(-1, index)
        return self.norm(x + self.dropout(self.out(context)))


class FeedForward(nn.Module):
    """Position-wise FFN with residual + LayerNorm."""

    def __init__(self, config: GrainConfig, num_units: int):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, num_units)
        self.down = nn.Linear(num_units, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.up(x))
        if self.mask is not None:
            h = h * self.mask
        return self.norm(x + self.dropout(self.down(h)))


class Layer(nn.Module):
    """Attention then FFN; a missing block (no heads / no neurons) is skipped."""

    def __init__(self, config: GrainConfig, qk_dims: list[int], vo_dims: list[int], units: int):
        super().__init__()
        self.attention = Attention(config, qk_dims, vo_dims) if vo_dims else None
        self.ffn = FeedForward(config, units) if units else None
        self.attention_alive = self.attention is not None
        self.ffn_alive = self.ffn is not None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.attention_alive:
            x = self.attention(x, mask)
        if self.ffn_alive:
            x = self.ffn(x)
        return x


class ClassificationHead(nn.Module):
    """dense -> tanh -> dropout -> out on the first token (BERT's pooler + classifier, or
    RoBERTa's classification head, which adds a dropout before the dense layer), or on the mean
    of the tokens (`pooling="mean"`)."""

    def __init__(self, config: GrainConfig):
        super().__init__()
        if config.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {config.pooling!r}")
        p = config.classifier_dropout
        p = config.hidden_dropout_prob if p is None else p
        self.family, self.pooling = config.family, config.pooling
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.num_labels)
        self.dropout = nn.Dropout(p)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.pooling == "cls":
            x = hidden[:, 0]
        elif attention_mask is None:
            x = hidden.mean(1)
        else:
            weights = attention_mask[..., None].to(hidden.dtype)
            x = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        if self.family == "roberta":
            x = self.dropout(x)
        return self.out(self.dropout(torch.tanh(self.dense(x))))


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


# ------------------------------------------------------------------------------------- model
class GrainForSequenceClassification(PreTrainedModel):
    """Encoder with per-head attention sizes + classification head."""

    config_class = GrainConfig
    base_model_prefix = "encoder"
    _supports_sdpa = True

    def __init__(self, config: GrainConfig):
        super().__init__(config)
        qk, vo, units = config.layer_qk_dims, config.layer_vo_dims, config.layer_ffn_units
        if not len(qk) == len(vo) == len(units) == config.num_hidden_layers:
            raise ValueError("qk_dims, vo_dims and ffn_units need one entry per layer")
        for i, (q, v) in enumerate(zip(qk, vo, strict=True)):
            if len(q) != len(v) or min(v, default=1) < 1 or min(q, default=0) < 0:
                raise ValueError(
                    f"layer {i}: qk_dims {q} and vo_dims {v} need one entry per head, every "
                    "head at least one V/O dimension and no negative size"
                )
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(
            Layer(config, q, v, n) for q, v, n in zip(qk, vo, units, strict=True)
        )
        self.head = ClassificationHead(config)
        self.post_init()

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_encoder(cls, encoder: PreTrainedModel) -> GrainForSequenceClassification:
        """The same network as a `nas_prune.supernet.EncoderForSequenceClassification` (whole
        heads, as fine-tuned or exported), with its weights copied in."""
        source = encoder.config
        fields = {k: v for k, v in source.to_dict().items()
                  if k in GrainConfig.__dataclass_fields__ and k not in ("qk_dims", "vo_dims",
                                                                          "ffn_units")}
        config = GrainConfig(**fields)
        heads, units = source.heads_per_layer, source.units_per_layer
        config.num_hidden_layers = len(heads)
        if heads != [config.num_attention_heads] * len(heads) or units != [
            config.intermediate_size
        ] * len(heads):
            config.qk_dims = [[config.head_dim] * h for h in heads]
            config.vo_dims = [[config.head_dim] * h for h in heads]
            config.ffn_units = list(units)
        model = cls(config).to(encoder.dtype)
        model.load_state_dict(encoder.state_dict(), strict=True)
        return model.to(encoder.device).train(encoder.training)

    # ------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        **_: object,
    ) -> SequenceClassifierOutput:
        x = self.embeddings(input_ids, token_type_ids)
        mask = None if attention_mask is None else additive_mask(attention_mask, x.dtype)
        hidden = [x]
        for layer in self.layers:
            x = layer(x, mask)
            hidden.append(x)
        logits = self.head(x, attention_mask)
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=tuple(hidden) if output_hidden_states else None
        )

    # ------------------------------------------------------------------------------ masks
    def full_masks(self) -> Masks:
        """Masks that keep every unit of this model."""
        device = self.embeddings.word.weight.device
        qk, vo, ffn = [], [], []
        for layer in self.layers:
            att = layer.attention
            qk.append(torch.ones(sum(att.qk_dims) if att else 0, dtype=torch.bool,
                                 device=device))
            vo.append(torch.ones(att.value.out_features if att else 0, dtype=torch.bool,
                                 device=device))
            ffn.append(torch.ones(layer.ffn.up.out_features if layer.ffn else 0,
                                  dtype=torch.bool, device=device))
        return Masks(qk, vo, ffn)

    def set_masks(self, masks: Masks | None) -> None:
        """Multiply every following forward pass's units by `masks` (None: no masks). A block
        whose units are all masked is skipped, as `prune` removes it."""
        self._check(masks or self.full_masks())
        for i, layer in enumerate(self.layers):
            att, ffn = layer.attention, layer.ffn
            if att is not None:
                weight = att.value.weight
                att.qk_mask = None if masks is None else masks.qk[i].to(weight.device,
                                                                           weight.dtype)
                att.vo_mask = None if masks is None else masks.vo[i].to(weight.device,
                                                                           weight.dtype)
                layer.attention_alive = masks is None or bool(masks.vo[i].any())
            if ffn is not None:
                ffn.mask = None if masks is None else masks.ffn[i].to(ffn.up.weight.device,
                                                                      ffn.up.weight.dtype)
                layer.ffn_alive = masks is None or bool(masks.ffn[i].any())

    def _check(self, masks: Masks) -> None:
        full = self.full_masks()
        for kind in ("qk", "vo", "ffn"):
            got, want = getattr(masks, kind), getattr(full, kind)
            shapes = [tuple(m.shape) for m in got]
            if shapes != [tuple(m.shape) for m in want]:
                raise ValueError(f"{kind} masks have shapes {shapes}, this model needs "
                                 f"{[tuple(m.shape) for m in want]}")

    # ------------------------------------------------------------------------------ pruning
    @torch.no_grad()
    def prune(self, masks: Masks) -> GrainForSequenceClassification:
        """A physically smaller model keeping the units `masks` keep; its outputs equal this
        model's with `masks` set. A head without V/O dimensions loses its Q/K dimensions too;
        a layer keeping nothing becomes the identity (it stays in the layer list, without
        parameters, so hidden states still line up with the dense model's)."""
        self._check(masks)
        config = GrainConfig.from_dict(self.config.to_dict())
        qk_dims, vo_dims, ffn_units, rows = [], [], [], []
        for i, layer in enumerate(self.layers):
            q_keep, v_keep = masks.qk[i].bool().cpu(), masks.vo[i].bool().cpu()
            q_rows, v_rows, q_sizes, v_sizes = [], [], [], []
            if layer.attention is not None:
                att = layer.attention
                q_start = v_start = 0
                for q_dim, v_dim in zip(att.qk_dims, att.vo_dims, strict=True):
                    v_idx = v_keep[v_start:v_start + v_dim].nonzero().flatten() + v_start
                    q_idx = q_keep[q_start:q_start + q_dim].nonzero().flatten() + q_start
                    q_start, v_start = q_start + q_dim, v_start + v_dim
                    if len(v_idx):
                        q_rows.append(q_idx)
                        v_rows.append(v_idx)
                        q_sizes.append(len(q_idx))
                        v_sizes.append(len(v_idx))
            units = masks.ffn[i].bool().cpu().nonzero().flatten()
            qk_dims.append(q_sizes)
            vo_dims.append(v_sizes)
            ffn_units.append(len(units))
            rows.append((_cat(q_rows), _cat(v_rows), units))
        config.qk_dims, config.vo_dims, config.ffn_units = qk_dims, vo_dims, ffn_units
        small = type(self)(config).to(self.device, self.dtype)
        state = self.state_dict()
        new_state = {k: v for k, v in state.items() if not k.startswith("layers.")}
        for i, (q_rows, v_rows, units) in enumerate(rows):
            p = f"layers.{i}."
            if vo_dims[i]:
                kept = (("query", q_rows), ("key", q_rows)) if len(q_rows) else ()
                for name, idx in (*kept, ("value", v_rows)):
                    for t in ("weight", "bias"):
                        key = f"{p}attention.{name}.{t}"
                        new_state[key] = state[key][idx.to(state[key].device)]
                key = f"{p}attention.out.weight"
                new_state[key] = state[key][:, v_rows.to(state[key].device)]
                for t in ("out.bias", "norm.weight", "norm.bias"):
                    new_state[f"{p}attention.{t}"] = state[f"{p}attention.{t}"]
            if ffn_units[i]:
                units = units.to(state[f"{p}ffn.up.weight"].device)
                new_state[f"{p}ffn.up.weight"] = state[f"{p}ffn.up.weight"][units]
                new_state[f"{p}ffn.up.bias"] = state[f"{p}ffn.up.bias"][units]
                new_state[f"{p}ffn.down.weight"] = state[f"{p}ffn.down.weight"][:, units]
                for t in ("down.bias", "norm.weight", "norm.bias"):
                    new_state[f"{p}ffn.{t}"] = state[f"{p}ffn.{t}"]
        small.load_state_dict({k: v.clone() for k, v in new_state.items()}, strict=True)
        return small.train(self.training)

    # ------------------------------------------------------------------------------ costs
    def num_params(self, encoder_only: bool = False) -> int:
        """Parameters of this model (exact: weights are stored without padding);
        `encoder_only` counts the transformer layers alone (no embeddings, no head)."""
        total = sum(p.numel() for p in self.layers.parameters())
        if not encoder_only:
            total += sum(p.numel() for p in self.embeddings.parameters())
            total += sum(p.numel() for p in self.head.parameters())
        return total

    def flops(self, seq_len: int = 128) -> int:
        """Floating-point operations (2 x multiply-adds of the matrix products) to classify one
        sequence of `seq_len` tokens, counting each head's real sizes (not the padding), as
        `EncoderForSequenceClassification.flops` does. Element-wise work is not counted."""
        hidden, t = self.config.hidden_size, seq_len
        total = 0
        for layer in self.layers:
            if layer.attention is not None:
                qk, vo = sum(layer.attention.qk_dims), sum(layer.attention.vo_dims)
                total += 2 * t * hidden * (2 * qk + 2 * vo)  # Q, K, V and output projections
                total += 2 * t * t * (qk + vo)  # scores and weighted values
            if layer.ffn is not None:
                total += 2 * t * hidden * layer.ffn.up.out_features * 2  # FFN up and down
        total += 2 * hidden * hidden + 2 * hidden * self.config.num_labels  # head on token 0
        return total


AutoConfig.register(GrainConfig.model_type, GrainConfig, exist_ok=True)
AutoModelForSequenceClassification.register(
    GrainConfig, GrainForSequenceClassification, exist_ok=True
)
GrainConfig.register_for_auto_class()
GrainForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
