"""Tests of the Parquet results store (nas_prune.results)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from nas_prune.results import (
    EVALUATION_SCHEMA,
    LATENCY_SCHEMA,
    MAX_FLATTEN_KEYS,
    ResultsError,
    ResultStore,
    config_hash,
    load,
    pareto_rows,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

SMALL = {"num_layers": 4, "num_heads": 2, "num_units": 16}
MEDIUM = {"heads_0": 1, "units_0": 8, "heads_1": 0, "units_1": 4}


def eval_row(trial_id: str = "t0", config=None, **overrides) -> dict:
    """A complete evaluations row (all required columns, no optional ones)."""
    row = {
        "method": "nas",
        "task": "rotten_tomatoes",
        "model": "tiny-bert",
        "seed": 0,
        "trial_id": trial_id,
        "config": dict(SMALL) if config is None else config,
        "fidelity": 100.0,
        "fidelity_unit": "examples",
        "error": 0.25,
        "metric_name": "accuracy",
        "metric_value": 0.75,
        "params": 1_000,
        "params_ratio": 0.5,
        "flops": 20_000,
        "wall_time_s": 1.5,
        "eval_time_s": 0.2,
        "status": "ok",
    }
    row.update(overrides)
    return row


def latency_row(config=None, **overrides) -> dict:
    """A complete latency row."""
    row = {
        "hardware": "cpu",
        "device_name": "Test CPU",
        "config": dict(SMALL) if config is None else config,
        "batch_size": 8,
        "seq_len": 128,
        "dtype": "float32",
        "median_ms": 3.0,
        "p90_ms": 3.5,
        "mean_ms": 3.1,
        "std_ms": 0.2,
        "repeats": 20,
        "predicted": False,
        "params": 1_000,
    }
    row.update(overrides)
    return row


# ------------------------------------------------------------------------------------ round trip


def test_round_trip_types_json_config_cfg_columns_and_utc(tmp_path):
    store = ResultStore(tmp_path, "exp1")
    stamp = datetime(2024, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    rows = [
        eval_row("t0", config={"num_units": np.int64(16), "num_layers": 4, "num_heads": 2}),
        eval_row(
            "t1",
            config=json.dumps({"num_layers": 2, "num_heads": 1, "num_units": 8}),
            searcher="random",
            scheduler="mo_asha",
            strategy="sandwich",
            space="small",
            latency_ms=4.5,
            hardware="cpu",
            message="fine",
            seed=np.int64(3),
            error=np.float32(0.5),
            timestamp=stamp,
            status="stopped",
        ),
    ]
    path = store.append_evaluations(rows)
    assert path.parent.name == "experiment=exp1" and path.name.startswith("part-")
    assert path.parent.parent == tmp_path / "evaluations"

    df = store.evaluations()
    fixed = [name for name in EVALUATION_SCHEMA.names]
    assert list(df.columns[: len(fixed)]) == fixed
    assert list(df.columns[len(fixed) :]) == ["cfg_num_heads", "cfg_num_layers", "cfg_num_units"]
    assert len(df) == 2 and list(df["trial_id"]) == ["t0", "t1"]
    for column in ("seed", "params", "flops", "cfg_num_layers", "cfg_num_units"):
        assert df[column].dtype == np.int64, column
    for column in ("fidelity", "error", "metric_value", "params_ratio", "latency_ms"):
        assert df[column].dtype == np.float64, column
    assert isinstance(df["timestamp"].dtype, pd.DatetimeTZDtype)
    assert str(df["timestamp"].dt.tz) == "UTC"
    assert df["timestamp"][1] == pd.Timestamp("2024-05-01 10:00", tz="UTC")
    assert (pd.Timestamp.now(tz="UTC") - df["timestamp"][0]) < pd.Timedelta(minutes=5)

    # Config: canonical JSON (sorted keys, compact), identical for dict and JSON-string input.
    assert df["config"][0] == '{"num_heads":2,"num_layers":4,"num_units":16}'
    assert json.loads(df["config"][1]) == {"num_layers": 2, "num_heads": 1, "num_units": 8}
    assert list(df["cfg_num_units"]) == [16, 8]

    assert df["experiment"].tolist() == ["exp1", "exp1"]
    assert df["seed"].tolist() == [0, 3] and df["error"][1] == 0.5
    assert df["status"].tolist() == ["ok", "stopped"]
    # Optional columns default to null.
    assert pd.isna(df["searcher"][0]) and df["searcher"][1] == "random"
    assert pd.isna(df["latency_ms"][0]) and df["latency_ms"][1] == 4.5
    assert pd.isna(df["message"][0]) and df["message"][1] == "fine"


def test_naive_and_string_timestamps_are_utc_and_nan_error_allowed(tmp_path):
    store = ResultStore(tmp_path, "exp")
    store.append_evaluations(
        [
            eval_row("a", timestamp=datetime(2024, 1, 1, 8, 30)),
            eval_row("b", timestamp="2024-01-01T10:30:00+02:00"),
            eval_row("c", timestamp=pd.Timestamp("2024-01-01 08:30", tz="UTC"), error=float("nan")),
        ]
    )
    df = store.evaluations()
    assert (df["timestamp"] == pd.Timestamp("2024-01-01 08:30", tz="UTC")).all()
    assert np.isnan(df["error"][2])


def test_two_experiments_in_one_root_and_partition_filtering(tmp_path):
    a, b = ResultStore(tmp_path, "alpha"), ResultStore(tmp_path, "beta run/2")
    a.append_evaluations([eval_row("a0"), eval_row("a1")])
    b.append_evaluations([eval_row("b0")])
    a.append_evaluations([eval_row("a2")])

    everything = load(tmp_path)
    assert sorted(everything["trial_id"]) == ["a0", "a1", "a2", "b0"]
    assert everything["experiment"].dtype != "category"
    assert all(isinstance(x, str) for x in everything["experiment"])
    assert set(everything["experiment"]) == {"alpha", "beta run/2"}

    assert list(a.evaluations()["trial_id"]) == ["a0", "a1", "a2"]  # in order of writing
    assert list(b.evaluations()["trial_id"]) == ["b0"]
    assert list(load(tmp_path, experiment="beta run/2")["trial_id"]) == ["b0"]
    assert load(tmp_path, experiment="gamma").empty
    # The table directory and a partition directory work as paths too.
    assert len(load(tmp_path / "evaluations")) == 4
    partition = tmp_path / "evaluations" / "experiment=alpha"
    assert sorted(load(partition)["trial_id"]) == ["a0", "a1", "a2"]
    assert list(load(tmp_path, columns=["trial_id", "experiment"]).columns) == [
        "trial_id",
        "experiment",
    ]


def test_schema_evolution_small_and_medium_space_rows_union_cfg_columns(tmp_path):
    store = ResultStore(tmp_path, "mixed")
    store.append_evaluations([eval_row("s0", space="small"), eval_row("s1", space="small")])
    store.append_evaluations([eval_row("m0", config=MEDIUM, space="medium")])
    # One call may also mix spaces.
    store.append_evaluations(
        [eval_row("s2", config={**SMALL, "num_layers": 1}), eval_row("m1", config=MEDIUM)]
    )
    df = store.evaluations().set_index("trial_id")
    small_cols = ["cfg_num_layers", "cfg_num_heads", "cfg_num_units"]
    medium_cols = ["cfg_heads_0", "cfg_units_0", "cfg_heads_1", "cfg_units_1"]
    assert set(small_cols + medium_cols) <= set(df.columns)
    assert df.loc["s0", small_cols].tolist() == [4, 2, 16]
    assert df.loc["s2", "cfg_num_layers"] == 1
    assert df.loc[["s0", "s1", "s2"], medium_cols].isna().all().all()
    assert df.loc[["m0", "m1"], small_cols].isna().all().all()
    assert df.loc["m1", medium_cols].tolist() == [1, 8, 0, 4]


def test_large_config_is_not_flattened_only_json(tmp_path):
    large = {f"head_{i}_{j}": (i + j) % 2 for i in range(6) for j in range(12)}
    assert len(large) > MAX_FLATTEN_KEYS
    store = ResultStore(tmp_path, "large")
    store.append_evaluations([eval_row("big", config=large), eval_row("small")])
    df = store.evaluations()
    cfg_columns = [c for c in df.columns if c.startswith("cfg_")]
    assert cfg_columns == ["cfg_num_heads", "cfg_num_layers", "cfg_num_units"]
    assert df[cfg_columns].iloc[0].isna().all()
    assert json.loads(df["config"][0]) == large


# ----------------------------------------------------------------------------------- validation


def test_missing_required_columns_error_names_them_and_the_required_ones(tmp_path):
    store = ResultStore(tmp_path, "exp")
    row = eval_row()
    del row["error"], row["params"]
    with pytest.raises(ResultsError) as info:
        store.append_evaluations([eval_row("fine"), row])
    message = str(info.value)
    assert "row 1" in message
    assert "missing required column(s) ['error', 'params']" in message
    assert "required: ['method', 'task', 'model'," in message and "'status']" in message
    assert "optional (null if absent): ['searcher'," in message
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "evaluations").exists()  # nothing written for a bad batch

    lat = latency_row()
    del lat["median_ms"]
    with pytest.raises(ResultsError, match=r"missing required column\(s\) \['median_ms'\]"):
        store.append_latency([lat])


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"seed": "3"}, r"column 'seed' \(int64\) must be an integer, got str '3'"),
        ({"params": 10.5}, r"column 'params' \(int64\) must be an integer, got float"),
        ({"flops": True}, r"column 'flops' \(int64\) must be an integer, got bool"),
        ({"error": "low"}, r"column 'error' \(double\) must be a number, got str"),
        ({"task": 7}, r"column 'task' \(string\) must be a str, got int"),
        ({"searcher": 1}, r"column 'searcher' \(string\) must be a str"),
        ({"timestamp": 1700000000}, r"column 'timestamp' .* must be a datetime"),
        ({"timestamp": "yesterday"}, r"column 'timestamp' .* ISO-8601"),
        ({"method": None}, r"required column 'method' is None"),
        ({"status": "done"}, r"'status' must be one of \['ok', 'rung', 'stopped', 'error'\]"),
        ({"config": [1, 2]}, r"column 'config'.* must be a dict or a JSON object string"),
        ({"config": "{nope"}, r"column 'config'.*not valid JSON"),
        ({"config": {"num_layers": 2.5}}, r"config value 'num_layers'=2.5 \(float\)"),
        ({"experiment": "other"}, r"experiment 'other' differs from the store's"),
        ({"latency": 3.0}, r"unknown column\(s\) \['latency'\]"),
    ],
    ids=[
        "seed-str",
        "params-float",
        "flops-bool",
        "error-str",
        "task-int",
        "searcher-int",
        "timestamp-int",
        "timestamp-text",
        "method-none",
        "status-value",
        "config-list",
        "config-bad-json",
        "config-float-value",
        "experiment-mismatch",
        "unknown-column",
    ],
)
def test_bad_values_raise_clear_errors_naming_the_column(tmp_path, overrides, pattern):
    store = ResultStore(tmp_path, "exp")
    with pytest.raises(ResultsError, match=pattern):
        store.append_evaluations([eval_row(**overrides)])
    assert store.evaluations().empty


def test_other_input_errors(tmp_path):
    store = ResultStore(tmp_path, "exp")
    with pytest.raises(ResultsError, match="wrap a single row"):
        store.append_evaluations(eval_row())
    with pytest.raises(ResultsError, match="row 0 is a str, not a mapping"):
        store.append_evaluations(["row"])
    with pytest.raises(ResultsError, match=r"column 'predicted' \(bool\) must be a bool"):
        store.append_latency([latency_row(predicted=1)])
    with pytest.raises(ResultsError, match="experiment must be a non-empty string"):
        ResultStore(tmp_path, "")
    with pytest.raises(ResultsError, match="unknown table"):
        load(tmp_path, table="nope")
    assert store.append_evaluations([]) is None


def test_loaded_rows_can_be_appended_again(tmp_path):
    """Rows from a loaded DataFrame (NaN for nulls, cfg_ columns, Timestamps) are accepted."""
    store = ResultStore(tmp_path, "exp")
    store.append_evaluations([eval_row("a"), eval_row("b", config=MEDIUM)])
    copy = ResultStore(tmp_path, "copy")
    records = store.evaluations().drop(columns="experiment").to_dict("records")
    copy.append_evaluations(records)
    again = copy.evaluations()
    original = store.evaluations()
    pd.testing.assert_frame_equal(
        again.drop(columns="experiment"), original.drop(columns="experiment")
    )


# -------------------------------------------------------------------------------------- reading


def test_pandas_read_parquet_reads_the_table_directory(tmp_path):
    ResultStore(tmp_path, "alpha").append_evaluations([eval_row("a0"), eval_row("a1")])
    ResultStore(tmp_path, "beta").append_evaluations([eval_row("b0")])
    df = pd.read_parquet(tmp_path / "evaluations")
    assert len(df) == 3
    assert sorted(df["trial_id"]) == ["a0", "a1", "b0"]
    # pandas gives the hive partition column as a categorical; load gives plain strings.
    assert sorted(df["experiment"].astype(str)) == ["alpha", "alpha", "beta"]
    assert df["params"].dtype == np.int64
    assert str(df["timestamp"].dt.tz) == "UTC"


def test_empty_store_gives_empty_frames_with_the_schema_columns(tmp_path):
    store = ResultStore(tmp_path / "nothing-yet", "exp")
    evaluations = store.evaluations()
    assert evaluations.empty and list(evaluations.columns) == EVALUATION_SCHEMA.names
    assert evaluations["params"].dtype == np.int64
    latency = store.latency()
    assert latency.empty and list(latency.columns) == LATENCY_SCHEMA.names
    assert list(load(tmp_path / "missing").columns) == EVALUATION_SCHEMA.names
    assert list(load(tmp_path, table="latency").columns) == LATENCY_SCHEMA.names
    assert store.finished_trials() == set()
    assert store.cached_latency("0" * 16, "cpu", 8, 128, "float32") is None


def test_hidden_and_underscore_files_are_ignored(tmp_path):
    store = ResultStore(tmp_path, "exp")
    path = store.append_evaluations([eval_row("a")])
    (path.parent / ".part-crashed.parquet.tmp").write_bytes(b"PAR1 half written")
    (path.parent / "_SUCCESS").write_bytes(b"")
    (path.parent / "_metadata.parquet").write_bytes(b"junk")
    assert list(load(tmp_path)["trial_id"]) == ["a"]
    assert len(pd.read_parquet(tmp_path / "evaluations")) == 1


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad_page"])
def test_corrupt_file_is_skipped_with_a_warning_naming_it(tmp_path, caplog, damage):
    store = ResultStore(tmp_path, "exp")
    store.append_evaluations([eval_row(f"a{i}") for i in range(5)])
    victim = store.append_evaluations([eval_row(f"b{i}") for i in range(5)])
    store.append_evaluations([eval_row("c0", config=MEDIUM)])
    data = bytearray(victim.read_bytes())
    if damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:  # footer intact, a column chunk's page header destroyed: fails only when reading data
        chunk = pq.ParquetFile(victim).metadata.row_group(0).column(3)
        start = chunk.dictionary_page_offset or chunk.data_page_offset
        data[start : start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    victim.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="nas_prune.results"):
        df = load(tmp_path)
    assert sorted(df["trial_id"]) == ["a0", "a1", "a2", "a3", "a4", "c0"]
    assert "cfg_heads_0" in df.columns and "cfg_num_layers" in df.columns
    assert df["experiment"].tolist() == ["exp"] * 6
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and victim.name in warnings[0] and "unreadable" in warnings[0]


# -------------------------------------------------------------------------------------- latency


def test_latency_round_trip_and_cache_hit_miss(tmp_path):
    store = ResultStore(tmp_path, "exp")
    key = config_hash(SMALL)
    assert store.cached_latency(key, "cpu", 8, 128, "float32") is None
    store.append_latency([latency_row(), latency_row(hardware="A10G", median_ms=0.5)])

    hit = store.cached_latency(key, "cpu", 8, 128, "float32")
    assert hit is not None and hit["median_ms"] == 3.0 and hit["hardware"] == "cpu"
    assert hit["config"] == '{"num_heads":2,"num_layers":4,"num_units":16}'
    assert hit["config_hash"] == key and hit["experiment"] == "exp"
    assert store.cached_latency(key, "A10G", 8, 128, "float32")["median_ms"] == 0.5
    assert store.cached_latency(key, "cpu", 16, 128, "float32") is None  # other batch size
    assert store.cached_latency(key, "cpu", 8, 64, "float32") is None  # other length
    assert store.cached_latency(key, "cpu", 8, 128, "bfloat16") is None  # other dtype
    assert store.cached_latency(config_hash(MEDIUM), "cpu", 8, 128, "float32") is None

    # A predicted row is not a measurement unless asked for; a later row wins.
    other = config_hash(MEDIUM)
    store.append_latency([latency_row(MEDIUM, predicted=True, repeats=0, median_ms=9.0)])
    assert store.cached_latency(other, "cpu", 8, 128, "float32") is None
    predicted = store.cached_latency(other, "cpu", 8, 128, "float32", include_predicted=True)
    assert predicted["predicted"] is True and predicted["median_ms"] == 9.0

    # Another store object (another process) sees the files, including later writes.
    fresh = ResultStore(tmp_path, "exp")
    assert fresh.cached_latency(key, "cpu", 8, 128, "float32")["median_ms"] == 3.0
    store.append_latency([latency_row(median_ms=2.0, trial_id="t9", method="nas")])
    again = fresh.cached_latency(key, "cpu", 8, 128, "float32")
    assert again["median_ms"] == 2.0 and again["trial_id"] == "t9"
    # The cache is per experiment (latency depends on the model behind the config).
    assert ResultStore(tmp_path, "other").cached_latency(key, "cpu", 8, 128, "float32") is None

    df = store.latency()
    assert list(df.columns) == LATENCY_SCHEMA.names and len(df) == 4
    pd.testing.assert_frame_equal(load(tmp_path / "latency"), df)  # table named by the path
    pd.testing.assert_frame_equal(load(tmp_path, table="latency", experiment="exp"), df)
    with pytest.raises(ResultsError, match="is the 'latency' table"):
        load(tmp_path / "latency", table="evaluations")
    assert df["predicted"].dtype == bool and df["batch_size"].dtype == np.int64
    assert df["config_hash"].tolist() == [key, key, other, key]
    assert pd.isna(df["trial_id"][0]) and df["trial_id"][3] == "t9"


def test_config_hash_is_sorted_json_sha1_prefix():
    import hashlib

    expected = hashlib.sha1(b'{"num_heads":2,"num_layers":4,"num_units":16}').hexdigest()[:16]
    assert config_hash(SMALL) == expected
    assert config_hash({"num_units": 16, "num_layers": np.int64(4), "num_heads": 2}) == expected
    assert config_hash(json.dumps(SMALL, indent=2)) == expected
    assert len(config_hash(MEDIUM)) == 16 and config_hash(MEDIUM) != expected


def test_finished_trials(tmp_path):
    store = ResultStore(tmp_path, "exp")
    store.append_evaluations(
        [
            eval_row("rung-only", fidelity=100.0),
            eval_row("done", fidelity=100.0),
            eval_row("done", fidelity=400.0),
            eval_row("stopped", fidelity=100.0, status="stopped"),
            eval_row("crashed", fidelity=0.0, status="error", error=float("nan")),
        ]
    )
    assert store.finished_trials(max_fidelity=400.0) == {"done", "stopped", "crashed"}
    assert store.finished_trials() == {"rung-only", "done", "stopped", "crashed"}
    assert ResultStore(tmp_path, "other").finished_trials() == set()


# --------------------------------------------------------------------------------------- pareto


def test_pareto_rows_hand_computed_example():
    df = pd.DataFrame(
        {
            "error": [0.10, 0.20, 0.15, 0.30, 0.12, 0.20, 0.10, np.nan],
            "params": [900, 300, 500, 100, 900, 600, 900, 10],
            "name": list("abcdefgh"),
        },
        index=[10, 11, 12, 13, 14, 15, 16, 17],
    )
    # a(0.10, 900) and g are equal (both kept); b, c, d trade off; e is dominated by a,
    # f by b (same error, more params); h has a NaN objective.
    front = pareto_rows(df, ["error", "params"])
    assert list(front["name"]) == ["a", "b", "c", "d", "g"]
    assert list(front.index) == [10, 11, 12, 13, 16]

    df["accuracy"] = 1 - df["error"]
    assert list(pareto_rows(df, ["accuracy", "params"], modes=["max", "min"])["name"]) == list(
        "abcdg"
    )
    # Maximising both: the most accurate rows with the most parameters.
    assert list(pareto_rows(df, ["accuracy", "params"], modes="max")["name"]) == ["a", "g"]
    assert list(pareto_rows(df, ["params"])["name"]) == ["h"]
    assert pareto_rows(df.iloc[:0], ["error", "params"]).empty
    with pytest.raises(ResultsError, match="not in the DataFrame"):
        pareto_rows(df, ["error", "latency"])
    with pytest.raises(ResultsError, match="1 modes .* for 2 objectives"):
        pareto_rows(df, ["error", "params"], modes=["min"])


def test_pareto_rows_matches_brute_force():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 8, size=(300, 3)).astype(float)
    df = pd.DataFrame(values, columns=["x", "y", "z"])
    front = set(pareto_rows(df, ["x", "y", "z"]).index)
    brute = {
        i
        for i in range(len(values))
        if not any(
            np.all(values[j] <= values[i]) and np.any(values[j] < values[i])
            for j in range(len(values))
        )
    }
    assert front == brute


# ---------------------------------------------------------------------------- crash / processes

WRITER = textwrap.dedent(
    """
    import os, sys
    from nas_prune.results import ResultStore

    root, experiment, tag, batches, size, payload = sys.argv[1:7]
    store = ResultStore(root, experiment)
    base = {
        "method": "nas", "task": "t", "model": "m", "seed": 0, "fidelity": 1.0,
        "fidelity_unit": "epochs", "error": 0.1, "metric_name": "accuracy",
        "metric_value": 0.9, "params": 10, "params_ratio": 0.1, "flops": 100,
        "wall_time_s": 0.0, "eval_time_s": 0.0, "status": "ok",
    }
    for batch in range(int(batches)):
        rows = [
            {
                **base,
                "trial_id": f"{tag}-{batch}-{i}",
                "config": {"num_layers": i % 12},
                "message": os.urandom(int(payload)).hex(),  # incompressible: slow writes
            }
            for i in range(int(size))
        ]
        store.append_evaluations(rows)
        print(batch, flush=True)
    """
)


def start_writer(
    root: Path, tag: str, batches: int, size: int, payload: int = 10
) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    args = [str(root), "exp", tag, str(batches), str(size), str(payload)]
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, *args], stdout=subprocess.PIPE, text=True, env=env
    )


def test_kill_9_while_appending_leaves_every_finished_batch_readable(tmp_path, caplog):
    """SIGKILL a writer while it is writing a batch (a hidden temp file exists): every batch
    it finished is readable, no partial file is visible, and nothing warns."""
    size = 40  # rows of 64 KiB each: a batch takes a while to write
    directory = tmp_path / "evaluations" / "experiment=exp"
    writer = start_writer(tmp_path, "w", batches=1_000, size=size, payload=32_768)
    try:
        confirmed = -1
        while confirmed < 3:
            line = writer.stdout.readline()
            assert line, "writer exited early"
            confirmed = int(line)
        deadline = time.monotonic() + 60
        while not any(name.startswith(".") for name in os.listdir(directory)):
            assert time.monotonic() < deadline, "never saw a temp file"
            time.sleep(0.001)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
        confirmed = max([confirmed, *map(int, writer.stdout.read().split())])
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == -signal.SIGKILL

    with caplog.at_level(logging.WARNING, logger="nas_prune.results"):
        df = load(tmp_path, columns=["experiment", "trial_id"])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    batches = df["trial_id"].str.split("-").str[1].astype(int)
    assert set(range(confirmed + 1)) <= set(batches)  # all confirmed batches are there
    counts = batches.value_counts()
    assert (counts == size).all()  # no partial batch visible
    assert df["trial_id"].is_unique
    visible = [p for p in directory.iterdir() if not p.name.startswith(".")]
    assert len(visible) == len(counts)
    for path in visible:  # every visible file is complete on its own
        assert path.name.startswith("part-") and pq.read_table(path).num_rows == size
    assert len(pd.read_parquet(tmp_path / "evaluations", columns=["trial_id"])) == len(df)


def test_concurrent_appends_from_several_processes_do_not_clash(tmp_path):
    writers = [start_writer(tmp_path, f"p{k}", batches=15, size=10) for k in range(2)]
    for writer in writers:
        writer.communicate(timeout=120)
        assert writer.returncode == 0
    df = load(tmp_path)
    assert len(df) == 2 * 15 * 10 and df["trial_id"].is_unique
    assert df["experiment"].unique().tolist() == ["exp"]
    directory = tmp_path / "evaluations" / "experiment=exp"
    assert len(list(directory.iterdir())) == 30  # no temp files left behind


def test_files_sort_in_writing_order(tmp_path):
    store = ResultStore(tmp_path, "exp")
    paths = [store.append_evaluations([eval_row(f"t{i}")]) for i in range(5)]
    assert sorted(paths) == paths
    assert store.evaluations()["trial_id"].tolist() == [f"t{i}" for i in range(5)]
    assert datetime.now(UTC) - store.evaluations()["timestamp"].min() < timedelta(minutes=5)
