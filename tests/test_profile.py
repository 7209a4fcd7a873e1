"""Latency profiling: hardware discovery, timing, the lookup-table predictor, and profiler
actors on a real two-node local Ray cluster whose nodes stand in for two hardware types."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time

import numpy as np
import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from transformers import BertConfig, BertForSequenceClassification

from nas_prune import data, results, train
from nas_prune import profile as prof
from nas_prune.checkpoint import load_checkpoint
from nas_prune.options import FinetuneOptions, ProfileOptions
from nas_prune.profile import (
    Hardware,
    LatencyTable,
    ProfileError,
    Profiler,
    build_table,
    default_grid,
    discover_hardware,
    measure_tables,
    profile_configs,
    relative_errors,
    resolve_hardware,
    time_callable,
)
from nas_prune.supernet import SubNetwork
from tests.test_train import _synthetic_csv, save_tiny_bert

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SMALLEST = {"num_layers": 0, "num_heads": 1, "num_units": 1}
MIDDLE = {"num_layers": 1, "num_heads": 2, "num_units": 24}
FULL = {"num_layers": 2, "num_heads": 4, "num_units": 48}
CONFIGS = [SMALLEST, MIDDLE, FULL]
SETTINGS = ProfileOptions(repeats=5, warmup=1, seq_len=16)
TYPES = {"typeA", "typeB", "cpu"}


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """A fine-tuned tiny BERT (hidden 32, 2 layers, 4 heads, FFN 48): a valid supernet input."""
    base = save_tiny_bert(tmp_path_factory.mktemp("tiny_base"), tokenizer)
    csv = _synthetic_csv(tmp_path_factory.mktemp("data") / "toy.csv")
    task = data.tokenize(data.load_task(csv), tokenizer, max_length=32)
    out = tmp_path_factory.mktemp("teacher")
    train.finetune(str(base), task, out, FinetuneOptions(max_steps=2, batch_size=16))
    return str(out)


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes in this machine: the head labelled `hardware:typeA`, a worker labelled
    `hardware:typeB`. Ray's temp dir (and its `ray_current_cluster` address file) lives in a
    private directory, so no other Ray user on the machine connects to it or loses its own."""
    tmp = tempfile.mkdtemp(prefix="npp", dir="/tmp")  # short: Unix socket paths are limited
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    c = Cluster()
    try:
        head = c.add_node(num_cpus=1, resources={"hardware:typeA": 1}, include_dashboard=False,
                          object_store_memory=80 * 2**20)
        worker = c.add_node(num_cpus=1, resources={"hardware:typeB": 1},
                            object_store_memory=80 * 2**20)
        ray.init(address=c.address, configure_logging=False)
        yield {"typeA": head.node_id, "typeB": worker.node_id}
    finally:
        ray.shutdown()
        c.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(tmp, ignore_errors=True)


def _recording_start_pool(pools: list):
    """`prof.start_pool` that appends (hardware type, each actor's describe()) to `pools`."""
    original = prof.start_pool

    def recording_start_pool(*args, **kwargs):
        pool = original(*args, **kwargs)
        pools.append((args[2].name, ray.get([a.describe.remote() for a in pool])))
        return pool

    return recording_start_pool


@pytest.fixture(scope="module")
def profiled(cluster, checkpoint, tmp_path_factory):
    """One profile_configs run on every hardware type, recording each pool's actors."""
    root = tmp_path_factory.mktemp("results")
    pools = []
    recording_start_pool = _recording_start_pool(pools)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prof, "start_pool", recording_start_pool)
        rows = profile_configs(checkpoint, "small", CONFIGS, settings=SETTINGS,
                               store=results.ResultStore(root, "exp"),
                               trial_ids=["t-small", "t-middle", "t-full"])
    return {"rows": rows, "root": root, "pools": pools, "start_pool": recording_start_pool}


# ------------------------------------------------------------------------------ discovery
@pytest.fixture()
def no_onnxruntime(monkeypatch):
    """Discovery as on a cluster without onnxruntime (no `cpu-onnxruntime` type)."""
    monkeypatch.setattr(prof, "onnxruntime_available", lambda: False)


