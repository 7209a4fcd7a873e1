"""Measure sub-network latency on every hardware type in the Ray cluster, and predict it.

Parameter count is a poor proxy for latency on a given GPU or CPU, so nas_prune measures it:

* `discover_hardware` finds the hardware types of the cluster from its resources: one per GPU
  `accelerator_type:<name>` (e.g. A10G, L4, A100), one per custom `hardware:<name>` label (how
  a cluster marks CPU node types, and how tests stand in for GPU types), `cpu`, and
  `cpu-onnxruntime` (the same CPUs running the sub-network exported to ONNX, with onnxruntime;
  measured only when named).
* `Profiler`, run as a Ray actor pinned to one hardware type (``accelerator_type=`` for GPUs,
  the custom resource otherwise), loads the supernet once (an encoder, nas_prune.supernet, or a
  decoder, nas_prune.decoder), cuts each sub-network out as a physically smaller model, and
  times it: warm-up runs, device synchronisation (CUDA events on GPU), repeated timing, median
  / p90 / spread; bf16 on GPU if asked, fp32 on CPU with a pinned thread count (PyTorch, or for
  encoders onnxruntime via `nas_prune.onnx_export`). An encoder's forward pass is timed; a
  decoder's prefill (``median_ms``: batch_size x seq_len prompt tokens into a fresh KV cache)
  and its decode (``decode_ms``: per generated token, over `DECODE_TOKENS` steps reading the
  cache), both by `decoder_timings`.
* `LatencyTable` (Kwon et al. 2022) holds the fixed part (embeddings, head) and the cost of one
  attention block per head count (a decoder: per KV head count x query heads per KV head) and
  one FFN block per neuron count, each timed on extracted models run whole, and predicts any
  config's latency as the fixed part plus the sum over kept layers; a decoder's table has these
  entries for the prefill and per decoded token. For a ``+hidden`` space every entry is timed at
  a grid of hidden widths (`hidden_grid`) and the prediction interpolated linearly in the
  sub-network's width.
* `profile_configs` runs a pool per hardware type, caches measurements in the results store
  (the same config on the same hardware is measured once per experiment) and returns rows;
  `profile_saved` times saved models (exports, baselines, the teacher) with the same actors.
  Both time in interleaved rounds and keep each model's lowest median (`fastest_round`).
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
from dataclasses import asdict, dataclass, field
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
DECODER_TYPE = "nas_prune_decoder"
"""`model_type` of nas_prune's decoder (nas_prune.decoder.DecoderConfig)."""
DECODE_TOKENS = 16
"""Decode steps a decoder measurement times after its prompt (ProfileOptions.seq_len tokens);
its decode latency is their mean per token."""
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


