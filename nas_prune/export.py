"""Export a sub-network as a physically smaller Hugging Face model directory.

When the sub-network has a shape a stock `BertConfig` / `RobertaConfig` can describe (every
kept layer keeps all heads and the same number of FFN neurons; dropped layers are dropped whole;
all hidden channels are kept, since a stock config ties the head size to hidden_size / heads)
and its head reads the first token (stock heads cannot mean-pool), the directory is a stock
checkpoint. Otherwise it holds our `EncoderConfig` with per-layer head and neuron counts, the
hidden and pooler widths and the head's pooling, and the model file itself (``supernet.py``,
referenced by ``auto_map``), so
``AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)`` loads it
anywhere transformers is installed.

Decoders (`export_decoder`; `export_sub_network` hands them over) follow the same rule (DESIGN.md
decisions 2 and 8), for both heads. A sub-network whose kept layers all keep both blocks with
the same KV heads, queries per KV head and MLP width is a stock `LlamaForCausalLM` /
`LlamaForSequenceClassification` (`Qwen2...` for a Qwen2 source), any hidden width included:
Llama configs carry the head size, so a narrower residual stream is still a stock shape, as long
as it is a multiple of the query head count (which `LlamaConfig` checks). Otherwise the
directory holds our `DecoderConfig` with per-layer shapes and the model file (``decoder.py``,
with ``supernet.py`` for the shared error type), and ``AutoModelForCausalLM`` /
``AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)`` loads it.
A stock classifier finds each sequence's last token from ``pad_token_id`` (ours from the
attention mask), so keep a pad token in the config that real text never contains.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from nas_prune.decoder import (
    DecoderConfig,
    DecoderForSequenceClassification,
    DecoderModel,
    DecoderSubNetwork,
)
from nas_prune.supernet import (
    HF_CONFIG_FIELDS,
    EncoderConfig,
    EncoderForSequenceClassification,
    SubNetwork,
    hf_state_map,
)

log = logging.getLogger(__name__)

SUBNETWORK_FILE = "nas_prune_subnetwork.json"
"""Written beside the weights: the sub-network, its costs and whatever metadata the caller adds."""

_STOCK = {"bert": (BertConfig, BertForSequenceClassification),
          "roberta": (RobertaConfig, RobertaForSequenceClassification)}
_STOCK_DECODERS = {"llama": (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification),
                   "qwen2": (Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification)}
"""Per family: the config class, the causal-LM class, the sequence-classification class."""


def stock_shape(config: EncoderConfig, sub: SubNetwork) -> tuple[int, int] | None:
    """(layers, FFN width) when `sub` fits a stock BERT/RoBERTa config, else None."""
    if config.pooling != "cls" or sub.hidden not in (None, config.hidden_size):
        return None
    if not config.hidden_size == config.pooler_width == \
            config.num_attention_heads * config.head_dim:  # an extracted reduced-hidden model
        return None
    kept = [(h, n) for h, n in zip(sub.num_heads, sub.num_units, strict=True) if h or n]
    widths = {n for _, n in kept}
    if any(h != config.num_attention_heads for h, _ in kept) or len(widths) > 1 or 0 in widths:
        return None
    return len(kept), (widths.pop() if widths else config.intermediate_size)


def to_stock(model: EncoderForSequenceClassification) -> PreTrainedModel:
    """A transformers BERT/RoBERTa model with the weights of `model`, an extracted sub-network
    whose layers all have the full head count and one FFN width."""
    c = model.config
    widths = set(c.units_per_layer)
    if set(c.heads_per_layer) - {c.num_attention_heads} or len(widths) > 1:
        raise ValueError("this model's shape does not fit a stock BERT/RoBERTa config")
    if not c.hidden_size == c.pooler_width == c.num_attention_heads * c.head_dim:
        raise ValueError(
            f"hidden size {c.hidden_size} (pooler {c.pooler_width}) differs from heads x "
            f"head_dim = {c.num_attention_heads * c.head_dim}, which a stock BERT/RoBERTa "
            "config requires; export it with our EncoderConfig (export_sub_network does)"
        )
    if c.pooling != "cls":
        raise ValueError(f"stock BERT/RoBERTa heads read the first token, this model uses "
                         f"{c.pooling!r} pooling")
    config_cls, model_cls = _STOCK[c.family]
    shared = {name: getattr(c, name) for name in HF_CONFIG_FIELDS}
    shared["intermediate_size"] = widths.pop() if widths else c.intermediate_size
    hf_config = config_cls(**shared)
    hf_model = model_cls(hf_config)
    names = hf_state_map(c.family, c.num_hidden_layers, hf_model.base_model_prefix + ".")
    state = model.state_dict()
    missing, unexpected = hf_model.load_state_dict(
        {theirs: state[ours] for ours, theirs in names.items()}, strict=False
    )
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    return hf_model.to(model.dtype).train(model.training)


def export_sub_network(
    model: EncoderForSequenceClassification | DecoderModel,
    sub: SubNetwork,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    metadata: dict[str, Any] | None = None,
    seq_len: int = 128,
) -> Path:
    """Write sub-network `sub` of `model` to `out_dir` as a loadable Hugging Face model.

    The directory is written next to its final place and renamed into it, so an interrupted
    export never leaves a half-written model; an existing directory is replaced.

    Args:
        model: the supernet: an encoder, or a decoder of either head (`export_decoder`).
        sub: the sub-network to export.
        out_dir: target directory.
        tokenizer: saved beside the model when given.
        metadata: extra JSON-serialisable facts for ``nas_prune_subnetwork.json``.
        seq_len: sequence length at which the recorded FLOPs are counted.

    Returns:
        The directory path.
    """
    if isinstance(model, DecoderModel):
        return export_decoder(model, sub, out_dir, tokenizer, metadata, seq_len)
    shape = {"heads": [list(h) if isinstance(h, tuple) else h for h in sub.heads],
             "units": [list(u) if isinstance(u, tuple) else u for u in sub.units]}
    return _export(model, sub, out_dir, tokenizer, to_stock if stock_shape(model.config, sub)
                   else None, shape, metadata, seq_len)


def _export(model: Any, sub: Any, out_dir: str | os.PathLike, tokenizer: Any,
            stock: Any, shape: dict[str, Any], metadata: dict[str, Any] | None,
            seq_len: int) -> Path:
    """Extract `sub` from supernet `model`, convert it with `stock` (a to-stock function; None
    keeps our class) and save it with the facts of `nas_prune_subnetwork.json`."""
    small = model.extract_sub_network(sub).eval()
    params = model.num_params(sub)
    info = {
        **shape,
        "hidden": sub.hidden or model.config.hidden_size,
        "stock": stock is not None,
        "params": params,
        "params_ratio": params / model.num_params(),
        "flops": model.flops(sub, seq_len),
        "flops_seq_len": seq_len,
        **(metadata or {}),
    }
    out = save_model_dir(stock(small) if stock else small, out_dir, tokenizer, info)
    log.info("exported %s sub-network (%d params) to %s", "stock" if stock else "custom",
             params, out)
    return out


def save_model_dir(model: PreTrainedModel, out_dir: str | os.PathLike, tokenizer: Any,
                   info: dict[str, Any]) -> Path:
    """Write `model` (`save_pretrained`, with its remote code if any), the tokenizer and `info`
    (as SUBNETWORK_FILE) to `out_dir`, replacing it atomically: everything is written to a
    hidden temporary directory beside it first, then renamed into place."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / SUBNETWORK_FILE).write_text(json.dumps(info, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------ decoders
