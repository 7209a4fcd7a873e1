"""Loading Hugging Face Llama / Qwen2 checkpoints (and our own) into `nas_prune.decoder`.

Kept apart from the model file, which an exported checkpoint carries as remote code and which
therefore imports only torch, transformers and `supernet.py`. Parameter names are transformers'
(`model.*`, `lm_head.weight`, `score.weight`), so weights move without a name map.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)

from nas_prune.decoder import (
    FAMILIES,
    DecoderConfig,
    DecoderForCausalLM,
    DecoderForSequenceClassification,
    DecoderModel,
)
from nas_prune.supernet import from_pretrained_new_head

CLASSIFIER_SUFFIX = "ForSequenceClassification"
"""The end of a classification architecture's name (ours and transformers')."""


def config_from_hf(hf_config: PretrainedConfig) -> DecoderConfig:
    """Our DecoderConfig for a Hugging Face Llama / Qwen2 config (labels included); a ValueError
    that says what to use instead for any other architecture."""
    family = getattr(hf_config, "model_type", None)
    if family not in FAMILIES:
        raise ValueError(
            f"model_type {family!r} is not a supported decoder; nas_prune's decoder loads "
            f"Llama-family causal LMs ({', '.join(FAMILIES)}: e.g. Llama, SmolLM2, Qwen2). "
            "Choose such a checkpoint (BERT/RoBERTa encoders load with "
            "nas_prune.supernet.load_pretrained)."
        )
    if getattr(hf_config, "use_sliding_window", False):
        raise ValueError("sliding-window attention is not supported; set use_sliding_window "
                         "to false in the config or choose another checkpoint")
    heads = hf_config.num_attention_heads
    bias = bool(getattr(hf_config, "attention_bias", False))
    return DecoderConfig(
        family=family, vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        num_hidden_layers=hf_config.num_hidden_layers, num_attention_heads=heads,
        num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        intermediate_size=hf_config.intermediate_size, hidden_act=hf_config.hidden_act,
        rms_norm_eps=hf_config.rms_norm_eps,
        max_position_embeddings=hf_config.max_position_embeddings,
        rope_parameters=dict(getattr(hf_config, "rope_parameters", None) or {}),
        attention_bias=family == "qwen2" or bias, o_proj_bias=family == "llama" and bias,
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
        tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        initializer_range=hf_config.initializer_range, pad_token_id=hf_config.pad_token_id,
        bos_token_id=hf_config.bos_token_id, eos_token_id=hf_config.eos_token_id,
        id2label=dict(hf_config.id2label), label2id=dict(hf_config.label2id),
        problem_type=getattr(hf_config, "problem_type", None),
    )


def from_hf(hf_model: PreTrainedModel, share: bool = False) -> DecoderModel:
    """Our decoder with the weights of a transformers Llama/Qwen2 `...ForCausalLM` (giving a
    DecoderForCausalLM) or `...ForSequenceClassification` (a DecoderForSequenceClassification).
    With `share`, it takes over `hf_model`'s tensors instead of copying them."""
    config = config_from_hf(hf_model.config)
    classify = type(hf_model).__name__.endswith(CLASSIFIER_SUFFIX)
    cls = DecoderForSequenceClassification if classify else DecoderForCausalLM
    with torch.device("meta") if share else nullcontext():
        model = cls(config)
    state = hf_model.state_dict()
    missing = [k for k in model.state_dict() if k not in state]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} expected tensors, e.g. {missing[:3]}")
    model.load_state_dict({k: state[k] for k in model.state_dict()}, strict=True, assign=share)
    return model.to(hf_model.dtype).train(hf_model.training)


def load_pretrained_decoder(name_or_path: str, num_labels: int | None = None,
                            **hf_kwargs) -> DecoderModel:
    """Load a Llama/Qwen2 checkpoint (hub name or local directory) or a nas_prune decoder
    checkpoint into our decoder, sharing the loaded tensors (no second copy), in eval mode.

    Args:
        name_or_path: a transformers `...ForCausalLM` or `...ForSequenceClassification`
            checkpoint, or one saved from our `DecoderForCausalLM` /
            `DecoderForSequenceClassification`.
        num_labels: None loads the checkpoint's own kind (a causal LM, or a classifier when its
            `architectures` name a sequence classifier); an int loads a
            `DecoderForSequenceClassification` with that many outputs. A causal-LM checkpoint
            then gets a new `score` head drawn from normal(0, initializer_range); a classifier
            keeps its trained head (whose size must match).
        **hf_kwargs: passed to `from_pretrained` (e.g. `dtype`, `revision`, `gguf_file`).

    Raises:
        ValueError: the checkpoint is not a Llama-family decoder (the message says what loads).
    """
    config = AutoConfig.from_pretrained(name_or_path, **hf_kwargs)
    classify = num_labels is not None or any(
        a.endswith(CLASSIFIER_SUFFIX) for a in (config.architectures or []))
    labels = {} if num_labels is None else {"num_labels": num_labels}
    if isinstance(config, DecoderConfig):
        cls = DecoderForSequenceClassification if classify else DecoderForCausalLM
        config = AutoConfig.from_pretrained(name_or_path, **labels, **hf_kwargs)
        return cls.from_pretrained(name_or_path, config=config, **hf_kwargs).eval()
    config_from_hf(config)  # fail early, before loading weights, for other architectures
    if classify:
        config = AutoConfig.from_pretrained(name_or_path, **labels, **hf_kwargs)
        hf_model, _ = from_pretrained_new_head(
            AutoModelForSequenceClassification, name_or_path, "score.", config=config,
            **hf_kwargs)
    else:
        hf_model = AutoModelForCausalLM.from_pretrained(name_or_path, config=config, **hf_kwargs)
    model = from_hf(hf_model, share=True)
    del hf_model
    return model.eval()
