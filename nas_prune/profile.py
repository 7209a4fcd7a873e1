"""Measure sub-network latency on every hardware type in the Ray cluster, and predict it.

Parameter count is a poor proxy for latency on a given GPU or CPU, so nas_prune measures it:

* `discover_hardware` finds the hardware types of the cluster from its resources: one per GPU
  `accelerator_type:<name>` (e.g. A10G, L4, A100), one per custom `hardware:<name>` label (how
  a cluster marks CPU node types, and how tests stand in for GPU types), and `cpu`.
* `LatencyProfiler` is a Ray actor pinned to one hardware type (``accelerator_type=`` for GPUs,
  the custom resource otherwise). It loads the supernet once, cuts each sub-network out as a
  physically smaller model, and times its forward pass: warm-up runs, device synchronisation
  (CUDA events on GPU), repeated timing, median / p90 / spread; bf16 on GPU if asked, fp32 on
  CPU with a pinned thread count.
* `LatencyTable` (Kwon et al. 2022) times one attention block with h heads and one FFN block
  with n neurons, plus the fixed part (embeddings, head), and predicts any config's latency as
  the fixed part plus the sum over kept layers.
* `profile_configs` runs a pool per hardware type, caches measurements in the results store
  (the same config on the same hardware is measured once per experiment) and returns rows.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from nas_prune.errors import ProfileError
from nas_prune.options import ProfileOptions

log = logging.getLogger(__name__)

CPU = "cpu"
CUSTOM_PREFIX = "hardware:"
ACCELERATOR_PREFIX = "accelerator_type:"


@dataclass(frozen=True)
class Hardware:
    """One hardware type of the cluster and how to place an actor on it."""

    name: str
    """e.g. "A10G", "cpu", or a custom label."""
    gpu: bool
    count: float
    """How many actors the type can host at once (GPUs, or CPUs for CPU types)."""

    def actor_options(self) -> dict[str, Any]:
        if self.gpu:
            return {"num_gpus": 1, "accelerator_type": self.name}
        if self.name == CPU:
            return {"num_cpus": 1}
        return {"num_cpus": 1, "resources": {CUSTOM_PREFIX + self.name: 1}}


def discover_hardware(resources: Mapping[str, float] | None = None) -> dict[str, Hardware]:
    """Hardware types present in the cluster (default: `ray.cluster_resources()`)."""
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    found: dict[str, Hardware] = {}
    gpus = resources.get("GPU", 0)
    for key, value in resources.items():
        if key.startswith(ACCELERATOR_PREFIX):
            name = key[len(ACCELERATOR_PREFIX):]
            found[name] = Hardware(name, gpu=True, count=min(value, gpus) or value)
        elif key.startswith(CUSTOM_PREFIX):
            name = key[len(CUSTOM_PREFIX):]
            found[name] = Hardware(name, gpu=False, count=value)
    if resources.get("CPU", 0) >= 1:
        found.setdefault(CPU, Hardware(CPU, gpu=False, count=resources["CPU"]))
    return found


def resolve_hardware(names: Sequence[str] | None, present: Mapping[str, Hardware]):
    """The requested hardware types (default: all present), or a clear error for a type the
    cluster does not have: Ray would otherwise wait forever on the infeasible request."""
    if not names:
        return list(present.values())
    missing = [n for n in names if n not in present]
    if missing:
        raise ProfileError(
            f"hardware {missing} not in the Ray cluster; present: {sorted(present)}. Start "
            "nodes of that type (see cluster/) or choose a present one"
        )
    return [present[n] for n in names]


# --------------------------------------------------------------------------- timing
@dataclass
class Timing:
    median_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    repeats: int


def _summarise(samples_ms: list[float]) -> Timing:
    arr = np.asarray(samples_ms)
    return Timing(float(np.median(arr)), float(np.percentile(arr, 90)), float(arr.mean()),
                  float(arr.std()), len(arr))


def time_callable(fn, device: torch.device, warmup: int = 3, repeats: int = 10) -> Timing:
    """Time `fn()` with warm-up and device synchronisation; CUDA events on GPU."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return _summarise(samples)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Profiler:
    """Times sub-networks of one supernet on this process's device (the body of the actor)."""

    def __init__(self, checkpoint: str, space: str, hardware: str, settings: ProfileOptions):
        from nas_prune.checkpoint import load_checkpoint
        from nas_prune.space import make_space

        self.settings = settings
        self.hardware = hardware
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = settings.dtype
        if dtype == "auto":
            dtype = "bf16" if self.device.type == "cuda" else "fp32"
        if self.device.type == "cpu" and dtype != "fp32":
            raise ProfileError(f"dtype {dtype} is for GPUs; profile CPUs in fp32")
        self.dtype_name, self.dtype = dtype, _DTYPES[dtype]
        torch.set_num_threads(settings.threads)
        model, _ = load_checkpoint(checkpoint)
        self.model = model.to(self.device, self.dtype).eval()
        self.space = make_space(space, model.config)
        self.device_name = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                            else _cpu_name())
        g = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        shape = (settings.batch_size, settings.seq_len)
        self.inputs = {
            "input_ids": torch.randint(5, vocab, shape, generator=g).to(self.device),
            "attention_mask": torch.ones(shape, dtype=torch.long, device=self.device),
        }

    def describe(self) -> dict[str, Any]:
        import ray

        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return {"hardware": self.hardware, "device_name": self.device_name,
                "dtype": self.dtype_name, "pid": os.getpid(), "node_id": node_id}

    @torch.no_grad()
    def measure(self, config: Mapping[str, int]) -> dict[str, Any]:
        """Latency of `config`'s sub-network, exported as a physically smaller model."""
        sub = self.space.to_sub_network(config)
        small = self.model.extract_sub_network(sub).eval()
        timing = time_callable(lambda: small(**self.inputs), self.device,
                               self.settings.warmup, self.settings.repeats)
        return {**asdict(timing), **self._context(), "params": self.model.num_params(sub)}

    def _context(self) -> dict[str, Any]:
        return {"hardware": self.hardware, "device_name": self.device_name,
                "dtype": self.dtype_name, "batch_size": self.settings.batch_size,
                "seq_len": self.settings.seq_len}

    @torch.no_grad()
    def lookup_table(self, head_counts: Sequence[int], unit_counts: Sequence[int]):
        """Time the fixed part, one attention block per head count and one FFN block per
        neuron count (Kwon et al.'s latency lookup table) on this device."""
        m, s = self.model, self.settings
        layer = m.layers[0]
        hidden = torch.randn(s.batch_size, s.seq_len, m.config.hidden_size,
                             device=self.device, dtype=self.dtype)
        dim = m.config.head_dim

        def timed(fn) -> float:
            return time_callable(fn, self.device, s.warmup, s.repeats).median_ms

        empty = m.extract_sub_network(_empty(m)).eval()  # embeddings and head only
        fixed = timed(lambda: empty(**self.inputs))
        attention = {h: (timed(lambda h=h: layer.attention(hidden, None, h, h * dim))
                         if h else 0.0) for h in head_counts}
        ffn = {n: (timed(lambda n=n: layer.ffn(hidden, n)) if n else 0.0) for n in unit_counts}
        return {"fixed_ms": fixed, "attention_ms": attention, "ffn_ms": ffn, **self._context()}


