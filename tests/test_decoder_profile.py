"""The profile stage on a decoder supernet: prefill and per-token decode latency of extracted
sub-networks (Profiler, profile_configs and the results store's decode columns), and the
lookup-table predictor of both phases over the decoder spaces, with and without the hidden
dimension.

The table's bookkeeping is checked exactly against a stand-in timer (FLOPs of the timed call
plus a fixed overhead per call: additive over layers and affine in the hidden width, so a table
built right predicts every sub-network exactly); its accuracy on real timings (the thread clock,
which leaves other processes' load out) within the tolerances stated at each test."""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from nas_prune import profile as prof
from nas_prune import results
from nas_prune.checkpoint import load_checkpoint, save_checkpoint
from nas_prune.decoder import DecoderConfig, DecoderForCausalLM, DecoderSubNetwork
from nas_prune.options import ProfileOptions
from nas_prune.profile import (
    DECODE_TOKENS,
    LatencyTable,
    Profiler,
    build_table,
    default_grid,
    hidden_grid,
    measure_tables,
    profile_configs,
)
from tests.test_latency_predictor import OVERHEAD_MS, flops_timer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

LAYERS, KV, GROUP, HEAD_DIM, HIDDEN, UNITS = 3, 2, 2, 16, 64, 96
SMALLEST = {"num_layers": 0, "kv_heads": 1, "queries_per_kv": 1, "units": 1}
MIDDLE = {"num_layers": 2, "kv_heads": 1, "queries_per_kv": 2, "units": 48}
FULL = {"num_layers": LAYERS, "kv_heads": KV, "queries_per_kv": GROUP, "units": UNITS}
STAND_IN = ProfileOptions(batch_size=2, seq_len=8, warmup=0, repeats=1)
"""Settings for the stand-in timer (one run is the exact cost)."""
THREAD = ProfileOptions(batch_size=2, seq_len=32, warmup=2, repeats=7, clock="thread")
"""Settings for real timings: CPU time of the timing thread, one torch thread."""


def save_decoder_supernet(out, vocab: int = 128, hidden: int = HIDDEN, layers: int = LAYERS,
                          kv: int = KV, group: int = GROUP, head_dim: int = HEAD_DIM,
                          units: int = UNITS) -> str:
    """A random decoder supernet checkpoint (Llama shape) with a finished supernet's metadata;
    weights are O(0.2) noise (norm scales 1 +- 0.1)."""
    torch.manual_seed(0)
    config = DecoderConfig(family="llama", vocab_size=vocab, hidden_size=hidden,
                           num_hidden_layers=layers, num_attention_heads=kv * group,
                           num_key_value_heads=kv, head_dim=head_dim, intermediate_size=units,
                           max_position_embeddings=256, pad_token_id=0, bos_token_id=1)
    model = DecoderForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else
                    0.2 * torch.randn_like(p))
    save_checkpoint(out, model, None, {"kind": "supernet", "space": "decoder_small",
                                       "finished": True, "task_kind": "lm"})
    return str(out)


@pytest.fixture(scope="module")
def supernet(tmp_path_factory) -> str:
    """3 layers, 2 KV heads x 2 queries of 16 dims, hidden 64, MLP 96, vocabulary 128."""
    return save_decoder_supernet(tmp_path_factory.mktemp("decoder_supernet"))


@pytest.fixture(scope="module")
def wide_supernet(tmp_path_factory) -> str:
    """2 layers, hidden 256, vocabulary 8192: wide enough that the hidden width, not per-call
    overhead, sets the latency (the LM head alone is 2M weights read per decoded token)."""
    return save_decoder_supernet(tmp_path_factory.mktemp("wide_decoder"), vocab=8192,
                                 hidden=256, layers=2, head_dim=32, units=512)