def decoder_timings(model, batch_size: int = 1, prompt_len: int = 128, new_tokens: int = 32,
                    device: str | torch.device = "cpu", warmup: int = 3, repeats: int = 10,
                    clock: str = "wall", seed: int = 0) -> tuple[Timing, Timing]:
    """Prefill and per-token decode `Timing`s of decoder `model`, measured as `decoder_latency`
    describes (the decode timing's fields are per generated token)."""
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
    with torch.no_grad():
        prefilled = DecoderCache()
        first = model(prompts, cache=prefilled).logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def prefill() -> None:
        model(prompts, cache=DecoderCache())

    @torch.no_grad()
    def decode() -> None:
        cache = DecoderCache()  # the prefilled state; cached tensors are never modified
        cache.layers, cache.length = dict(prefilled.layers), prefilled.length
        token = first
        for _ in range(new_tokens):
            token = model(token, cache=cache).logits[:, -1:].argmax(-1)

    try:
        prefill_timing = time_callable(prefill, device, warmup, repeats, clock)
        per_call = time_callable(decode, device, warmup, repeats, clock)
    finally:
        model.train(was_training)
    per_token = Timing(per_call.median_ms / new_tokens, per_call.p90_ms / new_tokens,
                       per_call.mean_ms / new_tokens, per_call.std_ms / new_tokens,
                       per_call.repeats)
    return prefill_timing, per_token


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
    prefill, decode = decoder_timings(model, batch_size, prompt_len, new_tokens, device,
                                      warmup, repeats, clock, seed)
    return {"prefill_ms": prefill.median_ms, "prefill_p90_ms": prefill.p90_ms,
            "decode_ms_per_token": decode.median_ms,
            "decode_p90_ms_per_token": decode.p90_ms,
            "decode_tokens_per_s": batch_size * 1e3 / decode.median_ms,
            "batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "clock": clock}


def is_decoder(model_config: Any) -> bool:
    """Whether `model_config` is a decoder's (`nas_prune.decoder.DecoderConfig`)."""
    return getattr(model_config, "model_type", None) == DECODER_TYPE


def _is_causal_lm(model) -> bool:
    from nas_prune.decoder import DecoderForCausalLM

    return isinstance(model, DecoderForCausalLM)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Profiler:
    """Times sub-networks of one supernet, encoder or decoder, on this process's device (the
    body of the actor), with `settings.clock` on CPU types ("thread" needs a CPU type and one
    thread). A causal LM (`DecoderForCausalLM`) is timed by `decoder_timings`: prefill of
    `settings.batch_size` x `settings.seq_len` prompt tokens, then `DECODE_TOKENS` decode
    steps; a classifier (encoder or decoder) by one forward pass over such a batch."""

    def __init__(self, checkpoint: str | None, space: str | None, hardware: str,
                 settings: ProfileOptions):
        """`checkpoint` None: an actor that times saved models only (`measure_saved`)."""
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
        self.device_name = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                            else _cpu_name())
        self.model = self.space = None
        self.decoder = self.generative = False
        """Whether the supernet generates text: prefill and decode are timed (else one forward
        pass)."""
        if checkpoint is None:
            return
        model, _ = load_checkpoint(checkpoint)
        self.decoder = is_decoder(model.config)
        self.generative = _is_causal_lm(model)
        self._check_runtime(self.decoder)
        self.model = model.to(self.device, self.dtype).eval()
        self.space = make_space(space, model.config)

    def _check_runtime(self, decoder: bool) -> None:
        if decoder and self.hardware == ONNX_CPU:
            raise ProfileError(f"{ONNX_CPU} times encoders only; profile a decoder on the cpu "
                               "type or a GPU type")

    def _inputs(self, vocab: int) -> dict[str, torch.Tensor]:
        """The timed batch: seeded random token ids below `vocab`, no padding."""
        g = torch.Generator().manual_seed(0)
        shape = (self.settings.batch_size, self.settings.seq_len)
        return {"input_ids": torch.randint(5, vocab, shape, generator=g).to(self.device),
                "attention_mask": torch.ones(shape, dtype=torch.long, device=self.device)}

    def describe(self) -> dict[str, Any]:
        import ray

        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return {"hardware": self.hardware, "device_name": self.device_name,
                "dtype": self.dtype_name, "pid": os.getpid(), "node_id": node_id,
                "decoder": self.decoder, "generative": self.generative}

    @torch.no_grad()
    def measure(self, config: Mapping[str, int]) -> dict[str, Any]:
        """Latency of `config`'s sub-network, exported as a physically smaller model: the
        forward pass (an encoder) or the prefill (a decoder) as ``median_ms`` etc., and for a
        decoder the per-token decode latency as ``decode_ms`` / ``decode_p90_ms``."""
        sub = self.space.to_sub_network(config)
        small = self.model.extract_sub_network(sub).eval()
        prefill, decode = self._timings(small)
        row = {**asdict(prefill), **self._context(), "params": self.model.num_params(sub)}
        if decode is not None:
            row.update(decode_ms=decode.median_ms, decode_p90_ms=decode.p90_ms)
        return row

    @torch.no_grad()
    def measure_saved(self, model_dir: str) -> dict[str, Any]:
        """Latency of the model saved in `model_dir` (an export, a baseline's model, the dense
        teacher) as it is stored, timed exactly as `measure` times sub-networks: same device,
        dtype, batch shape, clock and runtime (onnxruntime on the cpu-onnxruntime type)."""
        from nas_prune.models import is_decoder as saved_is_decoder

        if saved_is_decoder(model_dir):
            from nas_prune.decoder_loading import load_pretrained_decoder

            self._check_runtime(True)
            model = load_pretrained_decoder(str(model_dir))
        else:
            from transformers import AutoModelForSequenceClassification

            import nas_prune.supernet  # noqa: F401  registers our encoder with the Auto classes

            model = AutoModelForSequenceClassification.from_pretrained(
                str(model_dir), trust_remote_code=True)
        model = model.to(self.device, self.dtype).eval()
        generative = _is_causal_lm(model)
        prefill, decode = self._timings(model, generative)
        row = {**asdict(prefill), **self._context(generative), "model_dir": str(model_dir)}
        if decode is not None:
            row.update(decode_ms=decode.median_ms, decode_p90_ms=decode.p90_ms)
        return row

    def _timings(self, small, generative: bool | None = None) -> tuple[Timing, Timing | None]:
        """Time one extracted (or saved) model with this profiler's runtime: (forward pass or
        prefill, per-token decode or None for an encoder)."""
        s = self.settings
        if self.generative if generative is None else generative:
            return decoder_timings(small, s.batch_size, s.seq_len, DECODE_TOKENS, self.device,
                                   s.warmup, s.repeats, self.clock)
        if self.hardware != ONNX_CPU:
            inputs = self._inputs(small.config.vocab_size)
            return time_callable(lambda: small(**inputs), self.device, s.warmup, s.repeats,
                                 self.clock), None
        import tempfile

        from nas_prune.onnx_export import export_onnx, time_onnx

        with tempfile.TemporaryDirectory(prefix="nas_prune_onnx_") as tmp:
            small.save_pretrained(tmp)  # with supernet.py beside it (registered auto class)
            path = export_onnx(tmp)  # also checks onnxruntime's logits against PyTorch's
            return _summarise(time_onnx(path, s.batch_size, s.seq_len, s.threads, s.warmup,
                                        s.repeats, self.clock)), None

    def _phase_ms(self, sub) -> dict[str, float]:
        """Median latency (ms) per phase of `sub` extracted and run whole."""
        prefill, decode = self._timings(self.model.extract_sub_network(sub).eval())
        times = {"prefill": prefill.median_ms}
        if decode is not None:
            times["decode"] = decode.median_ms
        return times

    def _context(self, generative: bool | None = None) -> dict[str, Any]:
        context = {"hardware": self.hardware, "device_name": self.device_name,
                   "dtype": self.dtype_name, "batch_size": self.settings.batch_size,
                   "seq_len": self.settings.seq_len}
        if self.generative if generative is None else generative:
            context["new_tokens"] = DECODE_TOKENS
        return context

    def _sub(self, attention: Sequence[tuple[int, int]], units: Sequence[int], hidden: int):
        """The sub-network whose layer i keeps attention shape `attention[i]` (heads or KV
        heads, queries per KV head) and `units[i]` neurons, and `hidden` channels."""
        if self.decoder:
            from nas_prune.decoder import DecoderSubNetwork

            return DecoderSubNetwork(tuple(k for k, _ in attention),
                                     tuple(g if k else 0 for k, g in attention), tuple(units),
                                     hidden)
        from nas_prune.supernet import SubNetwork

        return SubNetwork(tuple(k for k, _ in attention), tuple(units), hidden)

    @torch.no_grad()
    def lookup_table(self, head_counts: Sequence[int], unit_counts: Sequence[int],
                     queries: Sequence[int] | None = None,
                     widths: Sequence[int] | None = None, rounds: int = 1) -> dict[str, Any]:
        """Kwon et al.'s latency lookup table on this device, at every hidden width of `widths`
        (default: the model's full width): the fixed part (embeddings, mask, head), the cost of
        one attention block per head count (a decoder: per KV head count x query heads per KV
        head of `queries`, default all) and of one FFN block per neuron count; for a causal LM
        each entry both for the prefill and per decoded token.

        Every entry is timed as `measure` times a sub-network, on an extracted (contiguous)
        model run whole: the fixed part is the 0-layer model; the attention cost of h heads is
        (time of the model whose layers keep h heads and no FFN - the fixed part) / its layers,
        and likewise for FFN blocks. Timing blocks one by one on the supernet's weight slices
        instead drifts from the extracted model by up to 2x (see benchmarks/README.md, issue
        5): the slices are not contiguous, the blocks missed the padding mask and the per-layer
        overhead of the model's forward, and a block of well under a millisecond is rarely
        preempted by other processes while a whole model is. The full model is run first
        (untimed) so that the first entry is not timed on a cold process. With `rounds` above
        1, every model is timed once per round (all models, then all again) and its lowest
        median kept, so that a burst of load from other processes spoils one round of a few
        entries, not the table.

        Returns:
            The timing context (hardware, device_name, dtype, batch_size, seq_len, and
            new_tokens for a decoder) and ``entries``: one dict per timed entry with its
            ``hidden`` width, ``block`` ("fixed", "attention" or "ffn"), ``heads``,
            ``queries``, ``units`` and its per-phase milliseconds ``prefill_ms`` (and
            ``decode_ms``); `build_table` makes the `LatencyTable`.
        """
        full = self.model.full_sub_network
        if self.decoder:
            head_limits, query_limits = full.kv_heads, full.queries_per_kv
            queries = sorted(set(queries or range(1, max(query_limits) + 1)))
        else:
            head_limits, query_limits = full.num_heads, (1,) * len(full.num_heads)
            if queries not in (None, [1], (1,)):
                raise ProfileError("an encoder's heads have no query groups: give queries=None")
            queries = [1]
        unit_limits = full.num_units if not self.decoder else full.units
        widths = sorted(set(widths or [self.model.config.hidden_size]))
        if widths[0] < 1 or widths[-1] > self.model.config.hidden_size:
            raise ProfileError(f"hidden widths {widths} must lie in [1, "
                               f"{self.model.config.hidden_size}]")
        if rounds < 1:
            raise ProfileError(f"rounds must be at least 1, got {rounds}")
        n = len(head_limits)
        heads = [h for h in sorted(set(head_counts)) if 0 < h <= max(head_limits)]
        queries = [q for q in queries if 0 < q <= max(query_limits)]
        units = [u for u in sorted(set(unit_counts)) if 0 < u <= max(unit_limits)]
        # every model to time: (hidden, block, heads, queries, units), its sub-network, layers
        plan = []
        for w in widths:
            plan.append(((w, "fixed", 0, 0, 0), self._sub([(0, 0)] * n, [0] * n, w), 1))
            for h in heads:
                for q in queries:
                    keep = [(h, q) if h <= hl and q <= ql else (0, 0)
                            for hl, ql in zip(head_limits, query_limits, strict=True)]
                    plan.append(((w, "attention", h, q, 0), self._sub(keep, [0] * n, w),
                                 sum(k > 0 for k, _ in keep)))
            for u in units:
                keep = [u if u <= limit else 0 for limit in unit_limits]
                plan.append(((w, "ffn", 0, 0, u), self._sub([(0, 0)] * n, keep, w),
                             sum(map(bool, keep))))
        if any(not layers for *_, layers in plan):
            raise ProfileError("no layer of this supernet can hold some entry; time a supernet "
                               "whose layers have one shape")
        self._timings(self.model.extract_sub_network(full).eval())  # warm the process up
        best: dict[tuple, dict[str, float]] = {}
        for _ in range(rounds):
            for key, sub, _ in plan:
                kept = best.setdefault(key, {})
                for phase, ms in self._phase_ms(sub).items():
                    kept[phase] = min(ms, kept.get(phase, np.inf))
        entries = []
        for key, _, layers in plan:
            w, block, h, q, u = key
            fixed, times = best[(w, "fixed", 0, 0, 0)], best[key]
            if block != "fixed":
                times = {p: max(0.0, t - fixed[p]) / layers for p, t in times.items()}
            entries.append({"hidden": w, "block": block, "heads": h, "queries": q, "units": u,
                            **{f"{p}_ms": t for p, t in times.items()}})
        return {**self._context(), "entries": entries}


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
PHASES = ("prefill", "decode")
"""What a table predicts: "prefill" (an encoder's forward pass, a decoder's prompt pass) and
"decode" (a decoder's latency per generated token)."""


