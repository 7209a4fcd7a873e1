"""Shared fixtures: tiny random-weight BERT / RoBERTa models and padded input batches."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

TINY_SHAPE = {
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 48,
    "max_position_embeddings": 64,
}
"""L=3 layers, H=4 heads of dimension 8, F=48 FFN neurons: a few thousand parameters."""


def randomise_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter O(0.1..1) random values (the HF init, std 0.02 and zero biases,
    makes all logits nearly equal, so a wrong head or neuron would barely change them)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            is_norm_scale = name.endswith("weight") and "norm" in name.lower()
            p.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.2 * noise)
    return model


@pytest.fixture(scope="module", autouse=True)
def _no_ray_left_running():
    """Latency measurements start a local Ray in the test process when none runs
    (nas_prune.profile.profile_saved); later modules start their own, so it stops here."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def make_hf_bert():
    """Factory: a tiny random `BertForSequenceClassification` in eval mode."""

    def make(num_labels: int = 3, seed: int = 0, **overrides) -> BertForSequenceClassification:
        config = BertConfig(**{**TINY_SHAPE, **overrides}, num_labels=num_labels)
        return randomise_(BertForSequenceClassification(config), seed).eval()

    return make


@pytest.fixture
def make_hf_roberta():
    """Factory: a tiny random `RobertaForSequenceClassification` (pad id 1, one token type)."""

    def make(num_labels: int = 3, seed: int = 0, **overrides) -> RobertaForSequenceClassification:
        shape = {**TINY_SHAPE, "pad_token_id": 1, "type_vocab_size": 1, **overrides}
        config = RobertaConfig(**shape, num_labels=num_labels)
        return randomise_(RobertaForSequenceClassification(config), seed).eval()

    return make


@pytest.fixture
def make_batch():
    """Factory: 3 sequences of 12 tokens; the second ends in 4 pad tokens, the third in 2."""

    def make(
        pad_id: int = 0, vocab_size: int = 100, token_types: bool = True, seed: int = 0
    ) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(pad_id + 1, vocab_size, (3, 12), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        for row, pads in ((1, 4), (2, 2)):
            attention_mask[row, -pads:] = 0
            input_ids[row, -pads:] = pad_id
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_types:
            token_type_ids = torch.zeros_like(input_ids)
            token_type_ids[:, 5:] = 1
            batch["token_type_ids"] = token_type_ids * attention_mask
        return batch

    return make


_REMOTE_LOADER = textwrap.dedent(
    """
    import sys

    sys.modules["nas_prune"] = None  # any import of nas_prune now raises ImportError
    import torch
    from transformers import AutoModelForSequenceClassification

    model_dir, batch_file, out_file = sys.argv[1:4]
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, trust_remote_code=True
    ).eval()
    with torch.no_grad():
        logits = model(**torch.load(batch_file)).logits
    torch.save(
        {
            "logits": logits,
            "module": type(model).__module__,
            "params": sum(p.numel() for p in model.parameters()),
            "nas_prune_loaded": any(
                m.startswith("nas_prune") and sys.modules[m] is not None for m in sys.modules
            ),
        },
        out_file,
    )
    """
)


@pytest.fixture
def load_in_fresh_process(tmp_path):
    """Factory: load an exported model directory with `trust_remote_code=True` in a new Python
    process that cannot import nas_prune, run `batch` through it; returns its logits, module
    name, parameter count and whether any nas_prune module got imported."""

    def load(model_dir, batch: dict[str, torch.Tensor]) -> dict:
        torch.save(batch, tmp_path / "batch.pt")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
                   TRANSFORMERS_VERBOSITY="error")
        result = subprocess.run(
            [sys.executable, "-c", _REMOTE_LOADER, str(model_dir), "batch.pt", "result.pt"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return torch.load(tmp_path / "result.pt")

    return load


@pytest.fixture(scope="session")
def tokenizer():
    """The offline MiniLM tokenizer (what the tiny test models are saved with)."""
    from nas_prune import data

    return data.load_tokenizer(data.default_model_path())


WORDS = ("the people of this nation want work and hope for every family we will build a "
         "future where our children can grow strong free proud together").split()
"""The vocabulary of the word-level test tokenizer and of the synthetic text corpora."""


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A word-level tokenizer over WORDS with pad, unknown and end-of-sequence tokens (tiny
    decoders need a tiny vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from nas_prune import data

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", ".", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = tmp_path_factory.mktemp("word_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                            eos_token="</s>").save_pretrained(out)
    return data.load_tokenizer(str(out))
