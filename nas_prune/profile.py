"""Measure sub-network latency on every hardware type in the Ray cluster, and predict it.

Parameter count is a poor proxy for latency on a given GPU or CPU, so nas_prune measures it:

* `discover_hardware` finds the hardware types of the cluster from its resources: one per GPU
  `accelerator_type:<name>` (e.g. A10G, L4, A100), one per custom `hardware:<name>` label (how
  a cluster marks CPU node types, and how tests stand in for GPU types), `cpu`, and
  `cpu-onnxruntime` (the same CPUs running the sub-network exported to ONNX, with onnxruntime;
  measured only when named).
* `Profiler`, run as a Ray actor pinned to one hardware type (``accelerator_type=`` for GPUs,
  the custom resource otherwise), loads the supernet once, cuts each sub-network out as a
  physically smaller model, and times its forward pass: warm-up runs, device synchronisation
  (CUDA events on GPU), repeated timing, median / p90 / spread; bf16 on GPU if asked, fp32 on
  CPU with a pinned thread count (PyTorch, or onnxruntime via `nas_prune.onnx_export`).
* `LatencyTable` (Kwon et al. 2022) holds the fixed part (embeddings, head) and the cost of one
  attention block per head count and one FFN block per neuron count, each timed on extracted
  models run whole, and predicts any config's latency as the fixed part plus the sum over kept
  layers.
* `profile_configs` runs a pool per hardware type, caches measurements in the results store
  (the same config on the same hardware is measured once per experiment) and returns rows.
* `decoder_latency` times a decoder (nas_prune.decoder) the way text generation runs it: the
  prefill (one forward pass over the prompts, filling the KV cache) and the decode steps (one
  token per sequence per forward pass, reading the cache), reported per generated token.
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
ONNX_CPU = "cpu-onnxruntime"
"""The cluster's CPUs, running sub-networks exported to ONNX with onnxruntime
(`nas_prune.onnx_export`); present when onnxruntime is installed, measured only when named."""
OPT_IN = (ONNX_CPU,)
"""Hardware types measured only when asked for by name (not by the default "every type")."""
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
        if self.name in (CPU, ONNX_CPU):
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
        if onnxruntime_available():
            found.setdefault(ONNX_CPU, Hardware(ONNX_CPU, gpu=False, count=resources["CPU"]))
    return found


def onnxruntime_available() -> bool:
    """Whether onnxruntime is installed (looked up without importing it)."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def resolve_hardware(names: Sequence[str] | None, present: Mapping[str, Hardware]):
    """The requested hardware types (default: all present but the opt-in `OPT_IN` runtimes),
    or a clear error for a type the cluster does not have: Ray would otherwise wait forever on
    the infeasible request."""
    if not names:
        return [hw for name, hw in present.items() if name not in OPT_IN]
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


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
"""CPU timers by name. "wall" is latency as a user sees it; "thread" is the CPU time of the
timing thread, which leaves out the time other processes hold the core (a loaded, shared
machine), and equals wall time for single-threaded work on a quiet one. GPUs use CUDA events."""


def time_callable(fn, device: torch.device, warmup: int = 3, repeats: int = 10,
                  clock: str = "wall") -> Timing:
    """Time `fn()` with warm-up and device synchronisation; CUDA events on GPU, the `CLOCKS`
    timer `clock` on CPU."""
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
        now = CLOCKS[clock]
        for _ in range(repeats):
            t0 = now()
            fn()
            samples.append((now() - t0) * 1e3)
    return _summarise(samples)