@dataclass
class LatencyTable:
    """Kwon et al.'s latency lookup table for one hardware type and input shape, over a grid of
    hidden widths; for a decoder, one table per phase (prefill and per-token decode).

    A prediction is the fixed part plus, per kept layer, the cost of its attention block and of
    its FFN block, each interpolated linearly between the timed head (KV head, query) and
    neuron counts; all of that at each timed hidden width, then interpolated linearly in the
    sub-network's hidden width between the two nearest timed widths (clamped outside them).
    Matrix products grow linearly with the width and per-call overheads not at all, so cost
    is close to affine in the width between grid points. Timed at the full width only (a space
    without ``+hidden``), the width is not looked at.
    """

    hardware: str
    batch_size: int
    seq_len: int
    dtype: str
    hidden: list[int]
    """Hidden widths timed, ascending; the last is the model's full width."""
    heads: list[int]
    """Attention heads per layer (encoder) or KV heads per layer (decoder) timed, from 0."""
    queries: list[int]
    """Query heads per KV head timed (decoder); [1] for an encoder."""
    units: list[int]
    """FFN / MLP neurons per layer timed, from 0."""
    fixed_ms: list[float]
    """Per width: the 0-layer model (embeddings, final norm, head)."""
    attention_ms: list[list[list[float]]]
    """Per width, head count and query count: one attention block (0 for 0 heads)."""
    ffn_ms: list[list[float]]
    """Per width and neuron count: one FFN block (0 for 0 neurons)."""
    new_tokens: int = 0
    """Decoder: decode steps after the seq_len-token prompt that a decode time averages over;
    0 for an encoder (no decode phase)."""
    decode_fixed_ms: list[float] = field(default_factory=list)
    decode_attention_ms: list[list[list[float]]] = field(default_factory=list)
    decode_ffn_ms: list[list[float]] = field(default_factory=list)
    """Decoder: the same three entries per generated token."""

    def predict(self, sub, phase: str = "prefill") -> float:
        """Predicted latency (ms) of a SubNetwork or DecoderSubNetwork: of the forward pass or
        prefill (`phase` "prefill"), or per decoded token ("decode", decoders)."""
        if phase not in PHASES:
            raise ProfileError(f"phase must be one of {PHASES}, got {phase!r}")
        if phase == "decode":
            if not self.new_tokens:
                raise ProfileError("this table has no decode phase (an encoder's)")
            fixed, attention, ffn = (self.decode_fixed_ms, self.decode_attention_ms,
                                     self.decode_ffn_ms)
        else:
            fixed, attention, ffn = self.fixed_ms, self.attention_ms, self.ffn_ms
        attention, ffn = np.asarray(attention, float), np.asarray(ffn, float)
        total = np.asarray(fixed, float).copy()  # per width
        for h, q, n in _layer_shapes(sub):
            if h:
                per_head = _lerp(q, self.queries, attention)  # (width, heads)
                total += _lerp(h, self.heads, per_head)
            if n:
                total += _lerp(n, self.units, ffn)
        width = sub.hidden or self.hidden[-1]
        return float(np.interp(width, self.hidden, total))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _lerp(x: float, points: Sequence[int], values: np.ndarray) -> np.ndarray:
    """`values` (last axis: one entry per point) interpolated linearly at `x` along the last
    axis (clamped outside the points)."""
    i = int(np.clip(np.searchsorted(points, x), 1, len(points) - 1)) if len(points) > 1 else 0
    if len(points) == 1:
        return values[..., 0]
    lo, hi = points[i - 1], points[i]
    t = float(np.clip((x - lo) / (hi - lo), 0.0, 1.0))
    return (1 - t) * values[..., i - 1] + t * values[..., i]