def decoder_stock_shape(config: DecoderConfig,
                        sub: DecoderSubNetwork) -> tuple[int, int, int, int, int] | None:
    """(layers, KV heads, queries per KV head, MLP width, hidden size) when sub-network `sub`
    of a decoder with `config` fits a stock Llama / Qwen2 config, else None: every kept layer
    keeps both blocks with one shape, the biases are the family's, and (Llama) the hidden size
    is a multiple of the query heads."""
    c = config
    if c.family == "qwen2" and (not c.attention_bias or c.o_proj_bias or c.mlp_bias):
        return None  # Qwen2 has q/k/v biases, no o_proj or MLP biases
    if c.family == "llama" and c.attention_bias != c.o_proj_bias:
        return None  # Llama's attention_bias covers all four projections
    kept = {(k, g, n) for k, g, n in zip(sub.kv_heads, sub.queries_per_kv, sub.units,
                                         strict=True) if k or n}
    if len(kept) > 1:
        return None
    k, g, n = kept.pop() if kept else (c.num_key_value_heads, c.queries_per_group,
                                       c.intermediate_size)
    hidden = sub.hidden or c.hidden_size
    if not (k and n) or (c.family == "llama" and hidden % (k * g)):
        return None
    return sum(sub.layers), k, g, n, hidden


