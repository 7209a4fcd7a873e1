"""The two tables of the results store: their columns and Arrow types, and how a row is
checked, completed and converted before it is written (see nas_prune.results)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from nas_prune.errors import ResultsError

PARTITION = "experiment"
"""The partition column: each experiment is one directory of each table."""

CFG_PREFIX = "cfg_"
"""Prefix of the flattened config columns of the evaluations table."""

MAX_FLATTEN_KEYS = 64
"""Configs with more keys than this (the ``large`` space) are stored as JSON only."""

STATUSES = ("ok", "rung", "stopped", "error")
"""Allowed values of the evaluations table's ``status`` column: ``ok`` a complete evaluation,
``rung`` an intermediate (lower-fidelity) result of a trial, ``stopped`` the last result of a
trial a scheduler stopped early, ``error`` a failed trial."""

_TIMESTAMP = pa.timestamp("us", tz="UTC")


def _field(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


EVALUATION_SCHEMA: pa.Schema = pa.schema(
    [
        _field("experiment", pa.string()),  # partition key (directory name), set by the store
        _field("method", pa.string()),  # "nas", "pins", "grain", "layer_drop", "dense", ...
        _field("searcher", pa.string(), nullable=True),
        _field("scheduler", pa.string(), nullable=True),
        _field("strategy", pa.string(), nullable=True),  # supernet training strategy
        _field("space", pa.string(), nullable=True),
        _field("task", pa.string()),
        _field("model", pa.string()),
        _field("seed", pa.int64()),
        _field("trial_id", pa.string()),
        _field("config", pa.string()),  # canonical JSON of the sub-network config
        _field("fidelity", pa.float64()),  # e.g. validation examples seen or epochs
        _field("fidelity_unit", pa.string()),
        _field("error", pa.float64()),
        _field("metric_name", pa.string()),
        _field("metric_value", pa.float64()),
        _field("params", pa.int64()),
        _field("params_ratio", pa.float64()),
        _field("flops", pa.int64()),
        _field("latency_ms", pa.float64(), nullable=True),  # on the primary hardware, if any
        # decoders: per generated token (latency_ms is then the prefill's)
        _field("decode_ms", pa.float64(), nullable=True),
        _field("hardware", pa.string(), nullable=True),
        _field("wall_time_s", pa.float64()),  # seconds since the experiment started
        _field("eval_time_s", pa.float64()),
        _field("timestamp", _TIMESTAMP),
        _field("status", pa.string()),  # one of STATUSES
        _field("message", pa.string(), nullable=True),
        # training cost of this row's model alone (forward + backward examples, seconds)
        _field("train_examples", pa.int64(), nullable=True),
        _field("train_time_s", pa.float64(), nullable=True),
        _field("family", pa.string(), nullable=True),  # "bert", "roberta", "llama", "qwen2"
        _field("task_kind", pa.string(), nullable=True),  # "classification" or "lm"
        _field("perplexity", pa.float64(), nullable=True),  # language modelling rows
    ]
)
"""Fixed columns of the evaluations table; ``cfg_<key>`` int64 columns are added per write.
``task_kind`` and ``perplexity`` are derived from ``metric_name`` when a row lacks them."""

LATENCY_SCHEMA: pa.Schema = pa.schema(
    [
        _field("experiment", pa.string()),
        _field("hardware", pa.string()),  # hardware type, e.g. "cpu", "A10G"
        _field("device_name", pa.string()),  # e.g. the CUDA device name or the CPU model
        _field("config", pa.string()),  # canonical JSON
        _field("config_hash", pa.string()),  # config_hash(config) unless given
        _field("batch_size", pa.int64()),
        _field("seq_len", pa.int64()),
        _field("dtype", pa.string()),
        _field("median_ms", pa.float64()),
        _field("p90_ms", pa.float64()),
        _field("mean_ms", pa.float64()),
        _field("std_ms", pa.float64()),
        _field("repeats", pa.int64()),
        _field("predicted", pa.bool_()),  # True: from the lookup-table predictor, not measured
        _field("params", pa.int64()),
        _field("timestamp", _TIMESTAMP),
        _field("method", pa.string(), nullable=True),
        _field("trial_id", pa.string(), nullable=True),
        # decoders (null for encoders): median_ms/p90_ms are the prefill of batch_size x
        # seq_len prompt tokens; decode_* the latency per generated token over new_tokens steps
        _field("decode_ms", pa.float64(), nullable=True),
        _field("decode_p90_ms", pa.float64(), nullable=True),
        _field("new_tokens", pa.int64(), nullable=True),
        # interleaved rounds the lowest median was kept of (ProfileOptions.rounds); null: one
        _field("rounds", pa.int64(), nullable=True),
    ]
)
"""Columns of the latency table. Files written before a nullable column was added read back
with nulls in it (the store reads every file against this schema)."""

TABLES: dict[str, pa.Schema] = {"evaluations": EVALUATION_SCHEMA, "latency": LATENCY_SCHEMA}
"""Table name -> schema; each table is the dataset directory ``<root>/<name>``."""

_AUTO_COLUMNS = {
    "evaluations": ("experiment", "timestamp"),
    "latency": ("experiment", "timestamp", "config_hash"),
}


# ------------------------------------------------------------------------------------ configs


def _json_default(value: Any) -> Any:
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _as_config_dict(config: Mapping[str, Any] | str, where: str = "config") -> dict[str, Any]:
    """A config given as a mapping or a JSON object string, as a dict with string keys."""
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as exc:
            raise ResultsError(f"{where}: not valid JSON ({exc}): {config[:80]!r}") from exc
    if not isinstance(config, Mapping):
        raise ResultsError(
            f"{where} must be a dict or a JSON object string, got {type(config).__name__}"
        )
    return {str(key): value for key, value in config.items()}


def _canonical_json(config: Mapping[str, Any] | str, where: str = "config") -> str:
    """Sorted-key, compact JSON of a config (the form stored and hashed)."""
    try:
        return json.dumps(
            _as_config_dict(config, where),
            sort_keys=True,
            separators=(",", ":"),
            default=_json_default,
            allow_nan=False,
        )
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ResultsError):
            raise
        raise ResultsError(f"{where} cannot be stored as JSON: {exc}") from exc


def config_hash(config: Mapping[str, Any] | str) -> str:
    """Stable 16-hex-digit key of a config: SHA-1 of its sorted-key JSON.

    Args:
        config: The config as a mapping (numpy scalars allowed) or a JSON object string; key
            order does not matter.

    Returns:
        The first 16 hex digits of the SHA-1 digest.
    """
    return hashlib.sha1(_canonical_json(config).encode()).hexdigest()[:16]


def _natural_key(name: str) -> list[Any]:
    """Sort key putting ``heads_2`` before ``heads_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _flatten_config(config: Mapping[str, Any], where: str) -> dict[str, int]:
    """``cfg_<key>`` -> int (keys in natural order) for configs of at most MAX_FLATTEN_KEYS keys,
    else ``{}``."""
    if len(config) > MAX_FLATTEN_KEYS:
        return {}
    flat = {}
    for key, value in sorted(config.items(), key=lambda item: _natural_key(item[0])):
        if isinstance(value, bool | np.bool_):
            value = int(value)
        if not isinstance(value, int | np.integer):
            raise ResultsError(
                f"{where}: config value {key!r}={value!r} ({type(value).__name__}) is not an "
                f"integer; configs are flat dict[str, int] and are flattened into int64 "
                f"'{CFG_PREFIX}<key>' columns"
            )
        flat[CFG_PREFIX + key] = _check_int64(int(value), f"{where}: config key {key!r}")
    return flat