@pytest.fixture()
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_checkpoint_loads_as_our_causal_lm(supernet):
    model, meta = load_checkpoint(supernet)
    assert isinstance(model, DecoderForCausalLM) and meta["space"] == "decoder_small"
    assert prof.is_decoder(model.config)


# ------------------------------------------------------------------------------ measuring
def test_measure_times_prefill_and_decode(supernet, keep_threads):
    profiler = Profiler(supernet, "decoder_small", "cpu", THREAD)
    assert profiler.decoder and profiler.generative
    rows = [profiler.measure(c) for c in (SMALLEST, MIDDLE, FULL)]
    for row in rows:
        assert 0 < row["median_ms"] <= row["p90_ms"] and 0 < row["decode_ms"] <= row[
            "decode_p90_ms"]
        assert row["new_tokens"] == DECODE_TOKENS and row["repeats"] == THREAD.repeats
        assert (row["batch_size"], row["seq_len"], row["dtype"]) == (2, 32, "fp32")
    assert [r["params"] for r in rows] == sorted(r["params"] for r in rows)
    assert rows[0]["median_ms"] < rows[2]["median_ms"]
    assert rows[0]["decode_ms"] < rows[2]["decode_ms"]


def test_decoder_on_onnxruntime_is_refused(supernet, keep_threads):
    with pytest.raises(prof.ProfileError, match="times encoders only"):
        Profiler(supernet, "decoder_small", prof.ONNX_CPU, STAND_IN)


# ------------------------------------------------------------------------------ the table, exactly
@pytest.mark.parametrize("space", ["decoder_small", "decoder_medium", "decoder_medium+hidden"])
def test_table_adds_up_to_measured_models(supernet, keep_threads, monkeypatch, space):
    """Both phases predicted exactly from the fixed part and per-layer blocks (per KV heads x
    queries per KV head, per MLP width); with +hidden from two widths only, the narrowest and
    the full one."""
    monkeypatch.setattr(prof, "time_callable", flops_timer)
    profiler = Profiler(supernet, space, "cpu", STAND_IN)
    widths = [8, HIDDEN] if space.endswith("+hidden") else None
    table = build_table(profiler.lookup_table(default_grid(KV, KV), default_grid(UNITS, 3),
                                              widths=widths))
    assert table.heads == [0, 1, 2] and table.queries == [1, 2]
    assert table.units == [0, 1, 48, 96] and table.new_tokens == DECODE_TOKENS
    assert table.hidden == (widths or [HIDDEN])
    assert table.fixed_ms[0] >= OVERHEAD_MS > table.decode_fixed_ms[0]  # once per call
    rng = np.random.default_rng(0)
    configs = [profiler.space.largest(), profiler.space.smallest(),
               *(profiler.space.sample(rng) for _ in range(6))]
    for config in configs:
        sub = profiler.space.to_sub_network(config)
        measured = profiler.measure(config)
        assert table.predict(sub) == pytest.approx(measured["median_ms"], rel=1e-9), config
        assert table.predict(sub, "decode") == pytest.approx(measured["decode_ms"],
                                                             rel=1e-9), config
    assert LatencyTable(**table.to_dict()) == table  # as a search worker rebuilds it


# ------------------------------------------------------------------------------ the table, timed
def _thread_table(profiler, widths=None):
    return build_table(profiler.lookup_table(default_grid(KV, KV), default_grid(UNITS, 4),
                                             widths=widths, rounds=2))


def _measured(profiler, config) -> tuple[float, float]:
    """(prefill, decode) ms of `config`: the lower of two measurements, each a median, so that
    a burst of load from other processes during one of them does not count."""
    rows = [profiler.measure(config) for _ in range(2)]
    return min(r["median_ms"] for r in rows), min(r["decode_ms"] for r in rows)


def _uniform(layers: int, kv: int, queries: int, units: int, hidden: int | None = None):
    return DecoderSubNetwork.uniform(LAYERS, layers, kv, queries, units, hidden)


