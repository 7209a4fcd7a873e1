"""The Ray job entry points in jobs/: documented submit lines, `--help`, and the whole pipeline
submitted with `ray job submit` to a real local Ray head (dashboard and job API included)."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification

from nas_prune import data, results
from nas_prune.cli import build_parser
from tests.test_train import _synthetic_csv

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted((REPO / "jobs").glob("*.py"))
STAGES = [p.stem for p in JOBS]
BIN = Path(sys.executable).parent
"""The virtual environment's bin: its `ray` starts the head, so jobs run with its python."""

ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "DS_ACCELERATOR": "cpu",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TORCH_EXTENSIONS_DIR": str(REPO / "build" / "torch_extensions"),
}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(ENV)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


# ------------------------------------------------------------------------------ entry points
def test_every_stage_has_a_job():
    assert set(STAGES) == {"run", "finetune", "supernet", "search", "profile", "report",
                           "refine", "compare",
                           "export", "baseline"}


@pytest.mark.parametrize("job", JOBS, ids=STAGES)
def test_job_docstring_has_a_working_submit_line(job):
    source = job.read_text()
    doc = ast.get_docstring(ast.parse(source))
    assert doc, f"{job.name} has no docstring"
    submit = f"ray job submit --working-dir . -- python jobs/{job.name}"
    lines = [line.strip() for line in doc.splitlines() if submit in line]
    assert lines, f"{job.name}'s docstring lacks `{submit}`"
    (line,) = lines
    assert line.startswith(submit + " ") or line == submit
    # the documented options are options of the stage the job runs
    assert f'main(["{job.stem}", *sys.argv[1:]])' in source
    argv = [job.stem, *shlex.split(line[len(submit):])]
    args = build_parser(argv).parse_args(argv)
    assert args.command == job.stem


