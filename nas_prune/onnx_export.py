"""Export a sub-network's model directory to ONNX, check it against PyTorch, and time it.

`export_onnx` turns a directory that `nas_prune.export` (or the GRAIN baseline) wrote, a stock
BERT/RoBERTa checkpoint or one of our own model classes, into ``model.onnx`` through PyTorch's
`torch.export`-based ONNX exporter: inputs ``input_ids``, ``attention_mask`` (and
``token_type_ids`` when the model has more than one token type), output ``logits``, batch and
sequence axes dynamic. The file is then run by onnxruntime on a padded and an unpadded batch of
other sizes than the export sample and must give PyTorch's logits; otherwise no file is left
behind and `OnnxValidationError` says by how much they differ. This is exact because the models'
forward passes take no branch on the data (the padding mask is always applied).

`time_onnx` is onnxruntime as a latency target (hardware type ``cpu-onnxruntime``).

onnx, onnxscript and onnxruntime are imported inside the functions, so importing nas_prune does
not load them.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
"""Default file name, inside the model directory."""

ATOL = 1e-4
"""Largest absolute difference allowed between onnxruntime's and PyTorch's logits."""

TRUSTED_MODEL_TYPES = ("nas_prune_encoder", "nas_prune_grain")
"""Model types whose code (written by nas_prune beside the weights) is run when loading; any
other directory must hold a model transformers knows, and its code is never run."""

EXTERNAL_DATA_BYTES = 1_800_000_000
"""Weights above this size go to a ``.data`` file beside the graph (protobuf's 2 GB limit)."""


class OnnxExportError(ValueError):
    """A model directory that cannot be exported to ONNX (not a model, unsupported model)."""


class OnnxValidationError(OnnxExportError):
    """onnxruntime's outputs for an exported file differ from the PyTorch model's."""


class _Logits(nn.Module):
    """The model as a function of positional tensors returning only the logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **types).logits


def load_model(model_dir: str | os.PathLike) -> nn.Module:
    """The classification model of an exported directory, in eval mode and float32.

    A stock BERT/RoBERTa checkpoint loads through transformers' own classes; a nas_prune class
    (`TRUSTED_MODEL_TYPES`) through the code saved beside its weights (``trust_remote_code``).

    Raises:
        OnnxExportError: the directory holds no loadable sequence-classification model.
    """
    from transformers import AutoModelForSequenceClassification

    path = Path(model_dir)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise OnnxExportError(f"{path} is not a model directory: it has no config.json")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as e:
        raise OnnxExportError(f"{config_file} is not a model config: {e}") from e
    trust = model_type in TRUSTED_MODEL_TYPES
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust)
    except (OSError, ValueError, KeyError) as e:
        raise OnnxExportError(
            f"cannot load {path} as a sequence-classification model (model_type "
            f"{model_type!r}): {e}"
        ) from e
    return model.float().eval()


def input_names(model: nn.Module) -> tuple[str, ...]:
    """The ONNX inputs of `model`: input_ids, attention_mask, and token_type_ids when its
    forward takes them and its config has more than one token type."""
    names = ("input_ids", "attention_mask")
    takes_types = "token_type_ids" in inspect.signature(model.forward).parameters
    if takes_types and getattr(model.config, "type_vocab_size", 1) > 1:
        names += ("token_type_ids",)
    return names


def sample_inputs(model: nn.Module, batch_size: int, seq_len: int, padded: bool,
                  names: tuple[str, ...] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of random token ids for `model`; with `padded`, every row but the first ends in
    padding (pad_token_id, attention_mask 0), of a different length per row."""
    config = model.config
    names = names or input_names(model)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator)
    ids = torch.where(ids == pad, (pad + 1) % config.vocab_size, ids)
    mask = torch.ones_like(ids)
    if padded:
        for row in range(1, batch_size):
            pads = 1 + (row * 3) % (seq_len - 1)  # at least one real token per row
            ids[row, -pads:] = pad
            mask[row, -pads:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        types = torch.zeros_like(ids)
        types[:, seq_len // 2:] = 1
        batch["token_type_ids"] = types * mask
    return {name: batch[name] for name in names}


def _max_positions(model: nn.Module) -> int:
    config = model.config
    limit = getattr(config, "max_position_embeddings", 512)
    if getattr(config, "family", getattr(config, "model_type", "")) == "roberta":
        limit -= (config.pad_token_id or 0) + 1  # RoBERTa numbers positions after the pad id
    return limit


def validate_onnx(onnx_path: str | os.PathLike, model: nn.Module,
                  atol: float = ATOL) -> dict[str, float]:
    """Run `onnx_path` with onnxruntime and `model` with PyTorch on a padded batch (3 x 11) and
    an unpadded one (1 x 5) and compare the logits.

    Returns:
        The largest absolute logit difference per batch, keyed "padded" and "unpadded".

    Raises:
        OnnxValidationError: a difference exceeds `atol`, or onnxruntime cannot run the file.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = tuple(i.name for i in session.get_inputs())
    length = min(11, _max_positions(model))
    diffs = {}
    for key, (batch_size, seq_len, padded) in {"padded": (3, length, True),
                                               "unpadded": (1, min(5, length), False)}.items():
        batch = sample_inputs(model, batch_size, seq_len, padded, names, seed=1)
        with torch.no_grad():
            expected = model(**batch).logits.float()
        try:
            (got,) = session.run(["logits"], {k: v.numpy() for k, v in batch.items()})
        except Exception as e:  # onnxruntime raises its own (non-public) error types
            raise OnnxValidationError(f"onnxruntime cannot run {onnx_path} on a {key} "
                                      f"{batch_size} x {seq_len} batch: {e}") from e
        got = torch.from_numpy(got)
        if got.shape != expected.shape:
            raise OnnxValidationError(f"{onnx_path} gives logits of shape {tuple(got.shape)} on "
                                      f"the {key} batch, PyTorch {tuple(expected.shape)}")
        diffs[key] = (got - expected).abs().max().item()
    bad = {k: d for k, d in diffs.items() if not d <= atol}
    if bad:
        raise OnnxValidationError(
            f"{onnx_path} differs from the PyTorch model by more than {atol}: max abs logit "
            f"difference {', '.join(f'{d:.3g} on the {k} batch' for k, d in bad.items())}"
        )
    return diffs


def export_onnx(model_dir: str | os.PathLike, out_path: str | os.PathLike | None = None,
                opset: int | None = None) -> Path:
    """Export the model in `model_dir` to ONNX and check it against PyTorch with onnxruntime.

    The graph takes ``input_ids``, ``attention_mask`` (and ``token_type_ids`` for models with
    several token types), int64 of shape (batch, sequence), both axes dynamic, and returns
    ``logits`` (batch, labels). It is written beside its final place and moved there only once
    onnxruntime's logits equal PyTorch's (to `ATOL`) on a padded and an unpadded batch of other
    shapes than the export sample. Export only directories you trust: the model code a
    nas_prune directory carries is run.

    Args:
        model_dir: a directory written by `nas_prune.export` (stock BERT/RoBERTa or a nas_prune
            class) or by the GRAIN baseline.
        out_path: the ONNX file; default ``model_dir/model.onnx``. An existing file is replaced.
        opset: ONNX opset version; default the exporter's.

    Returns:
        The ONNX file's path.

    Raises:
        OnnxExportError: `model_dir` holds no loadable model, or the exporter fails on it.
        OnnxValidationError: onnxruntime's logits differ from PyTorch's.
    """
    model = load_model(model_dir)
    out = Path(out_path) if out_path is not None else Path(model_dir) / ONNX_FILE
    names = input_names(model)
    sample = sample_inputs(model, 2, min(16, _max_positions(model)), padded=False, names=names)
    wrapped = _Logits(model).eval()
    with torch.no_grad():  # an eager pass first builds any lazily cached index tensors
        wrapped(*sample.values())
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = tuple({0: batch, 1: sequence} for _ in names)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        try:
            with warnings.catch_warnings():  # inputs sharing one axis name is what we mean
                warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
                program = torch.onnx.export(
                    wrapped, tuple(sample.values()), dynamo=True,
                    input_names=list(names), output_names=["logits"], dynamic_shapes=dynamic,
                    opset_version=opset, optimize=True, verbose=False,
                )
        except Exception as e:  # the exporter wraps failures in many (private) types
            raise OnnxExportError(f"torch.onnx could not export {model_dir}: {e}") from e
        program.save(str(tmp / out.name), external_data=size > EXTERNAL_DATA_BYTES)
        diffs = validate_onnx(tmp / out.name, model)
        for f in tmp.iterdir():  # the graph, and its weights file if any
            os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s to %s (max abs logit difference to PyTorch: %.2g padded, %.2g "
             "unpadded)", model_dir, out, diffs["padded"], diffs["unpadded"])
    return out


def time_onnx(path: str | os.PathLike, batch_size: int, seq_len: int, threads: int = 1,
              warmup: int = 3, repeats: int = 10, clock: str = "wall") -> list[float]:
    """Milliseconds per onnxruntime run of the ONNX file `path` (CPUExecutionProvider, with
    `threads` intra-op threads) on an unpadded `batch_size` x `seq_len` batch, one entry per
    timed run after `warmup` untimed ones.

    `clock` is "wall" or "thread" (CPU time of this thread, which leaves out the time other
    processes hold the core; with one intra-op thread onnxruntime computes on the calling
    thread, so this is the run's CPU time).

    Raises:
        ValueError: a non-positive size, thread count or repeat count, a negative warmup, or
            the thread clock with several threads.
        OnnxExportError: `path` is not a file.
    """
    import numpy as np
    import onnxruntime as ort

    if min(batch_size, seq_len, threads, repeats) < 1 or warmup < 0:
        raise ValueError(
            "batch_size, seq_len, threads and repeats must be >= 1 and warmup >= 0, got "
            f"{batch_size}, {seq_len}, {threads}, {repeats}, {warmup}"
        )
    if clock not in ("wall", "thread") or (clock == "thread" and threads != 1):
        raise ValueError(f"clock must be 'wall', or 'thread' with threads=1; got {clock!r} "
                         f"with {threads} threads")
    if not Path(path).is_file():
        raise OnnxExportError(f"no ONNX file at {path}; write one with export_onnx first")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    shape = (batch_size, seq_len)
    # token ids do not change the cost; 3..99 exist in every vocabulary and are no pad id
    feeds: dict[str, Any] = {
        "input_ids": np.random.default_rng(0).integers(3, 100, shape, dtype=np.int64),
        "attention_mask": np.ones(shape, dtype=np.int64),
        "token_type_ids": np.zeros(shape, dtype=np.int64),
    }
    feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
    for _ in range(warmup):
        session.run(None, feeds)
    now = time.thread_time if clock == "thread" else time.perf_counter
    timings = []
    for _ in range(repeats):
        start = now()
        session.run(None, feeds)
        timings.append((now() - start) * 1000)
    return timings