def _layer_shapes(sub) -> list[tuple[int, int, int]]:
    """(heads or KV heads, queries per KV head, neurons) of each layer of `sub`."""
    if hasattr(sub, "kv_heads"):
        return list(zip(sub.kv_heads, sub.queries_per_kv, sub.units, strict=True))
    return [(h, 1, n) for h, n in zip(sub.num_heads, sub.num_units, strict=True)]


def build_table(raw: Mapping[str, Any]) -> LatencyTable:
    """The `LatencyTable` of a `Profiler.lookup_table` result."""
    entries = raw["entries"]
    widths = sorted({e["hidden"] for e in entries})
    attention = [e for e in entries if e["block"] == "attention"]
    heads = sorted({0, *(e["heads"] for e in attention)})
    queries = sorted({e["queries"] for e in attention}) or [1]
    units = sorted({0, *(e["units"] for e in entries if e["block"] == "ffn")})
    phases = [p for p in PHASES if f"{p}_ms" in entries[0]]
    index = {(e["hidden"], e["block"], e["heads"], e["queries"], e["units"]): e
             for e in entries}

    def ms(phase: str, w: int, block: str, h: int = 0, q: int = 0, n: int = 0) -> float:
        if block != "fixed" and not (h or n):
            return 0.0  # a removed block costs nothing
        entry = index.get((w, block, h, q, n))
        if entry is None:
            raise ProfileError(f"the lookup table lacks the {block} entry heads={h}, "
                               f"queries={q}, units={n} at hidden width {w}; time the full grid")
        return float(entry[f"{phase}_ms"])

    tables = {p: ([ms(p, w, "fixed") for w in widths],
                  [[[ms(p, w, "attention", h, q) for q in queries] for h in heads]
                   for w in widths],
                  [[ms(p, w, "ffn", n=n) for n in units] for w in widths]) for p in phases}
    decode = tables.get("decode", ([], [], []))
    return LatencyTable(
        hardware=raw["hardware"], batch_size=raw["batch_size"], seq_len=raw["seq_len"],
        dtype=raw["dtype"], hidden=widths, heads=heads, queries=queries, units=units,
        fixed_ms=tables["prefill"][0], attention_ms=tables["prefill"][1],
        ffn_ms=tables["prefill"][2], new_tokens=raw.get("new_tokens", 0) if decode[0] else 0,
        decode_fixed_ms=decode[0], decode_attention_ms=decode[1], decode_ffn_ms=decode[2],
    )