@pytest.mark.parametrize("job", JOBS, ids=STAGES)
def test_job_help(job, tmp_path):
    """Run as a script from elsewhere, as `ray job submit` runs it in the uploaded copy."""
    proc = subprocess.run([sys.executable, str(job), "--help"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.match(rf"usage: nas-prune (\[options\] )?{job.stem}\b", proc.stdout), proc.stdout


# ------------------------------------------------------------------------------ Ray head
def _free_ports(n: int) -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries `marker`: the head and everything it started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in environ:
            pids.append(int(entry.name))
    return pids


def _wait_for(url: str, head: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def _stop(head: subprocess.Popen, marker: str) -> list[int]:
    """Stop the head we started (its process group, then anything else carrying our marker);
    return the pids still alive afterwards."""
    if head.poll() is None:
        try:
            os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its processes
        except ProcessLookupError:
            pass
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
    deadline = time.monotonic() + 30
    while (left := _marked_pids(marker)) and time.monotonic() < deadline:
        time.sleep(1)
    for pid in left:  # workers in their own process groups that outlived the raylet
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(1)
    return _marked_pids(marker)


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head with dashboard and job API on free ports, started from the venv's `ray` in
    its own session and a private temp dir (no `ray_current_cluster` file in /tmp/ray)."""
    temp = tempfile.mkdtemp(prefix="npj", dir="/tmp")  # short: Unix socket paths are limited
    marker = f"NAS_PRUNE_TEST_HEAD={uuid.uuid4().hex}"  # inherited by every Ray process
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env = _free_ports(7)
    command = [
        str(BIN / "ray"), "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}",
        "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--temp-dir={temp}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}", "--disable-usage-stats", "--block",
    ]
    key, value = marker.split("=")
    with open(Path(temp) / "ray_start.log", "w") as log:
        head = subprocess.Popen(command, env=_env(RAY_TMPDIR=temp, **{key: value}),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{dashboard}"
        try:
            _wait_for(f"{url}/api/version", head, timeout=180)
            _wait_for(f"{url}/api/jobs/", head, timeout=60)
            yield {"url": url, "temp": temp}
        finally:
            left = _stop(head, value)
    shutil.rmtree(temp, ignore_errors=True)
    assert left == [], f"Ray processes left running: {left}"


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_run_config(tmp_path_factory):
    tokenizer = data.load_tokenizer(data.default_model_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=48, num_labels=2)
    model_dir = tmp_path_factory.mktemp("tiny_bert")
    BertForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    root = tmp_path_factory.mktemp("job")
    options = {
        "model": str(model_dir),
        "data": {"task": _synthetic_csv(root / "toy.csv")},
        "finetune": {"max_steps": 3, "batch_size": 16},
        "supernet": {"max_steps": 3, "batch_size": 16, "strategy": "full"},
        "search": {"num_samples": 4, "searcher": "random", "batch_size": 16},
        "profile": {"repeats": 2, "seq_len": 16},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(options))
    return root, path


def test_pipeline_as_a_ray_job(ray_head, tiny_run_config):
    root, config = tiny_run_config
    out = root / "out"
    command = [str(BIN / "ray"), "job", "submit", "--address", ray_head["url"],
               "--working-dir", str(REPO), "--", "python", "jobs/run.py", "--out", str(out),
               "--config", str(config)]
    proc = subprocess.run(command, cwd=root, env=_env(), capture_output=True, text=True,
                          timeout=1500)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert re.search(r"Job '[^']+' succeeded", proc.stdout), tail

    frame = results.load(out / "results")
    nas = frame[frame["method"] == "nas"]
    assert nas["trial_id"].nunique() == 4, tail
    assert set(nas["status"]) <= {"ok", "stopped"}
    assert (nas["searcher"] == "random").all()
    assert ((nas["error"] >= 0) & (nas["error"] <= 1)).all()
    assert (frame["method"] == "dense").sum() == 1
    latency = results.load(out / "results", table="latency")
    assert not latency.empty and set(latency["hardware"]) == {"cpu"}
    assert (latency["seq_len"] == 16).all() and (latency["repeats"] == 2).all()

    assert (out / "report" / "pareto.png").stat().st_size > 0
    assert (out / "report" / "summary.md").exists()
    exported = sorted((out / "export").iterdir())
    assert exported and all((d / "config.json").exists() for d in exported)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluated"] == 4 and summary["pareto"] == len(exported)
    # every Pareto-optimal sub-network was refined, with its cost, and is what was exported
    refined = frame[frame["method"] == "nas+refine"]
    assert sorted(refined["trial_id"]) == sorted(d.name for d in exported)
    assert (refined["train_examples"] > 0).all() and (refined["train_time_s"] > 0).all()
    assert (out / "teacher" / "nas_prune.json").exists()
    assert (out / "supernet" / "nas_prune.json").exists()

    # the same command again continues from what is there: no stage is redone
    stamps = {p: p.stat().st_mtime_ns for p in (out / "teacher" / "nas_prune.json",
                                                out / "supernet" / "nas_prune.json")}
    again = subprocess.run(command, cwd=root, env=_env(), capture_output=True, text=True,
                           timeout=1500)
    tail = (again.stdout + again.stderr)[-6000:]
    assert again.returncode == 0, tail
    assert "teacher already fine-tuned" in again.stdout + again.stderr, tail
    assert "supernet already trained" in again.stdout + again.stderr, tail
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    rerun = results.load(out / "results")
    assert len(rerun) == len(frame) and set(rerun["trial_id"]) == set(frame["trial_id"])

    # `nas-prune search` with the same options (the same YAML) gives the same rows as `run`:
    # the same sub-networks with the same scores, and the same dense row
    alone = root / "alone"
    search = [str(BIN / "ray"), "job", "submit", "--address", ray_head["url"], "--working-dir",
              str(REPO), "--", "python", "jobs/search.py", "--out", str(alone), "--supernet",
              str(out / "supernet"), "--config", str(config)]
    proc = subprocess.run(search, cwd=root, env=_env(), capture_output=True, text=True,
                          timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0 and re.search(r"Job '[^']+' succeeded", proc.stdout), tail
    columns = ["method", "config", "error", "params", "params_ratio", "flops", "fidelity",
               "status"]

    def rows(frame):
        return frame[columns].sort_values(["method", "config"]).reset_index(drop=True)

    searched = frame[frame["experiment"] == "nas-random-fifo-seed0"]  # not the refine rows
    pd.testing.assert_frame_equal(rows(results.load(alone / "results")), rows(searched))