def test_table_tracks_measured_decoder_latency(supernet, keep_threads):
    """Real thread-clock timings: each phase's prediction within a factor of 2 of the
    measurement for sub-networks across the space (a behaviour check that load on shared CI
    cores cannot break; the accuracy itself is benchmarks/bench_latency.py's), and larger
    sub-networks (nested: each keeps everything the one before keeps) predicted slower."""
    profiler = Profiler(supernet, "decoder_small", "cpu", THREAD)
    table = _thread_table(profiler)
    configs = [SMALLEST, MIDDLE, FULL, {**MIDDLE, "num_layers": 1, "units": 20},
               {**FULL, "kv_heads": 1, "units": 70}]
    ratios = []
    for config in configs:
        sub = profiler.space.to_sub_network(config)
        prefill, decode = _measured(profiler, config)
        ratios.append((table.predict(sub) / prefill, table.predict(sub, "decode") / decode))
    assert all(0.5 < r < 2 for pair in ratios for r in pair), ratios
    nested = [_uniform(0, 1, 1, 1), _uniform(1, 1, 1, 24), _uniform(2, 1, 2, 48),
              _uniform(3, 2, 2, 96)]
    for phase in prof.PHASES:
        predicted = [table.predict(sub, phase) for sub in nested]
        assert predicted == sorted(predicted) and predicted[0] < predicted[-1], phase


def test_hidden_table_falls_with_width_and_tracks_measured(wide_supernet, keep_threads):
    """decoder_small+hidden on the width grid `measure_tables` uses (`hidden_grid`): the
    prediction of the full-depth sub-network falls with the hidden width in both phases, and
    at every width, on the grid or between its points, the prefill prediction is within a
    factor of 2 of the measurement (an interpolation that ignored the width would be off by
    far more; the accuracy itself is benchmarks/bench_latency.py's)."""
    settings = ProfileOptions(batch_size=8, seq_len=32, warmup=2, repeats=9, clock="thread")
    profiler = Profiler(wide_supernet, "decoder_small+hidden", "cpu", settings)
    widths = hidden_grid(8, 256, 8)
    assert widths == [8, 88, 176, 256]
    table = build_table(profiler.lookup_table(default_grid(KV, KV), default_grid(512, 3),
                                              widths=widths, rounds=2))
    rows = []
    for hidden in (8, 48, 128, 208, 256):
        config = {"num_layers": 2, "kv_heads": KV, "queries_per_kv": GROUP, "units": 512,
                  "hidden": hidden}
        sub = profiler.space.to_sub_network(config)
        prefill, decode = _measured(profiler, config)
        rows.append((hidden, table.predict(sub), prefill, table.predict(sub, "decode"), decode))
    prefill, decode = [r[1] for r in rows], [r[3] for r in rows]
    assert prefill[0] < prefill[2] < prefill[4] and prefill[0] < 0.5 * prefill[4], rows
    assert decode[0] < decode[2] < decode[4] and decode[0] < 0.8 * decode[4], rows
    for hidden, p, m, _, _ in rows:
        assert 0.5 < p / m < 2, (hidden, p, m)
    # One decode step of this model is 0.5-2 ms, much of it per-op overhead; at batch 2 single
    # measurements of it moved by up to 2.8x on shared CI cores (0.8 ms predicted vs 2.2 ms
    # measured at a grid point), so decode is held to its scale, the median ratio over the
    # widths, and batch 8 makes its fall with the width (checked above) stand above the noise.
    assert 1 / 3 < statistics.median(r[3] / r[4] for r in rows) < 3, rows


# ------------------------------------------------------------------------------ Ray and the store
@pytest.fixture(scope="module")
def local_ray():
    """A private one-node Ray (its temp dir of its own, so no other Ray user is touched)."""
    tmp = tempfile.mkdtemp(prefix="npd", dir="/tmp")
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    try:
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
                 object_store_memory=80 * 2**20, _temp_dir=tmp)
        yield
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(tmp, ignore_errors=True)