def default_grid(full: int, points: int = 7) -> list[int]:
    """0, full and evenly spaced counts in between."""
    return sorted({0, full, *np.linspace(1, full, points).round().astype(int).tolist()})


def hidden_grid(low: int, high: int, step: int, points: int = 4) -> list[int]:
    """`points` hidden widths from `low` to `high`, both included, evenly spaced and rounded to
    multiples of `step` (fewer when the range holds fewer)."""
    grid = np.linspace(low, high, points) / step
    return sorted({low, high, *(int(round(v)) * step for v in grid)})


# --------------------------------------------------------------------------- Ray
def _actor_class():
    import ray

    return ray.remote(Profiler)


def start_pool(checkpoint: str | None, space: str | None, hardware: Hardware,
               settings: ProfileOptions, size: int = 1, name: str | None = None):
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
        todo = []
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
        timed = _in_rounds(pool, "measure", [dict(config) for config, _, _ in todo],
                           settings.rounds)
        measured = []
        for row, (config, key, trial_id) in zip(timed, todo, strict=True):
            row.pop("round_ms")
            measured.append({**row, "config": dict(config), "config_hash": key,
                             "predicted": False, "trial_id": trial_id})
        log.info("measured %d sub-networks on %s (%s)", len(measured), hw.name,
                 measured[0]["device_name"])
        if store is not None:
            store.append_latency(measured)
        rows.extend({**m, "cached": False} for m in measured)
        for actor in pool:
            ray.kill(actor)
    return rows