def test_discover_hardware_from_resources(no_onnxruntime):
    found = discover_hardware({"CPU": 8, "GPU": 2, "accelerator_type:A10G": 1, "memory": 1e9,
                               "hardware:c7i": 3, "node:10.0.0.1": 1})
    assert set(found) == {"A10G", "c7i", "cpu"}
    assert found["A10G"] == Hardware("A10G", gpu=True, count=1)
    assert found["c7i"] == Hardware("c7i", gpu=False, count=3)
    assert found["cpu"] == Hardware("cpu", gpu=False, count=8)
    assert found["A10G"].actor_options() == {"num_gpus": 1, "accelerator_type": "A10G"}
    assert found["c7i"].actor_options() == {"num_cpus": 1, "resources": {"hardware:c7i": 1}}
    assert found["cpu"].actor_options() == {"num_cpus": 1}


def test_discover_hardware_gpu_count_and_no_cpu():
    found = discover_hardware({"CPU": 0, "GPU": 4, "accelerator_type:L4": 2,
                               "accelerator_type:A100": 1})
    assert set(found) == {"L4", "A100"}  # no schedulable CPU: no cpu type
    assert found["L4"].gpu and found["L4"].count == 2
    assert found["A100"].actor_options()["accelerator_type"] == "A100"
    assert discover_hardware({}) == {}


def test_discover_hardware_lists_onnxruntime_beside_cpus(monkeypatch):
    monkeypatch.setattr(prof, "onnxruntime_available", lambda: True)
    found = discover_hardware({"CPU": 4, "hardware:c7i": 1})
    assert found[prof.ONNX_CPU] == Hardware(prof.ONNX_CPU, gpu=False, count=4)
    assert found[prof.ONNX_CPU].actor_options() == {"num_cpus": 1}
    assert prof.ONNX_CPU not in discover_hardware({"CPU": 0, "hardware:c7i": 1})
    # measured only when named: the default "every type" leaves the opt-in runtime out
    assert [h.name for h in resolve_hardware(None, found)] == ["c7i", "cpu"]
    assert [h.name for h in resolve_hardware([prof.ONNX_CPU], found)] == [prof.ONNX_CPU]


def test_resolve_hardware_names_present_types_when_missing(no_onnxruntime):
    present = discover_hardware({"CPU": 2, "hardware:typeA": 1, "hardware:typeB": 1})
    assert [h.name for h in resolve_hardware(None, present)] == list(present)
    assert [h.name for h in resolve_hardware(["typeB", "cpu"], present)] == ["typeB", "cpu"]
    with pytest.raises(ProfileError, match=r"\['A100'\] not in the Ray cluster.*"
                                           r"\['cpu', 'typeA', 'typeB'\]"):
        resolve_hardware(["typeA", "A100"], present)


# ------------------------------------------------------------------------------ settings, timing
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"seq_len": 0}, "seq_len must be >= 1"),
        ({"repeats": 0}, "repeats must be >= 1"),
        ({"rounds": 0}, "rounds must be >= 1"),
        ({"threads": 0}, "threads must be >= 1"),
        ({"warmup": -1}, "warmup must be >= 0"),
        ({"dtype": "int8"}, "dtype must be auto, fp32, bf16 or fp16"),
    ],
)
def test_profile_settings_validation(kwargs, message):
    with pytest.raises(ProfileError, match=message):
        ProfileOptions(**kwargs)


def test_profile_settings_accept_zero_warmup():
    assert ProfileOptions(warmup=0, dtype="fp16").warmup == 0


def test_time_callable_on_cpu():
    calls = []

    def work():
        calls.append(1)
        sum(i * i for i in range(2000))

    timing = time_callable(work, torch.device("cpu"), warmup=2, repeats=7)
    assert len(calls) == 9
    assert timing.repeats == 7
    assert 0 < timing.median_ms <= timing.p90_ms
    assert timing.mean_ms > 0 and timing.std_ms >= 0