def _empty(model):
    from nas_prune.supernet import SubNetwork

    n = model.config.num_hidden_layers
    return SubNetwork((0,) * n, (0,) * n)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


# --------------------------------------------------------------------------- predictor
@dataclass
class LatencyTable:
    """Kwon et al.'s latency lookup table for one hardware type and input shape."""

    hardware: str
    fixed_ms: float
    heads: list[int]
    attention_ms: list[float]
    units: list[int]
    ffn_ms: list[float]
    batch_size: int
    seq_len: int
    dtype: str

    def predict(self, sub) -> float:
        """Predicted latency (ms) of a SubNetwork: fixed part + per-layer blocks, with linear
        interpolation between measured head / neuron counts."""
        total = self.fixed_ms
        for h, n in zip(sub.num_heads, sub.num_units, strict=True):
            if h:
                total += float(np.interp(h, self.heads, self.attention_ms))
            if n:
                total += float(np.interp(n, self.units, self.ffn_ms))
        return total

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_table(raw: Mapping[str, Any]) -> LatencyTable:
    heads = sorted(raw["attention_ms"])
    units = sorted(raw["ffn_ms"])
    return LatencyTable(
        hardware=raw["hardware"], fixed_ms=raw["fixed_ms"], heads=heads,
        attention_ms=[raw["attention_ms"][h] for h in heads], units=units,
        ffn_ms=[raw["ffn_ms"][n] for n in units], batch_size=raw["batch_size"],
        seq_len=raw["seq_len"], dtype=raw["dtype"],
    )