# --------------------------------------------------------------------------------- validation


def _is_null(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and math.isnan(value)


def _check_int64(value: int, where: str) -> int:
    if not -(2**63) <= value < 2**63:
        raise ResultsError(f"{where}: {value} does not fit in int64")
    return value


def _convert(value: Any, field: pa.Field, where: str) -> Any:
    """A Python value of the field's Arrow type, or ResultsError naming the column."""
    kind = field.type

    def bad(expected: str) -> ResultsError:
        return ResultsError(
            f"{where}: column {field.name!r} ({kind}) must be {expected}, got "
            f"{type(value).__name__} {value!r:.80}"
        )

    if pa.types.is_string(kind):
        if not isinstance(value, str):
            raise bad("a str")
        return str(value)
    if pa.types.is_int64(kind):
        if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
            raise bad("an integer")
        return _check_int64(int(value), f"{where}: column {field.name!r}")
    if pa.types.is_float64(kind):
        if isinstance(value, bool | np.bool_) or not isinstance(
            value, int | float | np.integer | np.floating
        ):
            raise bad("a number")
        return float(value)
    if pa.types.is_boolean(kind):
        if not isinstance(value, bool | np.bool_):
            raise bad("a bool")
        return bool(value)
    if pa.types.is_timestamp(kind):
        return _to_utc(value, bad)
    raise AssertionError(f"no conversion for {kind}")  # pragma: no cover - schema is fixed


def _to_utc(value: Any, bad: Callable[[str], ResultsError]) -> datetime:
    """An aware UTC datetime; naive datetimes are taken to be UTC already."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise bad("a datetime or an ISO-8601 string") from None
    elif isinstance(value, np.datetime64):
        value = pd.Timestamp(value).to_pydatetime()
    if not isinstance(value, datetime):
        raise bad("a datetime (naive = UTC), pandas Timestamp or ISO-8601 string")
    if isinstance(value, pd.Timestamp):
        value = value.to_pydatetime(warn=False)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _derive(row: Mapping[str, Any]) -> Mapping[str, Any]:
    """An evaluation row with `task_kind` and `perplexity` filled in from its metric."""
    lm = row.get("metric_name") == "perplexity"
    extra = {}
    if row.get("task_kind") is None:
        extra["task_kind"] = "lm" if lm else "classification"
    if lm and row.get("perplexity") is None:
        extra["perplexity"] = row.get("metric_value")
    return {**row, **extra} if extra else row


def prepare_rows(
    rows: Sequence[Mapping[str, Any]], table: str, experiment: str
) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Validate rows, fill defaults, flatten configs; the Arrow table to write (no partition
    column) and the converted rows."""
    schema = TABLES[table]
    if isinstance(rows, Mapping):
        raise ResultsError(
            f"{table} rows must be a sequence of mappings; wrap a single row in [...]"
        )
    rows = list(rows)
    auto = _AUTO_COLUMNS[table]
    required = [f.name for f in schema if not f.nullable and f.name not in auto]
    optional = [f.name for f in schema if f.nullable]
    known = set(schema.names)
    now = datetime.now(UTC)
    out: list[dict[str, Any]] = []
    cfg_columns: dict[str, None] = {}  # ordered set, in order of first appearance
    for index, row in enumerate(rows):
        where = f"{table} row {index}"
        if not isinstance(row, Mapping):
            raise ResultsError(f"{where} is a {type(row).__name__}, not a mapping")
        keys = [str(key) for key in row]
        unknown = [k for k in keys if k not in known and not k.startswith(CFG_PREFIX)]
        if unknown:
            raise ResultsError(
                f"{where} has unknown column(s) {unknown}; columns are {schema.names}"
                + (f" (plus derived '{CFG_PREFIX}*')" if table == "evaluations" else "")
            )
        missing = [name for name in required if name not in row]
        if missing:
            raise ResultsError(
                f"{where} is missing required column(s) {missing}; required: {required}; "
                f"optional (null if absent): {optional}; filled in if absent: {list(auto)}"
            )
        if table == "evaluations":
            row = _derive(row)
        converted: dict[str, Any] = {}
        for field in schema:
            name = field.name
            value = row.get(name)
            if name == "config":
                config = _as_config_dict(value, f"{where}: column 'config'")
                converted[name] = _canonical_json(config, f"{where}: column 'config'")
                if table == "evaluations":
                    flat = _flatten_config(config, where)
                    converted.update(flat)
                    cfg_columns.update(dict.fromkeys(flat))
                continue
            if _is_null(value):
                if name == PARTITION:
                    value = experiment
                elif name == "timestamp":
                    value = now
                elif name == "config_hash":
                    value = config_hash(row["config"])
                elif field.nullable:
                    converted[name] = None
                    continue
                elif isinstance(value, float):  # NaN in a required double column is a value
                    if pa.types.is_float64(field.type):
                        converted[name] = value
                        continue
                    raise ResultsError(f"{where}: required column {name!r} is NaN")
                else:
                    raise ResultsError(f"{where}: required column {name!r} is {value!r}")
            converted[name] = _convert(value, field, where)
        if converted[PARTITION] != experiment:
            raise ResultsError(
                f"{where}: experiment {converted[PARTITION]!r} differs from the store's "
                f"experiment {experiment!r}"
            )
        if table == "evaluations" and converted["status"] not in STATUSES:
            raise ResultsError(
                f"{where}: column 'status' must be one of {list(STATUSES)}, "
                f"got {converted['status']!r}"
            )
        out.append(converted)

    fields = [f for f in schema if f.name != PARTITION]
    fields += [pa.field(name, pa.int64(), nullable=True) for name in cfg_columns]
    file_schema = pa.schema(fields, metadata={b"nas_prune.table": table.encode()})
    columns = {f.name: [row.get(f.name) for row in out] for f in fields}
    try:
        arrow = pa.Table.from_pydict(columns, schema=file_schema)
    except (pa.ArrowException, TypeError, ValueError) as exc:  # pragma: no cover - validated
        raise ResultsError(f"{table} rows do not fit the schema: {exc}") from exc
    return arrow, out
