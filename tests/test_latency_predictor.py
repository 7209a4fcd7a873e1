"""The lookup-table latency predictor's structure (Kwon et al.): what `Profiler.lookup_table`
times adds up to what `Profiler.measure` times, and the CPU clocks of `time_callable`.

The table is checked against a stand-in timer whose "milliseconds" are the FLOPs of the timed
call plus a fixed overhead per call: that cost is exactly additive over layers and linear in
the head and neuron counts, so a table built the right way predicts every sub-network's
"latency" exactly. A table that times each block as its own call counts the per-call overhead
once per block (the bias issue 5 found) and fails."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForSequenceClassification

from nas_prune import profile as prof
from nas_prune.options import ProfileOptions
from nas_prune.profile import LatencyTable, ProfileError, Profiler, build_table, default_grid
from nas_prune.space import SmallSpace
from nas_prune.supernet import SubNetwork

OVERHEAD_MS = 7.0
"""The stand-in timer's cost of one timed call, whatever it runs."""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A BERT of 3 layers, 4 heads, FFN 64."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=3,
                        num_attention_heads=4, intermediate_size=64, num_labels=2)
    path = tmp_path_factory.mktemp("tiny")
    BertForSequenceClassification(config).save_pretrained(path)
    return str(path)


@pytest.fixture()
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def flops_timer(fn, device, warmup=3, repeats=10, clock="wall"):
    """`time_callable`'s stand-in: one run, costed as MFLOPs + OVERHEAD_MS."""
    with FlopCounterMode(display=False) as counter:
        fn()
    ms = counter.get_total_flops() / 1e6 + OVERHEAD_MS
    return prof.Timing(ms, ms, ms, 0.0, repeats)


def test_table_predicts_empty_and_full_as_its_entries():
    table = LatencyTable(hardware="cpu", batch_size=1, seq_len=8, dtype="fp32", hidden=[32],
                         heads=[0, 2, 4], queries=[1], units=[0, 32, 64], fixed_ms=[2.0],
                         attention_ms=[[[0.0], [1.0], [1.5]]], ffn_ms=[[0.0, 0.5, 1.25]])
    assert table.predict(SubNetwork((0, 0, 0), (0, 0, 0))) == table.fixed_ms[0]
    assert table.predict(SubNetwork.uniform(3, 3, 4, 64)) == pytest.approx(2.0 + 3 * (1.5 + 1.25))
    # a layer that keeps only its attention block costs only that block
    assert table.predict(SubNetwork((2, 0, 0), (0, 0, 0))) == pytest.approx(3.0)
    assert LatencyTable(**table.to_dict()) == table  # how search workers receive it
    with pytest.raises(ProfileError, match="no decode phase"):
        table.predict(SubNetwork((2, 0, 0), (0, 0, 0)), phase="decode")


def test_table_interpolates_between_hidden_widths():
    """Two widths: a sub-network's hidden width is interpolated linearly between them (and
    clamped outside); hidden None is the full (last) width."""
    table = LatencyTable(hardware="cpu", batch_size=1, seq_len=8, dtype="fp32", hidden=[8, 32],
                         heads=[0, 4], queries=[1], units=[0, 64], fixed_ms=[1.0, 2.0],
                         attention_ms=[[[0.0], [1.0]], [[0.0], [3.0]]],
                         ffn_ms=[[0.0, 2.0], [0.0, 6.0]])
    full = SubNetwork.uniform(1, 1, 4, 64)
    assert table.predict(full) == pytest.approx(2.0 + 3.0 + 6.0)
    assert table.predict(SubNetwork.uniform(1, 1, 4, 64, hidden=8)) == pytest.approx(4.0)
    assert table.predict(SubNetwork.uniform(1, 1, 4, 64, hidden=20)) == pytest.approx(7.5)
    assert table.predict(SubNetwork.uniform(1, 1, 2, 32, hidden=4)) == pytest.approx(2.5)


def test_lookup_table_adds_up_to_measured_models(tiny_model, keep_threads, monkeypatch):
    monkeypatch.setattr(prof, "time_callable", flops_timer)
    settings = ProfileOptions(batch_size=2, seq_len=8, warmup=0, repeats=1)
    profiler = Profiler(tiny_model, "small", "cpu", settings)
    table = build_table(profiler.lookup_table(default_grid(4, 4), default_grid(64, 3)))
    assert table.heads == [0, 1, 2, 3, 4] and table.units == [0, 1, 32, 64]
    assert table.hidden == [32] and table.queries == [1] and table.new_tokens == 0
    space = SmallSpace.for_model(profiler.model.config)
    empty = {"num_layers": 0, "num_heads": 1, "num_units": 1}
    # the fixed part is one call: its overhead is counted once, not once per block
    assert table.fixed_ms[0] == pytest.approx(profiler.measure(empty)["median_ms"])
    assert table.fixed_ms[0] >= OVERHEAD_MS
    configs = [space.largest(), {"num_layers": 1, "num_heads": 1, "num_units": 1},
               {"num_layers": 2, "num_heads": 3, "num_units": 48},  # between grid points
               *(space.sample(np.random.default_rng(seed)) for seed in range(5))]
    for config in configs:
        predicted = table.predict(space.to_sub_network(config))
        assert predicted == pytest.approx(profiler.measure(config)["median_ms"], rel=1e-9), config


