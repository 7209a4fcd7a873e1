"""Bad input stops early with one line and exit status 2, and nothing already computed is lost:
checks that run before any training, data loading or Ray start, through the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import BertConfig

from nas_prune import checkpoint, data, results
from nas_prune.errors import SearchError
from nas_prune.options import SearchOptions
from nas_prune.search.driver import run_search
from tests.test_search import ray_local, supernet  # noqa: F401  (module fixtures)
from tests.test_train import save_tiny_bert

REPO = Path(__file__).resolve().parents[1]


def _cli(args, cwd, timeout=180):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "nas_prune.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(done, message):
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    tokenizer = data.load_tokenizer(data.default_model_path())
    return Path(save_tiny_bert(tmp_path_factory.mktemp("tiny"), tokenizer))


def test_max_length_beyond_the_model_positions_is_refused(tiny_dir, tmp_path):
    limit = BertConfig.from_pretrained(tiny_dir).max_position_embeddings
    done = _cli(["finetune", "--out", "run", "--model", str(tiny_dir),
                 "--finetune.max_length", str(limit + 1)], tmp_path)
    _one_line_error(done, f"exceeds the {limit} positions")
    assert not (tmp_path / "run" / "teacher").exists()  # refused before any training


def test_truncated_weights_are_named_before_training(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    done = _cli(["finetune", "--out", "run", "--model", str(broken)], tmp_path)
    _one_line_error(done, "model.safetensors is truncated or damaged")
    checkpoint.check_model_files(tiny_dir)  # the intact copy passes


def test_out_with_a_finished_checkpoint_of_another_task_is_refused(supernet, tmp_path):  # noqa: F811
    root, task = supernet
    run = tmp_path / "run"
    shutil.copytree(root / "teacher", run / "teacher")  # finished, task "toy"
    before = (run / "teacher" / "nas_prune.json").read_text()
    done = _cli(["finetune", "--out", str(run), "--data.task", "rotten_tomatoes"], tmp_path)
    _one_line_error(done, "already holds a finished teacher for task 'toy'")
    assert (run / "teacher" / "nas_prune.json").read_text() == before  # nothing overwritten


@pytest.mark.parametrize("command", ["profile", "export"])
def test_profile_and_export_refuse_a_teacher_before_ray_starts(supernet, tmp_path, command):  # noqa: F811
    root, _ = supernet
    started = time.perf_counter()
    done = _cli([command, "--out", str(tmp_path), "--supernet", str(root / "teacher")],
                tmp_path)
    _one_line_error(done, "is a fine-tuned teacher, not a trained supernet")
    assert time.perf_counter() - started < 60  # no model load, no Ray start


def test_moasha_settings_no_trial_can_satisfy_fail_once(supernet, ray_local, tmp_path):  # noqa: F811
    root, task = supernet
    opts = SearchOptions(scheduler="moasha", max_t=50, batch_size=64, num_samples=4)
    with pytest.raises(SearchError, match="too few for max_t=50"):
        run_search(root / "supernet", task, tmp_path / "results", "exp", opts,
                   storage_path=tmp_path / "tune")
    assert results.load(tmp_path / "results").empty


def test_ctrl_c_says_to_rerun_and_the_rerun_resumes(supernet, tmp_path):  # noqa: F811
    root, task = supernet
    config = tmp_path / "search.yaml"
    trials = 40
    config.write_text(json.dumps({"data": {"task": task.task},
                                  "search": {"searcher": "local", "num_samples": trials,
                                             "batch_size": 16, "num_workers": 1}}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for attempt in range(3):
        out = tmp_path / f"attempt{attempt}"
        args = [sys.executable, "-m", "nas_prune.cli", "search", "--out", str(out),
                "--supernet", str(root / "supernet"), "--config", str(config)]
        # a test run started in the background by a non-interactive shell inherits SIGINT
        # ignored, and so would the search (Python keeps an ignored SIGINT): restore it
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        store = results.ResultStore(out / "results", "nas-local-fifo-seed0")
        deadline = time.time() + 240
        while time.time() < deadline and not store.finished_trials() and proc.poll() is None:
            time.sleep(0.1)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        # on a loaded machine Ray Tune can hand over all results in one burst, so the
        # search may finish before the interrupt arrives: then interrupt a fresh one
        if not (proc.returncode == 0 and f"trials {trials}/{trials} done" in err):
            break
    assert proc.returncode == 130, err[-3000:]
    assert "run the same command again to continue" in err
    assert "Tuner.restore" not in err
    kept = store.evaluations()
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    after = store.evaluations()
    assert after["trial_id"].nunique() >= trials
    assert set(kept["trial_id"]) <= set(after["trial_id"])  # nothing computed was lost
    assert after.groupby("trial_id").size().max() == 1


def test_search_reads_the_supernet_length_not_128(supernet, tmp_path):  # noqa: F811
    root, _ = supernet
    meta = checkpoint.read_meta(root / "supernet")
    assert meta["options"]["max_length"] == 32
    from nas_prune.search.driver import check_checkpoint

    _, space, max_length = check_checkpoint(root / "supernet", SearchOptions())
    assert (space, max_length) == ("small", 32)