def test_cpu_profiler_refuses_half_precision(checkpoint):
    if torch.cuda.is_available():
        pytest.skip("only CPUs refuse bf16")
    threads = torch.get_num_threads()
    try:
        with pytest.raises(ProfileError, match="profile CPUs in fp32"):
            Profiler(checkpoint, "small", "cpu", ProfileOptions(dtype="bf16"))
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ predictor
def _table() -> LatencyTable:
    return LatencyTable(hardware="cpu", batch_size=1, seq_len=16, dtype="fp32", hidden=[32],
                        heads=[0, 2, 4], queries=[1], units=[0, 24, 48], fixed_ms=[0.5],
                        attention_ms=[[[0.0], [2.0], [3.0]]], ffn_ms=[[0.0, 1.0, 4.0]])


def test_latency_table_predicts_by_interpolation():
    table = _table()
    # layer 0: 4 heads (3.0) + 48 units (4.0); layer 1: 1 head (interp 1.0) + 12 units (0.5);
    # layer 2: FFN only, 36 units (interp 2.5); layer 3: dropped
    sub = SubNetwork(heads=(4, 1, 0, 0), units=(48, 12, 36, 0))
    assert table.predict(sub) == pytest.approx(0.5 + 7.0 + 1.5 + 2.5)
    assert table.predict(SubNetwork((0, 0), (0, 0))) == pytest.approx(0.5)
    # kept heads given as indices count like the same number of first heads
    assert table.predict(SubNetwork(((0, 3),), ((1, 2, 3),))) == pytest.approx(
        table.predict(SubNetwork((2,), (3,))))
    assert table.to_dict()["attention_ms"] == [[[0.0], [2.0], [3.0]]]
    # one timed width: the hidden width is not looked at
    assert table.predict(SubNetwork((4,), (48,), hidden=8)) == table.predict(
        SubNetwork((4,), (48,)))
    with pytest.raises(ProfileError, match="phase must be one of"):
        table.predict(sub, phase="generate")


def _entry(block: str, ms: float, heads: int = 0, units: int = 0, hidden: int = 32) -> dict:
    return {"hidden": hidden, "block": block, "heads": heads, "queries": 1 if heads else 0,
            "units": units, "prefill_ms": ms}


def test_build_table_sorts_raw_lookup():
    raw = {"hardware": "typeA", "batch_size": 2, "seq_len": 8, "dtype": "fp32",
           "device_name": "x",
           "entries": [_entry("attention", 3.0, heads=4), _entry("fixed", 1.0),
                       _entry("ffn", 4.0, units=48), _entry("attention", 2.0, heads=2),
                       _entry("ffn", 1.0, units=24)]}
    table = build_table(raw)
    assert table.heads == [0, 2, 4] and table.attention_ms == [[[0.0], [2.0], [3.0]]]
    assert table.units == [0, 24, 48] and table.ffn_ms == [[0.0, 1.0, 4.0]]
    assert (table.hardware, table.batch_size, table.seq_len, table.dtype) == ("typeA", 2, 8,
                                                                              "fp32")
    assert table.hidden == [32] and table.queries == [1] and table.new_tokens == 0
    assert table.predict(SubNetwork((2,), (24,))) == pytest.approx(1.0 + 2.0 + 1.0)
    holey = [*raw["entries"], {**_entry("attention", 3.5, heads=4), "queries": 2}]
    with pytest.raises(ProfileError, match="lacks the attention entry heads=2, queries=2, units=0 "
                                           "at hidden width 32"):
        build_table({**raw, "entries": holey})


def test_relative_errors_by_hand():
    errors = relative_errors([1.5, 1.8, 3.0], [1.0, 2.0, 3.0])
    assert errors == {"median": pytest.approx(0.1), "max": pytest.approx(0.5), "n": 3}


def test_default_grid():
    assert default_grid(4, 4) == [0, 1, 2, 3, 4]
    grid = default_grid(48)
    assert grid[0] == 0 and grid[-1] == 48 and grid == sorted(set(grid))
    assert len(grid) == 8


