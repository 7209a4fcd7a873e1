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
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nas_prune.errors import ResultsError
from nas_prune.results.files import (
    QUARANTINE_HINT,
    check_experiment,
    data_files,
    partition_dir,
    partitions,
    read_file,
    read_table,
    resolve,
    write_atomic,
)
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
    table_dir, name, implied = resolve(path, table)
    if experiment is None:
        experiment = implied
    elif implied is not None and implied != experiment:
        raise ResultsError(f"{path} holds experiment {implied!r}, not {experiment!r}")
    columns = list(columns) if columns is not None else None
    skipped: list[str] = []
    arrow = read_table(partitions(table_dir, experiment), TABLES[name], table_dir, columns,
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
        self.experiment = check_experiment(experiment)
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
        return partition_dir(self.root / table, self.experiment)

    def _append(self, table: str, rows: Sequence[Mapping[str, Any]]) -> tuple[Path | None, list]:
        arrow, converted = prepare_rows(rows, table, self.experiment)
        if not converted:
            return None, converted
        file = write_atomic(arrow, self._dir(table))
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
        for file in data_files(self._dir("latency")):
            if file in self._latency_files:
                continue
            self._latency_files.add(file)  # an unreadable file is warned about only once
            arrow = read_file(file, None)
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