def test_profile_configs_store_decode_columns(local_ray, supernet, tmp_path):
    settings = ProfileOptions(hardware=["cpu"], batch_size=1, seq_len=16, warmup=1, repeats=3)
    store = results.ResultStore(tmp_path, "dec")
    rows = profile_configs(supernet, "decoder_small", [SMALLEST, FULL], settings, store)
    assert [(r["config"], r["cached"]) for r in rows] == [(SMALLEST, False), (FULL, False)]
    assert all(r["decode_ms"] > 0 and r["new_tokens"] == DECODE_TOKENS for r in rows)
    table = results.load(tmp_path, table="latency")
    assert len(table) == 2 and (table["new_tokens"] == DECODE_TOKENS).all()
    assert (table["decode_ms"] > 0).all() and (table["decode_p90_ms"] >= table["decode_ms"]).all()
    again = profile_configs(supernet, "decoder_small", [FULL], settings,
                            results.ResultStore(tmp_path, "dec"))
    assert again[0]["cached"] is True and again[0]["decode_ms"] == rows[1]["decode_ms"]


def test_measure_tables_for_a_hidden_decoder_space(local_ray, supernet):
    settings = ProfileOptions(batch_size=1, seq_len=8, warmup=0, repeats=2)
    (table,) = measure_tables(supernet, "decoder_small+hidden", ["cpu"], settings).values()
    assert table.hidden == [8, 24, 48, 64] and table.heads == [0, 1, 2]
    assert table.queries == [1, 2] and table.units == default_grid(UNITS)
    assert table.new_tokens == DECODE_TOKENS and len(table.decode_fixed_ms) == 4
    full = _uniform(LAYERS, KV, GROUP, UNITS)
    # two untimed-warm-up repeats on a tiny model under load can time the blocks at zero: the
    # order of predictions is the thread-clock tests' claim; here, the table covers the space
    assert table.predict(full, "decode") >= table.predict(_uniform(0, 1, 1, 1), "decode") > 0


def test_latency_files_without_decode_columns_still_load(tmp_path):
    """A latency file written before the decode (and rounds) columns existed reads back with
    them null."""
    store = results.ResultStore(tmp_path, "new")
    row = {"hardware": "cpu", "device_name": "x", "config": {"num_layers": 1},
           "batch_size": 1, "seq_len": 8, "dtype": "fp32", "median_ms": 1.0, "p90_ms": 1.0,
           "mean_ms": 1.0, "std_ms": 0.0, "repeats": 3, "predicted": False, "params": 10}
    store.append_latency([{**row, "decode_ms": 0.5, "decode_p90_ms": 0.6, "new_tokens": 16}])
    old_columns = [f for f in results.LATENCY_SCHEMA
                   if f.name not in ("experiment", "decode_ms", "decode_p90_ms", "new_tokens",
                                     "rounds")]
    old = pa.Table.from_pylist(
        [{**row, "config": '{"num_layers":1}', "config_hash": results.config_hash(row["config"]),
          "timestamp": datetime(2024, 1, 1, tzinfo=UTC), "method": None, "trial_id": None}],
        schema=pa.schema(old_columns))
    directory = tmp_path / "latency" / "experiment=old"
    directory.mkdir(parents=True)
    pq.write_table(old, directory / "part-0.parquet")
    table = results.load(tmp_path, table="latency").set_index("experiment")
    assert table.loc["new", "decode_ms"] == 0.5 and table.loc["new", "new_tokens"] == 16
    assert np.isnan(table.loc["old", "decode_ms"]) and table.loc["old", "median_ms"] == 1.0
    assert pd.isna(table.loc["old", "rounds"])
    cached = results.ResultStore(tmp_path, "old").cached_latency(
        results.config_hash(row["config"]), "cpu", 1, 8, "fp32")
    assert cached["median_ms"] == 1.0
