"""benchmarks/bench_decoder.py end to end on a tiny random Llama (--tiny): every stage through
the pipeline, the comparison by test perplexity at both budgets for NAS, LLM-Pruner and layer
dropping, the decode-latency table, and a second run that resumes instead of retraining."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decoder.py"


def _bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_decoder", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look it up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def _shut_ray_down_after():
    """The runs below start a local Ray in this process; later test modules start their own."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def test_tiny_decoder_benchmark_runs_and_resumes(tmp_path, capsys, monkeypatch):
    bench = _bench(monkeypatch)
    out = tmp_path / "bench"
    argv = ["--tiny", "--out", str(out), "--trials", "4", "--steps", "4",
            "--baseline-steps", "1", "--test-blocks", "12", "--valid-blocks", "8"]
    bench.main(argv)
    table = (out / "bench_decoder.md").read_text()
    assert table in capsys.readouterr().out
    frame = pd.read_csv(out / "compare" / "comparison.csv")
    assert (frame["test_examples"] == 12).all() and frame["test_digest"].nunique() == 1
    picked = frame[frame["method"] != "dense"]
    assert set(zip(picked["budget"], picked["method"], strict=True)) == {
        (b, m) for b in (0.5, 0.75) for m in ("nas", "llm_pruner", "layer_drop")}
    assert (picked["params_ratio"] <= picked["budget"]).all()
    assert picked.loc[picked["method"] != "nas", "p_value"].between(0, 1).all()
    for budget in ("0.75", "0.5"):
        assert f"| {budget} | nas |" in table and f"| {budget} | llm_pruner |" in table
    assert "ratio to dense" in table and "decode ms / token" in table
    info = json.loads((out / "bench_decoder.json").read_text())
    assert info["layer_keeps"] == {"0.75": [4, pytest.approx(info["layer_keeps"]["0.75"][1])],
                                   "0.5": [2, pytest.approx(info["layer_keeps"]["0.5"][1])]}
    assert [r["name"] for r in info["latency"]][0] == "dense"
    assert all(r["decode_ms"] > 0 for r in info["latency"])

    bench.main(argv)  # resumes: nothing is trained again, the same table
    again = json.loads((out / "bench_decoder.json").read_text())["stage_seconds"]
    assert again["supernet"] < 1 and again["baselines"] < 1
    assert pd.read_csv(out / "compare" / "comparison.csv")["test_perplexity"].tolist() == \
        pytest.approx(frame["test_perplexity"].tolist())


def test_teacher_steps_fine_tune_the_teacher_on_the_corpus(tmp_path, monkeypatch):
    """--teacher-steps N: the teacher every method starts from is the pre-trained model
    fine-tuned N steps on the corpus (teacher correction), not the pre-trained model as is."""
    import torch

    from nas_prune import pipeline
    from nas_prune.checkpoint import load_checkpoint
    from nas_prune.models import load_pretrained
    from nas_prune.rundir import RunDir

    bench = _bench(monkeypatch)
    args = bench.parse_args(["--tiny", "--out", str(tmp_path / "bench"), "--teacher-steps", "4"])
    model = bench.tiny_model(tmp_path / "tiny_model")
    teacher_dir = pipeline.finetune(RunDir(args.out), bench.options(args, model))
    teacher, meta = load_checkpoint(teacher_dir)
    assert meta["finished"] and meta["steps_done"] == 4
    before = load_pretrained(model, "lm").state_dict()
    changed = [k for k, v in teacher.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "the teacher's weights are the pre-trained ones: nothing was fine-tuned"

    adopted = bench.parse_args(["--tiny", "--out", str(tmp_path / "as_is")])
    _, meta = load_checkpoint(pipeline.finetune(RunDir(adopted.out),
                                                bench.options(adopted, model)))
    assert meta["steps_done"] == 0 and meta["strategy"] == "none"