def _in_rounds(pool: Sequence[Any], method: str, items: Sequence[Any], rounds: int
               ) -> list[dict[str, Any]]:
    """Each of `items` timed `rounds` times by the profiler actors of `pool` (`method`, e.g.
    "measure", item i always on actor i mod the pool's size), all items in turn per round (an
    actor runs its calls in the order they were made), each item's rounds merged by
    `fastest_round`."""
    import ray

    results = ray.get([getattr(pool[i % len(pool)], method).remote(item)
                       for _ in range(rounds) for i, item in enumerate(items)])
    return [fastest_round(results[i::len(items)]) for i in range(len(items))]


def fastest_round(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One model's timing from its rounds (`ProfileOptions.rounds`): the row of the round with
    the lowest median (its p90, mean and spread with it), a decoder's ``decode_ms`` the lowest
    of the rounds' too, ``rounds`` the number of rounds and ``round_ms`` their medians."""
    best = dict(min(rows, key=lambda r: r["median_ms"]))
    if best.get("decode_ms") is not None:
        fastest_decode = min(rows, key=lambda r: r["decode_ms"])
        best.update(decode_ms=fastest_decode["decode_ms"],
                    decode_p90_ms=fastest_decode.get("decode_p90_ms"))
    return {**best, "rounds": len(rows), "round_ms": [r["median_ms"] for r in rows]}


def profile_saved(model_dirs: Sequence[str | os.PathLike],
                  settings: ProfileOptions | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """Time the saved models in `model_dirs` (exports, baselines' models, the teacher) on every
    hardware type of `settings.hardware` (as `profile_configs`), each by a profiler actor
    pinned to that type, the same runtime that times NAS sub-networks (`Profiler.measure_saved`),
    in `settings.rounds` interleaved rounds (every model, then every model again), each model's
    lowest median kept (`fastest_round`), so that models compared with each other were timed
    under the same conditions. Returns ``{model_dir: {hardware: row}}``, the hardware types in
    `resolve_hardware`'s order (the first is the one a single latency column reports)."""
    import ray

    settings = settings or ProfileOptions()
    if not ray.is_initialized():
        ray.init()
    dirs = list(dict.fromkeys(str(d) for d in model_dirs))
    measured: dict[str, dict[str, dict[str, Any]]] = {d: {} for d in dirs}
    for hw in resolve_hardware(settings.hardware, discover_hardware()):
        pool = start_pool(None, None, hw, settings)
        try:
            timed = _in_rounds(pool, "measure_saved", dirs, settings.rounds)
            for d, row in zip(dirs, timed, strict=True):
                measured[d][hw.name] = row
        finally:
            for actor in pool:
                ray.kill(actor)
        log.info("timed %d saved models on %s", len(dirs), hw.name)
    return measured


def measure_tables(checkpoint: str | os.PathLike, space: str,
                   hardware: Sequence[str] | None = None,
                   settings: ProfileOptions | None = None,
                   rounds: int | None = None) -> dict[str, LatencyTable]:
    """A LatencyTable per hardware type, each measured by an actor on that type with
    `settings.clock`: every head count (a decoder: KV head count x queries per KV head), seven
    neuron counts, and, for a space that searches the hidden size (``+hidden``), four hidden
    widths from the space's smallest to the full width (`hidden_grid`); each entry the lowest
    of `rounds` medians (default `settings.rounds`; see `Profiler.lookup_table`)."""
    import ray

    settings = settings or ProfileOptions()
    rounds = settings.rounds if rounds is None else rounds
    config, grid = _table_grid(checkpoint, space)
    if not ray.is_initialized():
        ray.init()
    tables = {}
    for hw in resolve_hardware(hardware, discover_hardware()):
        (actor,) = start_pool(str(checkpoint), space, hw, settings)
        tables[hw.name] = build_table(ray.get(actor.lookup_table.remote(**grid, rounds=rounds)))
        ray.kill(actor)
    return tables


def _table_grid(checkpoint: str | os.PathLike, space: str) -> tuple[Any, dict[str, list[int]]]:
    """The supernet's config and the `Profiler.lookup_table` arguments `measure_tables` uses."""
    from transformers import AutoConfig

    import nas_prune.decoder  # noqa: F401 - registers the decoder's config with AutoConfig
    import nas_prune.supernet  # noqa: F401 - and the encoder's
    from nas_prune.space import make_space

    config = AutoConfig.from_pretrained(str(checkpoint))
    searched = make_space(space, config)
    hidden = next((d for d in searched.dims if d.name == "hidden"), None)
    widths = [config.hidden_size] if hidden is None else hidden_grid(hidden.low, hidden.high,
                                                                     hidden.step)
    if widths[-1] != config.hidden_size:
        widths.append(config.hidden_size)  # the full width: a sub-network's hidden None
    if is_decoder(config):
        kv, group = config.num_key_value_heads, config.queries_per_group
        grid = {"head_counts": default_grid(kv, kv), "queries": list(range(1, group + 1))}
    else:
        grid = {"head_counts": default_grid(config.num_attention_heads,
                                            config.num_attention_heads)}
    return config, {**grid, "unit_counts": default_grid(config.intermediate_size),
                    "widths": widths}


def _dtype_for(hw: Hardware, settings: ProfileOptions) -> str:
    if settings.dtype != "auto":
        return settings.dtype
    return "bf16" if hw.gpu else "fp32"


def relative_errors(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """Median and max relative error of predictions against measurements."""
    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    rel = np.abs(p - m) / m
    return {"median": float(statistics.median(rel)), "max": float(rel.max()), "n": len(rel)}