def test_rounds_keep_each_entry_s_lowest_median(tiny_model, keep_threads, monkeypatch):
    """rounds=3: every model is timed in each of three sweeps and its lowest median kept, so
    a sweep slowed down by load from other processes does not show in the table."""
    monkeypatch.setattr(prof, "time_callable", flops_timer)
    profiler = Profiler(tiny_model, "small", "cpu",
                        ProfileOptions(batch_size=2, seq_len=8, warmup=0, repeats=1))
    grids = (default_grid(4, 2), default_grid(64, 2))
    timed, original = [], profiler._phase_ms

    def phase_ms(sub):
        timed.append(sub)
        return original(sub)

    monkeypatch.setattr(profiler, "_phase_ms", phase_ms)
    once = build_table(profiler.lookup_table(*grids))
    models, timed[:] = len(timed), []

    def second_sweep_slow(sub):
        times = phase_ms(sub)
        slow = models < len(timed) <= 2 * models
        return {p: 3 * t if slow else t for p, t in times.items()}

    monkeypatch.setattr(profiler, "_phase_ms", second_sweep_slow)
    assert build_table(profiler.lookup_table(*grids, rounds=3)) == once
    assert len(timed) == 3 * models
    with pytest.raises(ProfileError, match="rounds must be at least 1"):
        profiler.lookup_table(*grids, rounds=0)


def test_hidden_widths_add_up_to_measured_models(tiny_model, keep_threads, monkeypatch):
    """small+hidden: a table timed at the narrowest and the full width predicts every width in
    between, since the stand-in cost (FLOPs: every matrix product reading or writing the
    residual stream is linear in its width) is affine in the width."""
    monkeypatch.setattr(prof, "time_callable", flops_timer)
    settings = ProfileOptions(batch_size=2, seq_len=8, warmup=0, repeats=1)
    profiler = Profiler(tiny_model, "small+hidden", "cpu", settings)
    table = build_table(profiler.lookup_table(default_grid(4, 4), default_grid(64, 3),
                                              widths=[8, 32]))
    assert table.hidden == [8, 32] and len(table.fixed_ms) == 2
    space = profiler.space
    configs = [space.largest(), space.smallest(),
               {"num_layers": 2, "num_heads": 3, "num_units": 48, "hidden": 16},
               *(space.sample(np.random.default_rng(seed)) for seed in range(6))]
    for config in configs:
        predicted = table.predict(space.to_sub_network(config))
        assert predicted == pytest.approx(profiler.measure(config)["median_ms"], rel=1e-9), config
    narrower = [table.predict(space.to_sub_network({**space.largest(), "hidden": h}))
                for h in (8, 16, 24, 32)]
    assert narrower == sorted(narrower) and narrower[0] < narrower[-1]


def test_lookup_table_on_real_timings_is_close(tiny_model, keep_threads):
    """Real (thread-clock) timings: the full model's prediction is within 2x of its measurement
    (loose: the point is the units and the bookkeeping, not the noise of a shared machine)."""
    settings = ProfileOptions(batch_size=4, seq_len=32, warmup=2, repeats=7, clock="thread")
    profiler = Profiler(tiny_model, "small", "cpu", settings)
    table = build_table(profiler.lookup_table([0, 2, 4], [0, 32, 64]))
    assert table.fixed_ms[0] > 0
    assert (np.asarray(table.attention_ms) >= 0).all() and (np.asarray(table.ffn_ms) >= 0).all()
    full = profiler.model.full_sub_network
    measured = profiler.measure({"num_layers": 3, "num_heads": 4, "num_units": 64})["median_ms"]
    assert 0.5 < table.predict(full) / measured < 2


def test_hidden_table_falls_with_width_and_tracks_measured(tmp_path, keep_threads):
    """small+hidden on real (thread-clock) timings of a BERT wide enough for compute to set the
    latency (hidden 256), on `measure_tables`' width grid: the prediction of the full-depth
    sub-network falls with the hidden width, and at every width, on the grid or between its
    points, it is within a factor of 2 of the measurement (a behaviour check; the accuracy is
    benchmarks/bench_latency.py's). Table entries and measurements are each the
    lower of two medians, so that a burst of load from other processes during one of them does
    not count."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=512, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    settings = ProfileOptions(batch_size=4, seq_len=64, warmup=2, repeats=7, clock="thread")
    profiler = Profiler(str(tmp_path), "small+hidden", "cpu", settings)
    widths = prof.hidden_grid(8, 256, 8)
    table = build_table(profiler.lookup_table(default_grid(4, 4), default_grid(512, 3),
                                              widths=widths, rounds=2))
    assert table.hidden == widths == [8, 88, 176, 256]
    rows = []
    for hidden in (8, 48, 128, 208, 256):
        config = {"num_layers": 2, "num_heads": 4, "num_units": 512, "hidden": hidden}
        measured = min(profiler.measure(config)["median_ms"] for _ in range(2))
        rows.append((hidden, table.predict(profiler.space.to_sub_network(config)), measured))
    predicted = [p for _, p, _ in rows]
    assert predicted == sorted(predicted) and predicted[0] < 0.5 * predicted[-1], rows
    for hidden, p, m in rows:
        assert 0.5 < p / m < 2, (hidden, p, m)


def test_thread_clock_leaves_out_time_off_the_cpu():
    def nap():
        time.sleep(0.02)

    wall = prof.time_callable(nap, torch.device("cpu"), warmup=0, repeats=3)
    cpu = prof.time_callable(nap, torch.device("cpu"), warmup=0, repeats=3, clock="thread")
    assert wall.median_ms >= 20
    assert cpu.median_ms < 5


def test_thread_clock_needs_one_thread(tiny_model, keep_threads):
    with pytest.raises(ProfileError, match="clock thread times one thread"):
        ProfileOptions(threads=2, clock="thread")
    with pytest.raises(ProfileError, match="clock must be wall or thread"):
        ProfileOptions(clock="sundial")
