"""Export a sub-network's model directory to ONNX, check it against PyTorch, and time it.

`export_onnx` turns a directory that `nas_prune.export` (or the GRAIN baseline) wrote into
``model.onnx`` through PyTorch's `torch.export`-based ONNX exporter: inputs ``input_ids``,
``attention_mask`` (and ``token_type_ids`` when the model has more than one token type), output
``logits``, batch and sequence axes dynamic. What the directory holds decides the head:

* a classifier (a stock BERT/RoBERTa, Llama/Qwen2 ``...ForSequenceClassification`` checkpoint,
  or our `EncoderForSequenceClassification` / `DecoderForSequenceClassification`): ``logits``
  (batch, labels). A decoder classifier reads each sequence's last real token, found from the
  pad id (stock) or the attention mask (ours), both of which the graph takes as data;
* a causal LM (``config.architectures`` names a ``...ForCausalLM``: a stock Llama/Qwen2 one or
  our `DecoderForCausalLM`): ``logits`` (batch, sequence, vocab), the next-token scores at
  every position. The graph is one forward pass without a KV cache: it serves scoring
  (perplexity) and prefill; generating token by token with a cache is not exported (feed the
  whole sequence again, or generate with the PyTorch model).

The file is then run by onnxruntime on a right-padded and an unpadded batch of other sizes than
the export sample and must give PyTorch's logits at every position (to `ATOL` plus `RTOL` times
the largest logit: float32 round-off grows with an LM's logits); otherwise no file is left
behind and `OnnxValidationError` says by how much they differ. This is exact because the models'
forward passes take no branch on the data (the padding mask is always applied). For a causal LM
this includes the pad positions: with right padding a pad position's query attends, causally,
to the real tokens before it (its own key is masked, but position 0 is always real), so its
logits are finite, deterministic and meaningless (the prediction after a pad token), and the
graph computes them exactly as PyTorch does. (With left padding the leading pad queries would
see no key at all, where kernels legitimately differ; the check does not use it.)

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
"""Largest absolute difference allowed between onnxruntime's and PyTorch's logits, plus
`RTOL` times the batch's largest absolute logit."""

RTOL = 1e-5
"""Relative part of the allowed difference, of the batch's largest absolute logit: float32
round-off grows with the logits' scale (SmolLM2-135M's LM logits reach 30-60 and differ by up
to 1.6e-4, 3e-6 of that, between onnxruntime and PyTorch), and matters only there; a
classifier's logits of order 1 keep the `ATOL` bound."""

TRUSTED_MODEL_TYPES = ("nas_prune_encoder", "nas_prune_grain", "nas_prune_decoder")
"""Model types whose code (written by nas_prune beside the weights) is run when loading; any
other directory must hold a model transformers knows, and its code is never run."""

EXTERNAL_DATA_BYTES = 1_800_000_000
"""Weights above this size go to a ``.data`` file beside the graph (protobuf's 2 GB limit)."""

CAUSAL_LM_SUFFIX = "ForCausalLM"
"""A directory whose ``config.architectures`` has a class name ending so is a causal LM."""


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
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **types,
                          **_no_cache(self.model)).logits


def _no_cache(model: nn.Module) -> dict[str, bool]:
    """``use_cache=False`` for a model whose forward takes it (decoders): no KV cache object
    is built or returned, the graph is a plain forward pass."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters \
        else {}


def load_model(model_dir: str | os.PathLike) -> nn.Module:
    """The model of an exported directory, in eval mode and float32: a causal LM when its
    ``config.architectures`` names one (`CAUSAL_LM_SUFFIX`), else a sequence classifier.

    Stock checkpoints (BERT/RoBERTa, Llama/Qwen2) load through transformers' own classes; a
    nas_prune class (`TRUSTED_MODEL_TYPES`) through the code saved beside its weights
    (``trust_remote_code``).

    Raises:
        OnnxExportError: the directory holds no loadable causal-LM or sequence-classification
            model.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = Path(model_dir)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise OnnxExportError(f"{path} is not a model directory: it has no config.json")
    try:
        config = json.loads(config_file.read_text())
        model_type, architectures = config.get("model_type"), config.get("architectures") or []
    except (json.JSONDecodeError, AttributeError) as e:
        raise OnnxExportError(f"{config_file} is not a model config: {e}") from e
    causal = any(str(a).endswith(CAUSAL_LM_SUFFIX) for a in architectures)
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    trust = model_type in TRUSTED_MODEL_TYPES
    try:
        model = auto.from_pretrained(path, trust_remote_code=trust)
    except (OSError, ValueError, KeyError) as e:
        kind = "causal-LM" if causal else "sequence-classification"
        raise OnnxExportError(
            f"cannot load {path} as a {kind} model (model_type {model_type!r}): {e}"
        ) from e
    return model.float().eval()