def default_grid(full: int, points: int = 7) -> list[int]:
    """0, full and evenly spaced counts in between."""
    return sorted({0, full, *np.linspace(1, full, points).round().astype(int).tolist()})


# --------------------------------------------------------------------------- Ray
def _actor_class():
    import ray

    return ray.remote(Profiler)


def start_pool(checkpoint: str, space: str, hardware: Hardware, settings: ProfileOptions,
               size: int = 1, name: str | None = None):
    """`size` profiler actors pinned to `hardware` (one, named `name`, when a name is given,
    so that trials can find it with `ray.get_actor`)."""
    actor = _actor_class()
    size = 1 if name else max(1, min(size, int(hardware.count)))
    options = hardware.actor_options()
    if name:
        options = {**options, "name": name, "get_if_exists": True}
    return [actor.options(**options).remote(checkpoint, space, hardware.name, settings)
            for _ in range(size)]


def profile_configs(
    checkpoint: str | os.PathLike,
    space: str,
    configs: Sequence[Mapping[str, int]],
    settings: ProfileOptions | None = None,
    store=None,
    actors_per_type: int = 1,
    trial_ids: Sequence[str | None] | None = None,
) -> list[dict[str, Any]]:
    """Measure every config on every hardware type of `settings.hardware` (default: all in the
    cluster). Measurements already in `store` (a ResultStore) are reused, new ones appended
    to it."""
    import ray

    from nas_prune.results import config_hash

    settings = settings or ProfileOptions()
    if not ray.is_initialized():
        ray.init()
    types = resolve_hardware(settings.hardware, discover_hardware())
    trial_ids = list(trial_ids) if trial_ids is not None else [None] * len(configs)
    rows: list[dict[str, Any]] = []
    for hw in types:
        todo, futures = [], []
        for config, trial_id in zip(configs, trial_ids, strict=True):
            key = config_hash(config)
            dtype = _dtype_for(hw, settings)
            cached = store.cached_latency(key, hw.name, settings.batch_size, settings.seq_len,
                                          dtype) if store is not None else None
            if cached is not None:
                # the store holds the config as JSON; return it as measured rows do (a dict)
                rows.append({**cached, "config": dict(config), "cached": True})
            else:
                todo.append((config, key, trial_id))
        if not todo:
            continue
        pool = start_pool(str(checkpoint), space, hw, settings, actors_per_type)
        for i, (config, _, _) in enumerate(todo):
            futures.append(pool[i % len(pool)].measure.remote(dict(config)))
        measured = []
        for (config, key, trial_id), result in zip(todo, ray.get(futures), strict=True):
            measured.append({**result, "config": dict(config), "config_hash": key,
                             "predicted": False, "trial_id": trial_id})
        log.info("measured %d sub-networks on %s (%s)", len(measured), hw.name,
                 measured[0]["device_name"])
        if store is not None:
            store.append_latency(measured)
        rows.extend({**m, "cached": False} for m in measured)
        for actor in pool:
            ray.kill(actor)
    return rows


def measure_tables(checkpoint: str | os.PathLike, space: str,
                   hardware: Sequence[str] | None = None,
                   settings: ProfileOptions | None = None) -> dict[str, LatencyTable]:
    """A LatencyTable per hardware type, each measured by an actor on that type."""
    import ray

    from nas_prune.checkpoint import load_checkpoint

    settings = settings or ProfileOptions()
    if not ray.is_initialized():
        ray.init()
    config = load_checkpoint(checkpoint)[0].config
    heads = default_grid(config.num_attention_heads, config.num_attention_heads)
    units = default_grid(config.intermediate_size)
    tables = {}
    for hw in resolve_hardware(hardware, discover_hardware()):
        (actor,) = start_pool(str(checkpoint), space, hw, settings)
        tables[hw.name] = build_table(ray.get(actor.lookup_table.remote(heads, units)))
        ray.kill(actor)
    return tables


def _dtype_for(hw: Hardware, settings: ProfileOptions) -> str:
    if settings.dtype != "auto":
        return settings.dtype
    return "bf16" if hw.gpu else "fp32"


def relative_errors(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """Median and max relative error of predictions against measurements."""
    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    rel = np.abs(p - m) / m
    return {"median": float(statistics.median(rel)), "max": float(rel.max()), "n": len(rel)}