@torch.no_grad()
def decoder_latency(model, batch_size: int = 1, prompt_len: int = 128, new_tokens: int = 32,
                    device: str | torch.device = "cpu", warmup: int = 3, repeats: int = 10,
                    clock: str = "wall", seed: int = 0) -> dict[str, Any]:
    """Prefill and per-token decode latency of decoder `model` (a `DecoderForCausalLM`, already
    on `device`; a supernet runs its selected sub-network), each with `time_callable`.

    Prefill: one forward pass over `batch_size` random prompts of `prompt_len` tokens that
    fills a fresh KV cache. Decode: starting from the cache of one (untimed) prefill,
    `new_tokens` greedy steps of one token per sequence, each reading and extending the cache;
    a sample is the time of all steps divided by `new_tokens`. Both report the median (and p90)
    over `repeats` samples after `warmup` untimed ones.

    Returns:
        ``prefill_ms``, ``prefill_p90_ms``, ``decode_ms_per_token``,
        ``decode_p90_ms_per_token``, ``decode_tokens_per_s`` (tokens of the whole batch per
        second at the median), and the shape: batch_size, prompt_len, new_tokens, clock.
    """
    from nas_prune.decoder import DecoderCache

    if min(batch_size, prompt_len, new_tokens, repeats) < 1 or warmup < 0:
        raise ProfileError(
            f"batch_size {batch_size}, prompt_len {prompt_len}, new_tokens {new_tokens} and "
            f"repeats {repeats} must be at least 1 and warmup {warmup} at least 0"
        )
    if clock not in CLOCKS:
        raise ProfileError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len),
                            generator=generator).to(device)
    prefilled = DecoderCache()
    first = model(prompts, cache=prefilled).logits[:, -1:].argmax(-1)

    def decode() -> None:
        cache = DecoderCache()  # the prefilled state; cached tensors are never modified
        cache.layers, cache.length = dict(prefilled.layers), prefilled.length
        token = first
        for _ in range(new_tokens):
            token = model(token, cache=cache).logits[:, -1:].argmax(-1)

    try:
        prefill = time_callable(lambda: model(prompts, cache=DecoderCache()), device, warmup,
                                repeats, clock)
        per_call = time_callable(decode, device, warmup, repeats, clock)
    finally:
        model.train(was_training)
    per_token = per_call.median_ms / new_tokens
    return {"prefill_ms": prefill.median_ms, "prefill_p90_ms": prefill.p90_ms,
            "decode_ms_per_token": per_token,
            "decode_p90_ms_per_token": per_call.p90_ms / new_tokens,
            "decode_tokens_per_s": batch_size * 1e3 / per_token,
            "batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "clock": clock}


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Profiler:
    """Times sub-networks of one supernet on this process's device (the body of the actor),
    with `settings.clock` on CPU types ("thread" needs a CPU type and one thread)."""

    def __init__(self, checkpoint: str, space: str, hardware: str, settings: ProfileOptions):
        from nas_prune.checkpoint import load_checkpoint
        from nas_prune.space import make_space

        self.settings = settings
        self.hardware = hardware
        self.clock = clock = settings.clock
        gpu = torch.cuda.is_available() and hardware != ONNX_CPU
        self.device = torch.device("cuda" if gpu else "cpu")
        dtype = settings.dtype
        if dtype == "auto":
            dtype = "bf16" if self.device.type == "cuda" else "fp32"
        if self.device.type == "cpu" and dtype != "fp32":
            raise ProfileError(f"dtype {dtype} is for GPUs; profile CPUs in fp32")
        if clock not in CLOCKS:
            raise ProfileError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
        if clock == "thread" and (self.device.type != "cpu" or settings.threads != 1):
            raise ProfileError("the thread clock times one CPU thread: use it with threads=1 "
                               "on a CPU type, or the wall clock")
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
        timing = self._timing(small)
        return {**asdict(timing), **self._context(), "params": self.model.num_params(sub)}

    def _timing(self, small) -> Timing:
        """Time one extracted model's forward pass with this profiler's runtime."""
        s = self.settings
        if self.hardware != ONNX_CPU:
            return time_callable(lambda: small(**self.inputs), self.device, s.warmup, s.repeats,
                                 self.clock)
        import tempfile

        from nas_prune.onnx_export import export_onnx, time_onnx

        with tempfile.TemporaryDirectory(prefix="nas_prune_onnx_") as tmp:
            small.save_pretrained(tmp)  # with supernet.py beside it (registered auto class)
            path = export_onnx(tmp)  # also checks onnxruntime's logits against PyTorch's
            return _summarise(time_onnx(path, s.batch_size, s.seq_len, s.threads, s.warmup,
                                        s.repeats, self.clock))

    def _time(self, small) -> float:
        return self._timing(small).median_ms

    def _context(self) -> dict[str, Any]:
        return {"hardware": self.hardware, "device_name": self.device_name,
                "dtype": self.dtype_name, "batch_size": self.settings.batch_size,
                "seq_len": self.settings.seq_len}

    @torch.no_grad()
    def lookup_table(self, head_counts: Sequence[int], unit_counts: Sequence[int]):
        """Kwon et al.'s latency lookup table on this device: the fixed part (embeddings, mask,
        head), and the cost of one attention block per head count and of one FFN block per
        neuron count.

        Every entry is timed as `measure` times a sub-network, on an extracted (contiguous)
        model run whole: the fixed part is the 0-layer model; the attention cost of h heads is
        (time of the model whose layers keep h heads and no FFN - the fixed part) / its layers,
        and likewise for FFN blocks. Timing blocks one by one on the supernet's weight slices
        instead drifts from the extracted model by up to 2x (see benchmarks/README.md, issue
        5): the slices are not contiguous, the blocks missed the padding mask and the per-layer
        overhead of the model's forward, and a block of well under a millisecond is rarely
        preempted by other processes while a whole model is. The full model is run first
        (untimed) so that the first entry is not timed on a cold process.
        """
        from nas_prune.supernet import SubNetwork

        full = self.model.full_sub_network
        self._time(self.model.extract_sub_network(full).eval())  # warm the process up
        fixed = self._time(self.model.extract_sub_network(_empty(self.model)).eval())

        def per_layer(limits: Sequence[int], count: int, block: str) -> float | None:
            keep = tuple(count if count <= limit else 0 for limit in limits)
            layers = sum(1 for k in keep if k)
            if not layers:
                return None  # no layer of this network is that wide
            zeros = (0,) * len(keep)
            sub = SubNetwork(keep, zeros) if block == "attention" else SubNetwork(zeros, keep)
            small = self.model.extract_sub_network(sub).eval()
            return max(0.0, self._time(small) - fixed) / layers

        attention = {h: per_layer(full.num_heads, h, "attention") if h else 0.0
                     for h in head_counts}
        ffn = {n: per_layer(full.num_units, n, "ffn") if n else 0.0 for n in unit_counts}
        return {"fixed_ms": fixed,
                "attention_ms": {h: t for h, t in attention.items() if t is not None},
                "ffn_ms": {n: t for n, t in ffn.items() if t is not None}, **self._context()}


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
    cluster but the opt-in runtimes, see `resolve_hardware`) with `settings.clock`.
    Measurements already in `store` (a ResultStore) are reused, new ones appended to it; the
    store holds wall-clock latencies only."""
    import ray

    from nas_prune.results import config_hash

    settings = settings or ProfileOptions()
    if store is not None and settings.clock != "wall":
        raise ProfileError(f"the results store holds wall-clock latencies; measure with the "
                           f"{settings.clock} clock without a store")
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
    """A LatencyTable per hardware type, each measured by an actor on that type with
    `settings.clock`."""
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
