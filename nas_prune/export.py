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
    PreTrainedModel,
    RobertaConfig,
    RobertaForSequenceClassification,
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
    model: EncoderForSequenceClassification,
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
        model: the supernet.
        sub: the sub-network to export.
        out_dir: target directory.
        tokenizer: saved beside the model when given.
        metadata: extra JSON-serialisable facts for ``nas_prune_subnetwork.json``.
        seq_len: sequence length at which the recorded FLOPs are counted.

    Returns:
        The directory path.
    """
    out = Path(out_dir)
    small = model.extract_sub_network(sub).eval()
    stock = stock_shape(model.config, sub) is not None
    to_save = to_stock(small) if stock else small
    info = {
        "heads": [list(h) if isinstance(h, tuple) else h for h in sub.heads],
        "units": [list(u) if isinstance(u, tuple) else u for u in sub.units],
        "hidden": sub.hidden or model.config.hidden_size,
        "stock": stock,
        "params": model.num_params(sub),
        "params_ratio": model.num_params(sub) / model.num_params(),
        "flops": model.flops(sub, seq_len),
        "flops_seq_len": seq_len,
        **(metadata or {}),
    }
    save_model_dir(to_save, out, tokenizer, info)
    log.info("exported %s sub-network (%d params) to %s", "stock" if stock else "custom",
             info["params"], out)
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
