"""Nothing lost on bad input: one search per experiment (a lock two real processes contend for),
damaged Parquet parts named in one warning while every other row stays readable, and a write
whose file comes out corrupt never reaching the store."""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nas_prune import report
from nas_prune.results import ResultsError, ResultStore, load
from tests.test_results import eval_row

REPO_ROOT = Path(__file__).resolve().parents[1]

SEARCH = textwrap.dedent("""
    import sys
    from nas_prune.results import ResultsError, ResultStore
    from tests.test_results import eval_row

    root, trials = sys.argv[1], int(sys.argv[2])
    store = ResultStore(root, "exp")
    try:
        with store.lock():
            done = store.finished_trials()
            for i in range(trials):  # a search that resumes: evaluates what is not done yet
                if f"t{i}" not in done:
                    store.append_evaluations([eval_row(f"t{i}")])
            print("locked", flush=True)
            sys.stdin.readline()  # hold the experiment until told to go
    except ResultsError as exc:
        print(exc, file=sys.stderr, flush=True)
        sys.exit(3)
""")


def start_search(root: Path, trials: int) -> subprocess.Popen:
    """A process that holds experiment "exp" while it writes trials t0.. and until it reads a
    line (it prints "locked" when it has written them), or exits 3 if the lock is taken."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", SEARCH, str(root), str(trials)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def wait_locked(process: subprocess.Popen) -> None:
    line = process.stdout.readline()
    assert line == "locked\n", process.stderr.read()


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ---------------------------------------------------------------------------------- locking


def test_second_search_on_an_experiment_refuses_and_no_trial_is_written_twice(tmp_path):
    first = start_search(tmp_path, trials=4)
    try:
        wait_locked(first)
        second = start_search(tmp_path, trials=4)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 3
        assert f"experiment 'exp' in {tmp_path} is being written by another process " \
               f"(pid {first.pid}); wait for it or choose another experiment" in err
        first.communicate("go\n", timeout=120)
        assert first.returncode == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    again = start_search(tmp_path, trials=4)  # after the first: resumes, finds all done
    again.communicate("go\n", timeout=120)
    assert again.returncode == 0
    df = load(tmp_path)
    assert sorted(df["trial_id"]) == ["t0", "t1", "t2", "t3"]


def test_a_killed_holder_does_not_block_the_experiment(tmp_path):
    holder = start_search(tmp_path, trials=1)
    try:
        wait_locked(holder)
        with pytest.raises(ResultsError, match=rf"another process \(pid {holder.pid}\)"):
            with ResultStore(tmp_path, "exp").lock():
                pass
        with ResultStore(tmp_path, "other").lock():  # other experiments are free
            pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    store = ResultStore(tmp_path, "exp")
    with store.lock():
        store.append_evaluations([eval_row("t1")])
    assert sorted(load(tmp_path)["trial_id"]) == ["t0", "t1"]
    assert not (tmp_path / "evaluations" / ".locks").exists()  # the lock is not in the table
    assert len(pd.read_parquet(tmp_path / "evaluations")) == 2


def test_lock_is_released_on_exit_and_on_error_and_is_not_reentrant(tmp_path):
    store = ResultStore(tmp_path, "exp")
    with store.lock():
        with pytest.raises(ResultsError, match=rf"pid {os.getpid()}"):
            with ResultStore(tmp_path, "exp").lock():
                pass
    with pytest.raises(KeyError):
        with store.lock():
            raise KeyError("boom")
    with store.lock():
        pass


# ---------------------------------------------------------------------------- damaged parts


def _store_with_victim(root: Path) -> tuple[ResultStore, Path]:
    store = ResultStore(root, "exp")
    store.append_evaluations([eval_row(f"a{i}") for i in range(3)])
    victim = store.append_evaluations([eval_row(f"b{i}") for i in range(3)])
    store.append_evaluations([eval_row("c0")])
    return store, victim


def _damage(victim: Path, how: str) -> None:
    if how == "truncated":
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
    else:  # a user rewrote the error column as strings
        table = pq.read_table(victim)
        index = table.schema.get_field_index("error")
        strings = pa.array([str(v) for v in table["error"].to_pylist()])
        pq.write_table(table.set_column(index, "error", strings), victim)


@pytest.mark.parametrize("how", ["truncated", "wrong_type"])
def test_damaged_part_is_named_once_and_quarantining_it_as_told_works(tmp_path, caplog, how):
    store, victim = _store_with_victim(tmp_path)
    _damage(victim, how)

    with caplog.at_level(logging.WARNING, logger="nas_prune.results"):
        df = load(tmp_path)
    assert sorted(df["trial_id"]) == ["a0", "a1", "a2", "c0"]
    assert df["error"].dtype == "float64"
    assert df.attrs["skipped_files"] == [str(victim)]
    (warning,) = warnings_of(caplog)
    assert "\n" not in warning and str(victim) in warning
    assert "'error' is string" in warning if how == "wrong_type" else "unreadable" in warning

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nas_prune.results"):
        assert sorted(store.evaluations()["trial_id"]) == ["a0", "a1", "a2", "c0"]
        assert store.finished_trials() == {"a0", "a1", "a2", "c0"}
    assert len(warnings_of(caplog)) == 2 and all(str(victim) in w for w in warnings_of(caplog))

    source, target = shlex.split(re.search(r"mv (.+?);", warning).group(1))  # do as told
    assert Path(source) == victim and Path(target).name.startswith("_")
    os.rename(source, target)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nas_prune.results"):
        assert sorted(load(tmp_path)["trial_id"]) == ["a0", "a1", "a2", "c0"]
    assert warnings_of(caplog) == []
    plain = pd.read_parquet(tmp_path / "evaluations")
    assert sorted(plain["trial_id"]) == ["a0", "a1", "a2", "c0"]


def test_report_summary_names_the_skipped_part(tmp_path, caplog):
    _, victim = _store_with_victim(tmp_path / "results")
    _damage(victim, "truncated")
    df = load(tmp_path / "results")
    with caplog.at_level(logging.WARNING, logger="nas_prune.report"):
        out = report.write_report(df, tmp_path / "report")
    summary = (out / "summary.md").read_text()
    assert "1 damaged results file(s)" in summary and str(victim) in summary
    assert any(str(victim) in w for w in warnings_of(caplog))
    clean = report.write_report(df, tmp_path / "clean", skipped_files=[])
    assert "damaged" not in (clean / "summary.md").read_text()


def test_report_stage_summary_names_the_skipped_part(tmp_path):
    from nas_prune import pipeline
    from nas_prune.options import PipelineOptions
    from nas_prune.rundir import RunDir

    run = RunDir(tmp_path / "run")
    _, victim = _store_with_victim(run.results)
    _damage(victim, "wrong_type")
    summary = pipeline.report(run, PipelineOptions()).read_text()
    assert str(victim) in summary and "Move each to a name starting with `_`" in summary


# ----------------------------------------------------------------------- faulty disk writes


def _faulty_writer(fault: str, real=pq.write_table):
    """pq.write_table as a failing disk would do it: the bytes that land are not the table."""

    def write(table: pa.Table, where, **kwargs) -> None:
        if fault == "garbage":
            where.write(os.urandom(2048))
        elif fault == "truncated":
            sink = pa.BufferOutputStream()
            real(table, sink, **kwargs)
            data = sink.getvalue().to_pybytes()
            where.write(data[: len(data) - 100])
        elif fault == "rows_lost":
            real(table.slice(0, 1), where, **kwargs)
        else:  # "wrong_type": a column comes back as strings
            index = table.schema.get_field_index("error")
            strings = pa.array([str(v) for v in table["error"].to_pylist()])
            real(table.set_column(index, "error", strings), where, **kwargs)

    return write


@pytest.mark.parametrize("fault", ["garbage", "truncated", "rows_lost", "wrong_type"])
def test_a_write_that_comes_out_corrupt_never_appears_in_the_store(tmp_path, monkeypatch,
                                                                    caplog, fault):
    store = ResultStore(tmp_path, "exp")
    store.append_evaluations([eval_row("a0")])
    monkeypatch.setattr(pq, "write_table", _faulty_writer(fault))
    with pytest.raises(ResultsError, match="nothing was stored"):
        store.append_evaluations([eval_row("b0"), eval_row("b1")])
    monkeypatch.undo()

    directory = tmp_path / "evaluations" / "experiment=exp"
    assert len(os.listdir(directory)) == 1  # the earlier part; no temp file left behind
    with caplog.at_level(logging.WARNING, logger="nas_prune.results"):
        assert load(tmp_path)["trial_id"].tolist() == ["a0"]
    assert warnings_of(caplog) == []
    assert pd.read_parquet(tmp_path / "evaluations")["trial_id"].tolist() == ["a0"]
    store.append_evaluations([eval_row("b0")])  # a healthy disk writes again
    assert load(tmp_path)["trial_id"].tolist() == ["a0", "b0"]
