"""The results store: an append-only, hive-partitioned Parquet dataset (DESIGN.md item 6).

Every evaluated sub-network (and every rung result of a multi-fidelity scheduler) becomes one row
of the ``evaluations`` table; every latency measurement (or prediction) one row of the
``latency`` table. Each table is its own pyarrow Parquet dataset under the store's root, hive
partitioned by experiment::

    <root>/evaluations/experiment=<name>/part-<uuid>.parquet
    <root>/latency/experiment=<name>/part-<uuid>.parquet

Writes are append-only and atomic: one call writes one file, first to a hidden temporary file
(``.part-<uuid>.parquet.tmp``) in the same directory, fsync'ed, then renamed into place with
:func:`os.replace`. Readers (:func:`load`, ``pyarrow.dataset``, ``pandas.read_parquet``) ignore
names starting with ``"."`` or ``"_"``, so they never see a partial file; a writer killed mid-write
leaves at most a hidden temporary file behind. File names hold a time-ordered UUID, so several
processes can append to the same experiment at once without clashing and the sorted file list is
(about) the order of writing.

The experiment is the partition key: it is stored in the directory name (URI-encoded), not inside
the files, and :func:`load` returns it as a plain string column. The columns and their Arrow types
are fixed by :data:`EVALUATION_SCHEMA` and :data:`LATENCY_SCHEMA`; non-nullable columns are
required in every row (a ``double`` column may hold NaN, e.g. the error of a crashed trial),
nullable ones default to null, and ``experiment``/``timestamp`` (and the latency table's
``config_hash``) are filled in when absent.

Configs are stored as canonical JSON (sorted keys, no spaces), identical in both tables, so the
``config`` column can be used to join evaluations with latencies. In the evaluations table a
config is also flattened into ``cfg_<key>`` int64 columns (``cfg_num_layers``, ``cfg_heads_0``,
...). Their schema is inferred per write and unified on read, so rows of different search spaces
can share an experiment; a row without a given ``cfg_`` column reads as NaN there. A config with
more than :data:`MAX_FLATTEN_KEYS` keys (the ``large`` space has one bit per head and neuron:
thousands of keys) is **not** flattened; only its JSON is stored.

Every written file is read back (schema and row count) before it is renamed into place, so the
store never holds a file that ``pandas.read_parquet(<root>/evaluations)`` cannot read. Reading is
robust to files damaged afterwards: a corrupt or truncated Parquet file (a crashed copy, a disk
error) or one whose column types no longer fit (a user rewrote ``error`` as strings) is skipped
with one logged warning naming it and saying how to quarantine it (rename it to start with
``_``), and the rest of the dataset is returned.

One search at a time per experiment: :meth:`ResultStore.lock` holds an experiment exclusively
(``fcntl.flock`` on ``<root>/.locks/<experiment>.lock``, released by the kernel when its holder
dies), so a second search on the same experiment refuses instead of repeating trials.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shlex
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from nas_prune.errors import ResultsError
from nas_prune.results.schema import (
    CFG_PREFIX,
    EVALUATION_SCHEMA,
    LATENCY_SCHEMA,
    MAX_FLATTEN_KEYS,
    PARTITION,
    STATUSES,
    TABLES,
    config_hash,
    prepare_rows,
)
from nas_prune.search import pareto

logger = logging.getLogger(__name__)

__all__ = [
    "CFG_PREFIX",
    "EVALUATION_SCHEMA",
    "LATENCY_SCHEMA",
    "MAX_FLATTEN_KEYS",
    "QUARANTINE_HINT",
    "STATUSES",
    "TABLES",
    "ResultStore",
    "ResultsError",
    "config_hash",
    "load",
    "pareto_rows",
]


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


def _check_experiment(experiment: str) -> str:
    if not isinstance(experiment, str) or not experiment.strip():
        raise ResultsError(f"experiment must be a non-empty string, got {experiment!r}")
    return experiment


def _partition_dir(table_dir: Path, experiment: str) -> Path:
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


def _write_atomic(table: pa.Table, directory: Path) -> Path:
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


def _data_files(partition_dir: Path) -> list[Path]:
    if not partition_dir.is_dir():
        return []
    return sorted(
        p for p in partition_dir.iterdir() if _visible(p.name) and p.name.endswith(".parquet")
    )


def _partitions(table_dir: Path, experiment: str | None) -> list[tuple[str, Path]]:
    """(experiment, directory) of the partitions to read, sorted by directory name."""
    if experiment is not None:
        directory = _partition_dir(table_dir, experiment)
        return [(experiment, directory)] if directory.is_dir() else []
    if not table_dir.is_dir():
        return []
    found = []
    for directory in sorted(table_dir.iterdir()):
        key, sep, value = directory.name.partition("=")
        if sep and key == PARTITION and _visible(directory.name) and directory.is_dir():
            found.append((urllib.parse.unquote(value), directory))
    return found


def _resolve(path: str | os.PathLike, table: str | None) -> tuple[Path, str, str | None]:
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


def _read_file(file: Path, columns: list[str] | None,
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


def _read_table(
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
        for file in _data_files(directory):
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
        arrow = _read_file(file, columns, skipped)
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


def load(
    path: str | os.PathLike,
    table: str | None = None,
    experiment: str | None = None,
    columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Read a results table (all experiments, or one) into a DataFrame.

    A damaged file (corrupt, truncated, or a column of another type than the schema's, e.g.
    ``error`` rewritten as strings) is skipped with one logged warning naming it and saying how
    to quarantine it (:data:`QUARANTINE_HINT`); every other row is returned, and the skipped
    files are listed in ``frame.attrs["skipped_files"]``. Rows come in file-name order, which
    is about the order of writing.

    Args:
        path: The store root, a table directory (``<root>/evaluations``) or one experiment's
            partition directory (``<root>/evaluations/experiment=<name>``).
        table: ``"evaluations"`` or ``"latency"``; None means the table ``path`` names, else
            ``"evaluations"``.
        experiment: Only this experiment's rows (None: all experiments, or the one ``path``
            names).
        columns: Only these columns (unknown names are left out).

    Returns:
        One row per stored row, with ``experiment`` as a plain string column, UTC timestamps and
        the union of the ``cfg_`` columns (NaN where a row has none). With nothing stored, an
        empty DataFrame with the schema's columns. ``attrs["skipped_files"]``: the paths of
        the damaged files left out (empty if none).

    Raises:
        ResultsError: Unknown table name, or a table directory that contradicts ``table``.
    """
    table_dir, name, implied = _resolve(path, table)
    if experiment is None:
        experiment = implied
    elif implied is not None and implied != experiment:
        raise ResultsError(f"{path} holds experiment {implied!r}, not {experiment!r}")
    columns = list(columns) if columns is not None else None
    skipped: list[str] = []
    arrow = _read_table(_partitions(table_dir, experiment), TABLES[name], table_dir, columns,
                        skipped)
    frame = arrow.to_pandas()
    if PARTITION in frame.columns and isinstance(frame[PARTITION].dtype, pd.CategoricalDtype):
        frame[PARTITION] = frame[PARTITION].astype(str)  # pragma: no cover - defensive
    frame.attrs["skipped_files"] = skipped
    return frame