# ------------------------------------------------------------------------------ latency vs size
def test_latency_falls_with_size(tmp_path):
    """Timed in this process on a model large enough that compute, not overhead, dominates:
    the 0-layer network is far faster than half the network, which is faster than all of it."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=4,
                        num_attention_heads=4, intermediate_size=512, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    settings = ProfileOptions(batch_size=8, seq_len=64, warmup=2, repeats=15)
    threads = torch.get_num_threads()
    try:
        profiler = Profiler(str(tmp_path), "small", "cpu", settings)
        smallest = profiler.measure({"num_layers": 0, "num_heads": 1, "num_units": 1})
        half = profiler.measure({"num_layers": 2, "num_heads": 2, "num_units": 256})
        largest = profiler.measure({"num_layers": 4, "num_heads": 4, "num_units": 512})
    finally:
        torch.set_num_threads(threads)
    assert smallest["params"] < half["params"] < largest["params"]
    assert smallest["median_ms"] < 0.5 * half["median_ms"]
    assert half["median_ms"] < largest["median_ms"]
    assert smallest["median_ms"] < 0.25 * largest["median_ms"]
    assert largest["repeats"] == 15 and largest["dtype"] == "fp32"
    assert (largest["batch_size"], largest["seq_len"]) == (8, 64)


# ------------------------------------------------------------------------------ real Ray cluster
def test_cluster_has_both_hardware_types(cluster):
    found = discover_hardware()
    assert set(found) == TYPES | ({prof.ONNX_CPU} if prof.onnxruntime_available() else set())
    assert found["cpu"].count == 2


def test_each_type_measured_on_its_own_node(profiled, cluster):
    placed = dict(profiled["pools"])
    assert set(placed) == TYPES
    for name in ("typeA", "typeB"):
        (actor,) = placed[name]
        assert actor["hardware"] == name
        assert actor["node_id"] == cluster[name]
        assert actor["pid"] != os.getpid()
    assert placed["cpu"][0]["node_id"] in cluster.values()


def test_rows_for_every_type_and_config(profiled):
    rows = profiled["rows"]
    assert len(rows) == len(TYPES) * len(CONFIGS)
    by_type = {}
    for row in rows:
        by_type.setdefault(row["hardware"], []).append(row)
    assert set(by_type) == TYPES
    for hw, hw_rows in by_type.items():
        assert [r["config"] for r in hw_rows] == CONFIGS, hw
        assert [r["trial_id"] for r in hw_rows] == ["t-small", "t-middle", "t-full"]
        for r in hw_rows:
            assert r["device_name"] == prof._cpu_name() and r["device_name"]
            assert r["cached"] is False and r["predicted"] is False
            assert r["dtype"] == "fp32" and (r["batch_size"], r["seq_len"]) == (1, 16)
            assert r["repeats"] == SETTINGS.repeats and r["rounds"] == SETTINGS.rounds
            assert 0 < r["median_ms"] <= r["p90_ms"]
            assert r["config_hash"] == results.config_hash(r["config"])
        params = [r["params"] for r in hw_rows]
        assert params == sorted(params) and params[0] < params[-1]


def test_latency_table_in_results_store(profiled):
    table = results.load(profiled["root"], table="latency")
    assert len(table) == len(TYPES) * len(CONFIGS)
    for column in ("hardware", "device_name", "batch_size", "seq_len", "dtype", "median_ms",
                   "p90_ms", "repeats", "config", "config_hash", "params", "trial_id"):
        assert column in table.columns, column
    assert set(table["hardware"]) == TYPES
    assert set(table["experiment"]) == {"exp"}
    assert (table["batch_size"] == 1).all() and (table["seq_len"] == 16).all()
    assert (table["dtype"] == "fp32").all() and (table["repeats"] == SETTINGS.repeats).all()
    assert (table["rounds"] == SETTINGS.rounds).all()
    assert (table["median_ms"] > 0).all() and (table["p90_ms"] >= table["median_ms"]).all()
    assert not table["predicted"].any()
    for hw in TYPES:
        configs = [json.loads(c) for c in table.loc[table["hardware"] == hw, "config"]]
        assert sorted(configs, key=json.dumps) == sorted(CONFIGS, key=json.dumps)


def test_second_call_is_served_from_the_store(profiled, checkpoint):
    root = profiled["root"]
    before = len(results.load(root, table="latency"))
    starts = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prof, "start_pool", lambda *a, **k: starts.append(a) or [])
        store = results.ResultStore(root, "exp")  # a new store: the cache is read from disk
        rows = profile_configs(checkpoint, "small", CONFIGS, settings=SETTINGS, store=store)
        only_b = profile_configs(checkpoint, "small", [FULL],
                                 settings=dataclasses.replace(SETTINGS, hardware=["typeB"]),
                                 store=store)
    assert starts == []  # no actor started: nothing measured
    assert len(rows) == len(TYPES) * len(CONFIGS)
    assert all(r["cached"] is True for r in rows)
    first = {(r["hardware"], r["config_hash"]): r["median_ms"] for r in profiled["rows"]}
    assert {(r["hardware"], r["config_hash"]): r["median_ms"] for r in rows} == first
    assert [(r["hardware"], r["config"]) for r in only_b] == [("typeB", FULL)]
    assert [r["config"] for r in rows if r["hardware"] == "cpu"] == CONFIGS  # dicts, as measured
    assert len(results.load(root, table="latency")) == before


def test_other_settings_are_measured_again(profiled, checkpoint):
    """The cache is per setting: another sequence length is a new measurement."""
    root = profiled["root"]
    before = len(results.load(root, table="latency"))
    other = ProfileOptions(hardware=["typeA"], repeats=2, warmup=0, seq_len=8)
    rows = profile_configs(checkpoint, "small", [SMALLEST], settings=other,
                           store=results.ResultStore(root, "exp"))
    assert [(r["hardware"], r["cached"], r["seq_len"]) for r in rows] == [("typeA", False, 8)]
    assert len(results.load(root, table="latency")) == before + 1


def test_missing_hardware_fails_fast(cluster, checkpoint, tmp_path):
    start = time.monotonic()
    with pytest.raises(ProfileError, match=r"\['A100'\].*present: \['cpu', .*'typeA', 'typeB'\]"):
        profile_configs(checkpoint, "small", CONFIGS,
                        settings=dataclasses.replace(SETTINGS, hardware=["A100"]),
                        store=results.ResultStore(tmp_path, "exp"))
    assert time.monotonic() - start < 5
    assert results.load(tmp_path, table="latency").empty


def test_onnxruntime_rows_beside_pytorch_rows(cluster, checkpoint):
    """`cpu-onnxruntime`: each sub-network exported to ONNX, checked and timed by onnxruntime."""
    pytest.importorskip("onnxruntime")
    settings = dataclasses.replace(SETTINGS, hardware=["cpu", prof.ONNX_CPU])
    rows = profile_configs(checkpoint, "small", CONFIGS, settings=settings)
    by_type = {}
    for row in rows:
        by_type.setdefault(row["hardware"], []).append(row)
    assert set(by_type) == {"cpu", prof.ONNX_CPU}
    for hw_rows in by_type.values():
        assert [r["config"] for r in hw_rows] == CONFIGS
        for r in hw_rows:
            assert r["dtype"] == "fp32" and r["median_ms"] > 0 and r["cached"] is False
            assert r["repeats"] == SETTINGS.repeats
    assert ([r["params"] for r in by_type["cpu"]]
            == [r["params"] for r in by_type[prof.ONNX_CPU]])


def test_saved_models_are_timed_by_the_actors_of_every_type(cluster, checkpoint, tmp_path,
                                                            tokenizer, monkeypatch):
    """Baselines' models, exports and the teacher are timed where and as NAS sub-networks
    are: by a profiler actor pinned to each hardware type, with the same settings (what makes
    the comparison's latency axis comparable); onnxruntime where asked."""
    pytest.importorskip("onnxruntime")
    stock = save_tiny_bert(tmp_path / "stock", tokenizer, seed=1)  # a plain HF directory
    placed = []
    monkeypatch.setattr(prof, "start_pool", _recording_start_pool(placed))
    settings = dataclasses.replace(SETTINGS, hardware=["typeA", "typeB", prof.ONNX_CPU])
    timed = prof.profile_saved([checkpoint, stock, checkpoint], settings)
    assert list(timed) == [checkpoint, stock]  # each directory once
    for model_dir, by_type in timed.items():
        assert list(by_type) == ["typeA", "typeB", prof.ONNX_CPU]
        for hw, row in by_type.items():
            assert row["hardware"] == hw and row["model_dir"] == model_dir
            assert row["dtype"] == "fp32" and (row["batch_size"], row["seq_len"]) == (1, 16)
            assert row["repeats"] == SETTINGS.repeats and 0 < row["median_ms"] <= row["p90_ms"]
            # the lowest median of the interleaved rounds
            assert row["rounds"] == SETTINGS.rounds == len(row["round_ms"]) > 1
            assert row["median_ms"] == min(row["round_ms"])
    for name, (actor,) in placed:
        assert actor["hardware"] == name and actor["pid"] != os.getpid()
        if name in cluster:
            assert actor["node_id"] == cluster[name]


def test_fastest_round_keeps_the_round_with_the_lowest_median():
    """A round spoilt by other processes' load (the second) is not the timing; a decoder's
    decode latency is its own lowest round, whichever round that was."""
    rounds = [{"median_ms": 5.0, "p90_ms": 6.0, "decode_ms": 2.0, "decode_p90_ms": 2.5},
              {"median_ms": 9.0, "p90_ms": 30.0, "decode_ms": 1.5, "decode_p90_ms": 1.6},
              {"median_ms": 4.0, "p90_ms": 4.5, "decode_ms": 3.0, "decode_p90_ms": 3.1}]
    kept = prof.fastest_round(rounds)
    assert (kept["median_ms"], kept["p90_ms"]) == (4.0, 4.5)
    assert (kept["decode_ms"], kept["decode_p90_ms"]) == (1.5, 1.6)
    assert kept["rounds"] == 3 and kept["round_ms"] == [5.0, 9.0, 4.0]
    encoder = prof.fastest_round([{"median_ms": 3.0}, {"median_ms": 2.0}])
    assert encoder == {"median_ms": 2.0, "rounds": 2, "round_ms": [3.0, 2.0]}


def test_measure_tables_predict_measured_latency(profiled, checkpoint):
    # more repeats than the measurements: each table entry is one median, the prediction a sum
    tables = measure_tables(checkpoint, "small",
                            settings=ProfileOptions(repeats=9, warmup=2, seq_len=16))
    assert set(tables) == TYPES
    model, _ = load_checkpoint(checkpoint)
    space_full = SubNetwork.uniform(2, 2, 4, 48)
    measured = {r["hardware"]: r["median_ms"] for r in profiled["rows"] if r["config"] == FULL}
    for hw, table in tables.items():
        assert table.hardware == hw and table.dtype == "fp32"
        assert (table.batch_size, table.seq_len) == (1, 16)
        assert table.heads == [0, 1, 2, 3, 4]
        assert table.units[0] == 0 and table.units[-1] == 48
        assert table.hidden == [32] and table.queries == [1] and table.new_tokens == 0
        attention, ffn = np.asarray(table.attention_ms)[0, :, 0], np.asarray(table.ffn_ms)[0]
        assert table.fixed_ms[0] > 0 and (attention[1:] > 0).all()
        assert attention[0] == 0.0 and ffn[0] == 0.0
        predicted = table.predict(space_full)
        assert table.predict(SubNetwork.uniform(2, 0, 1, 1)) == table.fixed_ms[0] < predicted
        ratio = predicted / measured[hw]
        assert 0.3 < ratio < 3, (hw, predicted, measured[hw])
    assert model.full_sub_network == space_full
    errors = relative_errors([tables[hw].predict(space_full) for hw in sorted(measured)],
                             [measured[hw] for hw in sorted(measured)])
    assert errors["n"] == 3 and np.isfinite(errors["max"])
