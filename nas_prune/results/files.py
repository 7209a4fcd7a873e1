"""The results store on disk: hive partitions per experiment, checked atomic writes, and reads
that name and skip a damaged part instead of failing (see nas_prune.results)."""

from __future__ import annotations

import logging
import os
import shlex
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from nas_prune.errors import ResultsError
from nas_prune.results.schema import PARTITION, TABLES

logger = logging.getLogger("nas_prune.results")


_PARTITION_SCHEMA = pa.schema([pa.field(PARTITION, pa.string())])
_HIDDEN_PREFIXES = (".", "_")

QUARANTINE_HINT = (
    "To keep every reader (pandas and pyarrow too) off it, move it to a name starting with "
    "'_' (readers ignore such names): mv {file} {quarantined}; repair or delete it later"
)
"""How to quarantine a damaged results file (``{file}``: its path, ``{quarantined}``: the
suggested new path); part of the warning :func:`load` logs when it skips one."""


# ------------------------------------------------------------------------------------- writing


_uuid_lock = threading.Lock()
_uuid_last_time = 0


def _uuid7() -> uuid.UUID:
    """A time-ordered UUID (version 7 layout): 48-bit milliseconds and 12 bits of sub-millisecond
    time, strictly increasing within the process, then 62 random bits."""
    global _uuid_last_time
    now = time.time_ns()
    stamp = (now // 1_000_000) << 12 | (now % 1_000_000) * 4096 // 1_000_000
    with _uuid_lock:
        stamp = max(stamp, _uuid_last_time + 1)
        _uuid_last_time = stamp
    millis, sub = stamp >> 12, stamp & 0xFFF
    rand = int.from_bytes(os.urandom(8), "big") & (2**62 - 1)
    value = (millis & (2**48 - 1)) << 80 | 0x7 << 76 | sub << 64 | 0b10 << 62 | rand
    return uuid.UUID(int=value)


def check_experiment(experiment: str) -> str:
    if not isinstance(experiment, str) or not experiment.strip():
        raise ResultsError(f"experiment must be a non-empty string, got {experiment!r}")
    return experiment


def partition_dir(table_dir: Path, experiment: str) -> Path:
    return table_dir / f"{PARTITION}={urllib.parse.quote(experiment, safe='')}"


def _check_written(temp: Path, table: pa.Table) -> None:
    """Raise ResultsError unless ``temp`` reads back as ``table``'s schema and row count."""
    try:
        written = pq.read_table(temp)
    except (OSError, pa.ArrowException) as exc:
        problem = f"it does not read back ({_one_line(exc)})"
    else:
        if not written.schema.equals(table.schema):
            problem = f"its schema differs from the rows' ({_schema_diff(table.schema, written)})"
        elif written.num_rows != table.num_rows:
            problem = f"it holds {written.num_rows} rows, not {table.num_rows}"
        else:
            return
    raise ResultsError(
        f"writing {table.num_rows} row(s) to {temp.parent} failed: {problem}; nothing was "
        "stored. Check the disk (free space, I/O errors) and run again"
    )


def _schema_diff(expected: pa.Schema, table: pa.Table) -> str:
    for field in expected:
        if field.name not in table.column_names:
            return f"column {field.name!r} is missing"
        got = table.schema.field(field.name)
        if not got.equals(field):
            return f"column {field.name!r} is {got.type}, not {field.type}"
    return f"columns {table.column_names}, expected {expected.names}"


def write_atomic(table: pa.Table, directory: Path) -> Path:
    """Write ``table`` to a new ``part-<uuid>.parquet`` in ``directory`` via a hidden temp file,
    renamed into place only once it reads back with the right schema and row count."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"part-{_uuid7()}.parquet"
    final = directory / name
    temp = directory / f".{name}.tmp"
    try:
        with open(temp, "wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        _check_written(temp, table)
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (POSIX); not possible on every platform
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return final
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
    return final


# ------------------------------------------------------------------------------------- reading


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _skip(file: Path, problem: str, skipped: list[str] | None) -> None:
    """Warn, in one line, that ``file`` is left out and how to quarantine it."""
    if skipped is not None:
        skipped.append(str(file))
    logger.warning(
        "skipping results file %s (%s); its rows are left out, all others are read. %s",
        file, problem, QUARANTINE_HINT.format(
            file=shlex.quote(str(file)),
            quarantined=shlex.quote(str(file.with_name(f"_damaged-{file.name}"))),
        ),
    )


def _visible(name: str) -> bool:
    return not name.startswith(_HIDDEN_PREFIXES)


def data_files(partition_dir: Path) -> list[Path]:
    if not partition_dir.is_dir():
        return []
    return sorted(
        p for p in partition_dir.iterdir() if _visible(p.name) and p.name.endswith(".parquet")
    )


def partitions(table_dir: Path, experiment: str | None) -> list[tuple[str, Path]]:
    """(experiment, directory) of the partitions to read, sorted by directory name."""
    if experiment is not None:
        directory = partition_dir(table_dir, experiment)
        return [(experiment, directory)] if directory.is_dir() else []
    if not table_dir.is_dir():
        return []
    found = []
    for directory in sorted(table_dir.iterdir()):
        key, sep, value = directory.name.partition("=")
        if sep and key == PARTITION and _visible(directory.name) and directory.is_dir():
            found.append((urllib.parse.unquote(value), directory))
    return found


def resolve(path: str | os.PathLike, table: str | None) -> tuple[Path, str, str | None]:
    """(table directory, table name, experiment implied by the path) for :func:`load`."""
    path = Path(path)
    if table is not None and table not in TABLES:
        raise ResultsError(f"unknown table {table!r}; tables are {list(TABLES)}")
    implied = None
    if path.name.startswith(f"{PARTITION}="):  # an experiment's partition directory
        implied = urllib.parse.unquote(path.name.partition("=")[2])
        path = path.parent
    if path.name in TABLES and not (table is not None and (path / table).is_dir()):
        if table is not None and table != path.name:
            raise ResultsError(f"{path} is the {path.name!r} table, but table={table!r}")
        return path, path.name, implied
    table = table or "evaluations"
    if implied is not None:  # a partition directory inside a table directory of another name
        return path, table, implied
    return path / table, table, None


def _read_schema(file: Path, skipped: list[str]) -> pa.Schema | None:
    try:
        return pq.read_schema(file).remove_metadata()
    except (OSError, pa.ArrowException) as exc:
        _skip(file, f"unreadable: {_one_line(exc)}", skipped)
        return None


def read_file(file: Path, columns: list[str] | None,
               skipped: list[str] | None = None) -> pa.Table | None:
    try:
        table = pq.read_table(file)
    except (OSError, pa.ArrowException) as exc:
        _skip(file, f"unreadable: {_one_line(exc)}", skipped)
        return None
    if columns is not None:
        table = table.select([c for c in columns if c in table.column_names])
    return table


def _conflict(unified: pa.Schema, schema: pa.Schema) -> str:
    """What in ``schema`` (one file's) cannot be read as ``unified`` (the table's so far)."""
    for field in schema:
        index = unified.get_field_index(field.name)
        if index < 0:
            continue
        expected = unified.field(index).type
        try:
            pa.unify_schemas([pa.schema([unified.field(index)]), pa.schema([field])],
                             promote_options="permissive")
        except (pa.ArrowException, TypeError):
            return f"column {field.name!r} is {field.type}, but {expected} in the table"
    return "its columns do not fit the table's"  # pragma: no cover - found above


def read_table(
    parts: list[tuple[str, Path]],
    base: pa.Schema,
    table_dir: Path,
    columns: list[str] | None,
    skipped: list[str],
) -> pa.Table:
    """All rows of the given partitions, the partition column included, schemas unified.

    A file that cannot be read, or whose column types conflict with the schema (or with the
    files before it), is skipped with one warning and listed in ``skipped``."""
    base_fields = pa.schema([f for f in base if f.name != PARTITION])
    unified = base_fields
    files: list[tuple[str, Path, pa.Schema]] = []
    for experiment, directory in parts:
        for file in data_files(directory):
            schema = _read_schema(file, skipped)
            if schema is None:
                continue
            try:
                unified = pa.unify_schemas([unified, schema], promote_options="permissive")
            except (pa.ArrowException, TypeError):
                _skip(file, _conflict(unified, schema), skipped)
                continue
            files.append((experiment, file, schema))
    if files:
        unified = unified.insert(0, base.field(PARTITION))
        try:
            dataset = ds.dataset(
                [str(f) for _, f, _ in files],
                schema=unified,
                format="parquet",
                partitioning=ds.partitioning(_PARTITION_SCHEMA, flavor="hive"),
                partition_base_dir=str(table_dir),
            )
            wanted = None if columns is None else [c for c in columns if c in unified.names]
            return dataset.to_table(columns=wanted)
        except (OSError, pa.ArrowException) as exc:
            logger.info("fast read of %s failed (%s); reading file by file", table_dir, exc)

    tables = []
    for experiment, file, _ in files:
        arrow = read_file(file, columns, skipped)
        if arrow is None:
            continue
        if columns is None or PARTITION in columns:
            arrow = arrow.append_column(
                base.field(PARTITION), pa.array([experiment] * len(arrow), pa.string())
            )
        tables.append(arrow.replace_schema_metadata(None))
    empty = base_fields.insert(0, base.field(PARTITION)).empty_table()
    if columns is not None:
        empty = empty.select([c for c in columns if c in empty.column_names])
    result = pa.concat_tables([empty, *tables], promote_options="permissive")
    if columns is not None:
        return result.select([c for c in columns if c in result.column_names])
    return result