# --------------------------------------------------------------------------------------- store


class ResultStore:
    """Appends rows of one experiment to the results dataset under ``root`` and reads them back.

    Safe to use from several processes at once (each write is its own uniquely named file);
    :meth:`lock` keeps a second search off an experiment that a search is writing.

    Args:
        root: The store root; ``<root>/evaluations`` and ``<root>/latency`` are created on the
            first write.
        experiment: The experiment name (any non-empty string; URI-encoded in the directory
            name).
    """

    def __init__(self, root: str | os.PathLike, experiment: str) -> None:
        self.root = Path(root)
        self.experiment = _check_experiment(experiment)
        self._latency_files: set[Path] = set()
        self._latency_index: dict[tuple, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"ResultStore(root={str(self.root)!r}, experiment={self.experiment!r})"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold this experiment exclusively, e.g. for the whole of a search, so that a second
        search writing the same experiment refuses at once instead of evaluating configs twice
        and writing trial ids twice.

        The lock is ``fcntl.flock`` on ``<root>/.locks/<experiment>.lock`` (readers ignore the
        hidden directory); it does not wait. The kernel releases it when its holder exits, so a
        crashed or killed search never leaves the experiment locked. Appending rows does not
        take the lock: other processes of the same search (Ray workers, profilers) still write.

        Raises:
            ResultsError: Another process holds the experiment; the message names its pid.
        """
        directory = self.root / ".locks"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{urllib.parse.quote(self.experiment, safe='')}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise ResultsError(
                    f"experiment {self.experiment!r} in {self.root} is being written by another "
                    f"process (pid {holder}); wait for it or choose another experiment"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _dir(self, table: str) -> Path:
        return _partition_dir(self.root / table, self.experiment)

    def _append(self, table: str, rows: Sequence[Mapping[str, Any]]) -> tuple[Path | None, list]:
        arrow, converted = prepare_rows(rows, table, self.experiment)
        if not converted:
            return None, converted
        file = _write_atomic(arrow, self._dir(table))
        logger.debug("wrote %d %s row(s) to %s", len(converted), table, file)
        return file, converted

    def append_evaluations(self, rows: Sequence[Mapping[str, Any]]) -> Path | None:
        """Validate and append evaluation rows as one new Parquet file (atomically).

        Each row needs the non-nullable columns of :data:`EVALUATION_SCHEMA` (``config`` as a
        dict or a JSON object string; ``status`` one of :data:`STATUSES`); nullable columns
        default to null; ``experiment`` and ``timestamp`` (now, UTC; naive datetimes are taken
        as UTC) are filled in if absent. ``cfg_*`` keys in a row are ignored: they are derived
        from ``config`` (unless it has more than :data:`MAX_FLATTEN_KEYS` keys).

        Args:
            rows: The rows; an empty sequence writes nothing.

        Returns:
            The written file, or None if ``rows`` is empty.

        Raises:
            ResultsError: A row misses required columns, has unknown columns or a value of the
                wrong type; nothing is written then.
        """
        return self._append("evaluations", rows)[0]

    def append_latency(self, rows: Sequence[Mapping[str, Any]]) -> Path | None:
        """Validate and append latency rows as one new Parquet file (atomically).

        As :meth:`append_evaluations`, for :data:`LATENCY_SCHEMA`; ``config_hash`` defaults to
        :func:`config_hash` of the row's config, and configs are not flattened.

        Args:
            rows: The rows; an empty sequence writes nothing.

        Returns:
            The written file, or None if ``rows`` is empty.

        Raises:
            ResultsError: As for :meth:`append_evaluations`.
        """
        file, converted = self._append("latency", rows)
        if file is not None:
            self._latency_files.add(file)
            self._index_latency(converted)
        return file

    def evaluations(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """This experiment's evaluation rows (see :func:`load`)."""
        return load(self.root, "evaluations", self.experiment, columns)

    def latency(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """This experiment's latency rows (see :func:`load`)."""
        return load(self.root, "latency", self.experiment, columns)

    @staticmethod
    def _latency_key(
        hash_: str, hardware: str, batch_size: int, seq_len: int, dtype: str, predicted: bool
    ) -> tuple:
        return (str(hash_), str(hardware), int(batch_size), int(seq_len), str(dtype), predicted)

    def _index_latency(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            key = self._latency_key(
                row["config_hash"],
                row["hardware"],
                row["batch_size"],
                row["seq_len"],
                row["dtype"],
                bool(row["predicted"]),
            )
            old = self._latency_index.get(key)
            if old is None or row["timestamp"] >= old["timestamp"]:
                self._latency_index[key] = dict(row)

    def _refresh_latency_index(self) -> None:
        """Index latency files written since the last look (by any process)."""
        for file in _data_files(self._dir("latency")):
            if file in self._latency_files:
                continue
            self._latency_files.add(file)  # an unreadable file is warned about only once
            arrow = _read_file(file, None)
            if arrow is not None:
                rows = arrow.to_pylist()
                for row in rows:
                    row[PARTITION] = self.experiment
                self._index_latency(rows)

    def cached_latency(
        self,
        config_hash: str,
        hardware: str,
        batch_size: int,
        seq_len: int,
        dtype: str,
        include_predicted: bool = False,
    ) -> dict[str, Any] | None:
        """The latest stored latency row of this experiment for a config and setting, if any.

        Lets the profiler skip configs already measured on a hardware type. Files written by
        other processes are picked up; each file is read once per store object.

        Args:
            config_hash: The row's ``config_hash`` (by default :func:`config_hash` of the
                config).
            hardware: Hardware type, e.g. ``"cpu"``.
            batch_size: Batch size of the measurement.
            seq_len: Sequence length of the measurement.
            dtype: Data type, e.g. ``"float32"``.
            include_predicted: Also return a predicted (not measured) row when no measured one
                exists.

        Returns:
            The row as a dict (Python values, ``timestamp`` an aware datetime), or None.
        """
        self._refresh_latency_index()
        for predicted in (False, True) if include_predicted else (False,):
            key = self._latency_key(config_hash, hardware, batch_size, seq_len, dtype, predicted)
            row = self._latency_index.get(key)
            if row is not None:
                return dict(row)
        return None

    def finished_trials(self, max_fidelity: float | None = None) -> set[str]:
        """Trial ids of this experiment that have a final row (for resuming a search).

        A row is final if its status is ``"stopped"`` or ``"error"``, or ``"ok"`` at a fidelity
        of at least ``max_fidelity``. With ``max_fidelity=None`` every row is final (any trial
        with a result counts as done).

        Args:
            max_fidelity: The full fidelity of the search (e.g. MO-ASHA's maximum resource).

        Returns:
            The set of finished trial ids.
        """
        frame = self.evaluations(columns=["trial_id", "status", "fidelity"])
        if frame.empty:
            return set()
        final = frame["status"].isin(["stopped", "error"])
        if max_fidelity is None:
            final |= frame["status"] == "ok"
        else:
            final |= (frame["status"] == "ok") & (frame["fidelity"] >= max_fidelity)
        return {str(t) for t in frame.loc[final, "trial_id"]}


# -------------------------------------------------------------------------------------- pareto


def pareto_rows(
    df: pd.DataFrame,
    objectives: Sequence[str],
    modes: Sequence[str] | str | None = None,
) -> pd.DataFrame:
    """The non-dominated rows of ``df`` for the given objectives.

    Row a dominates row b if a is at least as good in every objective and strictly better in
    one. Rows equal in all objectives do not dominate each other, so all copies are kept. Rows
    with a NaN objective are left out.

    Args:
        df: Any DataFrame, e.g. from :func:`load`.
        objectives: Numeric column names.
        modes: ``"min"`` or ``"max"`` per objective, or one for all; None minimises all.

    Returns:
        The non-dominated rows, in their original order and with their original index.

    Raises:
        ResultsError: Unknown or non-numeric objective columns, or bad modes.
    """
    objectives = [objectives] if isinstance(objectives, str) else list(objectives)
    if not objectives:
        raise ResultsError("pareto_rows needs at least one objective")
    missing = [name for name in objectives if name not in df.columns]
    if missing:
        raise ResultsError(f"objective column(s) {missing} not in the DataFrame")
    try:
        signs = pareto.mode_signs(modes, len(objectives))
    except ValueError as e:
        raise ResultsError(f"modes for {objectives}: {e}") from None
    try:
        values = df[objectives].to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError) as exc:
        raise ResultsError(f"objective columns {objectives} are not numeric: {exc}") from exc
    values = values * signs  # all minimised now
    return df[pareto.pareto_mask(values)]