def to_stock_decoder(model: DecoderModel) -> PreTrainedModel:
    """A transformers `LlamaForCausalLM` / `Qwen2ForCausalLM` (for a classifier:
    `...ForSequenceClassification`, labels included) with the weights of `model`, an extracted
    decoder sub-network of a stock shape (`decoder_stock_shape`)."""
    c = model.config
    shape = decoder_stock_shape(c, model.full_sub_network)
    if shape is None:
        raise ValueError(
            f"this decoder (KV heads {c.kv_heads_per_layer}, queries per KV head "
            f"{c.queries_per_kv_per_layer}, MLP widths {c.units_per_layer}, hidden "
            f"{c.hidden_size}) does not fit a stock {c.family} config; export it with our "
            "DecoderConfig (export_decoder does)"
        )
    layers, k, g, n, hidden = shape
    classify = isinstance(model, DecoderForSequenceClassification)
    config_cls, causal_cls, classifier_cls = _STOCK_DECODERS[c.family]
    fields = dict(
        vocab_size=c.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=k * g, num_key_value_heads=k, head_dim=c.head_dim,
        intermediate_size=n, hidden_act=c.hidden_act, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings,
        rope_parameters=dict(c.rope_parameters) if c.rope_parameters else None,
        attention_dropout=c.attention_dropout, tie_word_embeddings=c.tie_word_embeddings,
        initializer_range=c.initializer_range, pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
    )
    if c.family == "llama":
        fields.update(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias)
    if classify:
        fields.update(id2label=c.id2label, label2id=c.label2id, problem_type=c.problem_type)
    hf_model = (classifier_cls if classify else causal_cls)(config_cls(**fields))
    missing, unexpected = hf_model.load_state_dict(model.state_dict(), strict=False)
    if c.tie_word_embeddings and not classify:
        hf_model.tie_weights()
        missing = [key for key in missing if key != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    return hf_model.to(model.dtype).train(model.training)


def export_decoder(
    model: DecoderModel,
    sub: DecoderSubNetwork,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    metadata: dict[str, Any] | None = None,
    seq_len: int = 128,
) -> Path:
    """Write sub-network `sub` of decoder `model` to `out_dir` as a loadable Hugging Face causal
    LM or sequence classifier (`model`'s head): a stock Llama / Qwen2 checkpoint when
    `decoder_stock_shape` allows, else our class with its code (``trust_remote_code=True``).
    Replaces `out_dir` atomically (`save_model_dir`).

    Args:
        model: the decoder supernet (`DecoderForCausalLM` or
            `DecoderForSequenceClassification`).
        sub: the sub-network to export.
        out_dir: target directory.
        tokenizer: saved beside the model when given.
        metadata: extra JSON-serialisable facts for ``nas_prune_subnetwork.json``.
        seq_len: sequence length at which the recorded FLOPs are counted.

    Returns:
        The directory path.
    """
    shape = {"family": model.config.family, "kv_heads": list(sub.kv_heads),
             "queries_per_kv": list(sub.queries_per_kv), "units": list(sub.units)}
    return _export(model, sub, out_dir, tokenizer, to_stock_decoder
                   if decoder_stock_shape(model.config, sub) else None, shape, metadata, seq_len)
