"""Checkpoint directories: save, load, and say what a directory holds.

A checkpoint directory holds the model in ``save_pretrained`` form, the tokenizer,
``nas_prune.json`` (kind -- ``teacher`` or ``supernet`` --, model, task, space, strategy,
options, steps done, finished) and, while training runs, DeepSpeed's optimizer / scheduler / RNG
state under ``deepspeed/`` for resuming. Every stage that reads a checkpoint checks its kind and
task here first, so a wrong directory is one clear error before any work.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from nas_prune.errors import CheckpointError

META = "nas_prune.json"
"""nas_prune's metadata file inside a checkpoint directory."""

DEEPSPEED_DIR = "deepspeed"
"""DeepSpeed's resumable state inside a checkpoint directory."""


def save_checkpoint(out_dir: str | os.PathLike, model: Any, tokenizer: Any,
                    meta: dict[str, Any]) -> Path:
    """Write model weights, tokenizer and metadata to `out_dir` (replaced atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    tmp.rmdir()
    return out


def write_meta(out_dir: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Replace the metadata of the checkpoint in `out_dir`."""
    path = Path(out_dir) / META
    tmp = path.with_name(f".{META}.tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp, path)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The `nas_prune.json` of a checkpoint directory ({} for a plain Hugging Face model)."""
    meta = Path(path) / META
    if not meta.exists():
        return {}
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta} is corrupt ({e}); re-create the checkpoint") from None


def is_finished(path: str | os.PathLike) -> bool:
    """Whether `path` holds a checkpoint whose training ran to the end."""
    return Path(path).is_dir() and bool(read_meta(path).get("finished"))


def load_checkpoint(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """Load a nas_prune checkpoint directory: (model in eval mode, metadata)."""
    from nas_prune.models import load_saved

    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} is not a checkpoint directory (no config.json)")
    meta = read_meta(path)
    try:
        model = load_saved(path, meta)
    except Exception as e:  # safetensors, torch and transformers each raise their own types
        raise CheckpointError(f"cannot load checkpoint {path}: {e}") from e
    return model.eval(), meta


def check_teacher(meta: dict[str, Any], num_labels: int, task: Any,
                  path: str | os.PathLike) -> None:
    """Raise CheckpointError unless the checkpoint at `path` (metadata `meta`, a head of
    `num_labels` outputs) is a model fine-tuned for `task` (a TaskData)."""
    if meta.get("kind") not in ("teacher", "supernet"):
        raise CheckpointError(
            f"{path} is not a fine-tuned nas_prune model (no teacher metadata); fine-tune it "
            "first with `nas-prune finetune`"
        )
    if meta.get("task") != task.spec.name or (meta.get("task_kind", "classification")
                                              != task.spec.kind):
        raise CheckpointError(
            f"{path} was fine-tuned for task {meta.get('task')!r}, not {task.spec.name!r}"
        )
    if num_labels != task.spec.num_labels and not task.spec.is_lm:
        raise CheckpointError(
            f"{path} predicts {num_labels} labels but task {task.spec.name!r} has "
            f"{task.spec.num_labels}"
        )
    names = _label_names(path)
    wanted = tuple(getattr(task.spec, "label_names", None) or ())
    if names and wanted and names != wanted:
        raise CheckpointError(f"{path} predicts the labels {list(names)} but task "
                              f"{task.spec.name!r} has {list(wanted)}")


def _label_names(path: str | os.PathLike) -> tuple[str, ...]:
    """The class names in a checkpoint's config.json, () when absent or transformers'
    placeholders (LABEL_0, ...)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return ()
    id2label = json.loads(config.read_text()).get("id2label") or {}
    names = tuple(id2label[k] for k in sorted(id2label, key=int))
    return () if all(n == f"LABEL_{i}" for i, n in enumerate(names)) else names


def check_supernet(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of the trained supernet at `path`; CheckpointError for anything else (no
    checkpoint, an exported sub-network, a teacher or pre-trained model, an unfinished run)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} is not a supernet checkpoint (no config.json); train "
                              "one with `nas-prune supernet`")
    config = json.loads((path / "config.json").read_text())
    if config.get("layer_heads") is not None:
        raise CheckpointError(f"{path} is an exported sub-network, not a supernet")
    meta = read_meta(path)
    if meta.get("kind") != "supernet":
        what = {"teacher": "a fine-tuned teacher"}.get(meta.get("kind"), "not a nas_prune model")
        raise CheckpointError(f"{path} is {what}, not a trained supernet; train one with "
                              "`nas-prune supernet`")
    if not meta.get("finished"):
        raise CheckpointError(f"{path} holds an unfinished supernet run; re-run "
                              "`nas-prune supernet` with the same options to finish it")
    return meta


def check_model_files(name_or_path: str | os.PathLike) -> None:
    """Raise CheckpointError if a local model directory's safetensors files are damaged (a
    truncated download or copy): each file's header must be readable and its tensors must end
    where the file ends. Hub names are left to the loader."""
    path = Path(name_or_path)
    if not path.is_dir():
        return
    for file in sorted(path.glob("*.safetensors")):
        size = file.stat().st_size
        try:
            with open(file, "rb") as f:
                length = int.from_bytes(f.read(8), "little")
                if not 0 < length <= size - 8:
                    raise ValueError("header length beyond the end of the file")
                header = json.loads(f.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                      default=0)
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"{file} is damaged ({e}); download or copy the model "
                                  "again") from None
        if 8 + length + end != size:
            raise CheckpointError(
                f"{file} is truncated or damaged: its header describes {8 + length + end:,} "
                f"bytes but the file has {size:,}; download or copy the model again"
            )


def position_limit(name_or_path: str | os.PathLike) -> int | None:
    """The longest input (tokens) the model's position embeddings allow, or None if its config
    cannot be read here (e.g. a hub name offline; the loader will say why)."""
    local = Path(name_or_path) / "config.json"
    try:
        if local.is_file():  # ours or a stock one: read as is (no remote-code prompt)
            config = json.loads(local.read_text())
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(name_or_path)).to_dict()
    except Exception:  # noqa: BLE001 - any failure here is reported by the loader later
        return None
    limit = config.get("max_position_embeddings")
    if limit is None:
        return None
    if config.get("model_type") == "roberta" or config.get("family") == "roberta":
        limit -= (config.get("pad_token_id") or 0) + 1  # positions start after padding_idx
    return int(limit)