def is_causal_lm(model: nn.Module) -> bool:
    """Whether `model` (from `load_model`) is a causal LM, whose logits have a sequence axis."""
    return type(model).__name__.endswith(CAUSAL_LM_SUFFIX)


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
                  atol: float = ATOL, rtol: float = RTOL) -> dict[str, float]:
    """Run `onnx_path` with onnxruntime and `model` with PyTorch on a right-padded batch
    (3 x 11) and an unpadded one (1 x 5) and compare the logits (of a causal LM: at every
    position, pad positions included; see the module docstring). A batch passes when the
    largest absolute difference is at most ``atol + rtol * max |PyTorch logit|``.

    Returns:
        The largest absolute logit difference per batch, keyed "padded" and "unpadded".

    Raises:
        OnnxValidationError: a difference exceeds its bound, or onnxruntime cannot run the
            file.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = tuple(i.name for i in session.get_inputs())
    length = min(11, _max_positions(model))
    diffs, bounds = {}, {}
    for key, (batch_size, seq_len, padded) in {"padded": (3, length, True),
                                               "unpadded": (1, min(5, length), False)}.items():
        batch = sample_inputs(model, batch_size, seq_len, padded, names, seed=1)
        with torch.no_grad():
            expected = model(**batch, **_no_cache(model)).logits.float()
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
        bounds[key] = atol + rtol * expected.abs().max().item()
    bad = {k: d for k, d in diffs.items() if not d <= bounds[k]}
    if bad:
        raise OnnxValidationError(
            f"{onnx_path} differs from the PyTorch model by more than allowed: max abs logit "
            + ", ".join(f"difference {d:.3g} on the {k} batch (allowed {bounds[k]:.3g} = "
                        f"{atol} + {rtol} x max |logit|)" for k, d in bad.items())
        )
    return diffs


def capture(module: nn.Module, args: tuple[torch.Tensor, ...],
            dynamic: tuple[dict[int, Any], ...]) -> torch.export.ExportedProgram:
    """`torch.export` of `module` on `args` with the axes `dynamic` names kept dynamic: traced
    without dynamo first (``strict=False``), then with it (``strict=True``, which keeps e.g. a
    ``len(tensor)`` symbolic where the other fixes it to the sample's size).

    Bounds torch.export finds (a sequence axis at most ``max_position_embeddings`` long) are
    accepted; an axis the code fixes to the sample's size is not. (torch.onnx's own capture,
    given a module, quietly exports that size: a graph that then refuses other batches.)

    Raises:
        RuntimeError: neither trace keeps the axes dynamic, or both fail; the message holds
            both reasons.
    """
    from torch._dynamo.exc import UserError
    from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

    failures = []
    for strict in (False, True):
        shapes = dynamic
        try:
            for _ in range(2):  # the second pass with the bounds the first one suggests
                try:
                    return torch.export.export(module, args, dynamic_shapes=shapes,
                                               strict=strict)
                except UserError as e:
                    if shapes is not dynamic:
                        raise
                    shapes = refine_dynamic_shapes_from_suggested_fixes(e.msg, dynamic)
                    fixed = [f"{name} = {size}" for axes in shapes for name, size in
                             zip(("batch", "sequence"), axes.values(), strict=False)
                             if isinstance(size, int)]
                    if fixed:
                        raise RuntimeError(f"the model's code fixes {', '.join(fixed)} (the "
                                           "export sample's size)") from e
        except Exception as e:  # torch.export raises many (private) types
            failures.append(f"torch.export (strict={strict}): {str(e).strip().splitlines()[0]}")
    raise RuntimeError("; ".join(failures))


def export_onnx(model_dir: str | os.PathLike, out_path: str | os.PathLike | None = None,
                opset: int | None = None) -> Path:
    """Export the model in `model_dir` to ONNX and check it against PyTorch with onnxruntime.

    The graph takes ``input_ids``, ``attention_mask`` (and ``token_type_ids`` for models with
    several token types), int64 of shape (batch, sequence), both axes dynamic, and returns
    ``logits``: (batch, labels) for a classifier, (batch, sequence, vocab) for a causal LM (no
    KV cache; see the module docstring). It is written beside its final place and moved there
    only once onnxruntime's logits equal PyTorch's (to `ATOL` + `RTOL` x the largest logit) on
    a padded and an unpadded batch of other shapes than the export sample. Export only
    directories you trust: the model code a nas_prune directory carries is run.

    Args:
        model_dir: a directory written by `nas_prune.export` (a stock BERT/RoBERTa or
            Llama/Qwen2 checkpoint, or a nas_prune class) or by the GRAIN baseline.
        out_path: the ONNX file; default ``model_dir/model.onnx``. An existing file is replaced.
        opset: ONNX opset version; default the exporter's.

    Returns:
        The ONNX file's path.

    Raises:
        OnnxExportError: `model_dir` holds no loadable model, a model no graph with a
            dynamic batch can describe (a stock decoder classifier without a pad id), or the
            exporter fails on it.
        OnnxValidationError: onnxruntime's logits differ from PyTorch's.
    """
    model = load_model(model_dir)
    _check_exportable(model, model_dir)
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
            exported = capture(wrapped, tuple(sample.values()), dynamic)
            with warnings.catch_warnings():  # inputs sharing one axis name is what we mean
                warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
                program = torch.onnx.export(  # (string axes only name the graph's axes)
                    exported, dynamo=True, input_names=list(names), output_names=["logits"],
                    dynamic_shapes=tuple({0: "batch", 1: "sequence"} for _ in names),
                    opset_version=opset, optimize=True, verbose=False,
                )
        except Exception as e:  # the exporters wrap failures in many (private) types
            auto = "AutoModelForCausalLM" if is_causal_lm(model) else \
                "AutoModelForSequenceClassification"
            trust = ", trust_remote_code=True" if model.config.model_type in \
                TRUSTED_MODEL_TYPES else ""
            raise OnnxExportError(
                f"torch.onnx could not export {model_dir} ({type(model).__name__}): {e}\n"
                f"The directory itself still serves in PyTorch: transformers' {auto}"
                f".from_pretrained(dir{trust}) loads it."
            ) from e
        program.save(str(tmp / out.name), external_data=size > EXTERNAL_DATA_BYTES)
        diffs = validate_onnx(tmp / out.name, model)
        for f in tmp.iterdir():  # the graph, and its weights file if any
            os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s to %s (max abs logit difference to PyTorch: %.2g padded, %.2g "
             "unpadded)", model_dir, out, diffs["padded"], diffs["unpadded"])
    return out


def _check_exportable(model: nn.Module, model_dir: str | os.PathLike) -> None:
    """Refuse, before tracing, a model whose forward branches on the batch size.

    transformers' stock decoder classifiers (``LlamaForSequenceClassification``, ...) find
    each sequence's last token from ``config.pad_token_id``; without one they accept only a
    batch of one, which a graph with a dynamic batch axis cannot express.
    """
    from nas_prune.decoder import FAMILIES

    config = model.config
    if (config.model_type in FAMILIES and not is_causal_lm(model)
            and config.pad_token_id is None):
        raise OnnxExportError(
            f"cannot export {model_dir} to ONNX: a stock {type(model).__name__} finds each "
            "sequence's last token from config.pad_token_id, which is not set, so it accepts "
            "only a batch of one. Set pad_token_id in its config.json to a token real text "
            "never contains (e.g. the tokenizer's pad token) and export again (nas_prune's own "
            "DecoderForSequenceClassification, exported for non-stock shapes, reads the last "
            "token from the attention mask and needs no pad id)"
        )


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
