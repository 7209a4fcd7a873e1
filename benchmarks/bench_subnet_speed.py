"""Evaluation time of sub-networks vs their FLOPs (issue 2: sub-networks must be cheaper).

Sub-networks of the SMALL search space at about 25%, 50% and 75% (and 100%) of the encoder's
parameters (`num_params(sub, encoder_only=True)`) are timed on a fixed set of real Rotten
Tomatoes sentences (eval mode, `torch.no_grad`, forward only, dynamic padding per batch):

* supernet: the full model with `set_sub_network(sub)` (forward runs on weight slices);
* exported: `export_sub_network` to a temporary directory, loaded back with
  `AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)`;
* masking: the reference code's approach (Klein et al.) keeps the full network and multiplies
  head outputs and FFN activations by 0/1 masks, so it costs the full network's time whatever
  the sub-network. The table shows that (time ratio 1.0); one masked sub-network is also timed
  for real (the stock transformers BERT with forward hooks that apply the masks) to check it.

Every timed pass covers all batches; passes of all models are interleaved in a shuffled order
within each repeat (so load from other processes spreads over all of them) and the median over
the repeats is reported. Ratios are relative to the full network run through the supernet.
FLOPs are `model.flops(sub, seq_len)` summed over the actual padded batches.

With ``--decoder [smollm2|PATH]`` (issue 14) the same target is measured for a Llama-family
decoder (default: the offline SmolLM2-135M, `nas_prune.models.resolve("smollm2")`), on one
thread: `DECODER_CONFIGS`, decoder_small and decoder_medium sub-networks from the full network
down to about 0.2 of its FLOPs, are timed as prefill (one forward pass over a batch of random
prompts, no KV cache) through the supernet's sliced forward, in shuffled interleaved rounds,
against the full network (time ratio / FLOPs ratio <= 1.3). Then `DECODE_CONFIGS` of them are
exported (`export_sub_network`), loaded back (`nas_prune.models.load_pretrained(dir, "lm")`),
checked against the supernet and timed with `nas_prune.profile.decoder_timings`: per-token
greedy decode with the KV cache after a prompt, to show decode latency falling with size.
The clock is the thread's CPU time when the machine is loaded (``--clock auto``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _common import (
    command_line,
    default_model_dir,
    machine_summary,
    make_batches,
    markdown_table,
    quiet_transformers,
    rotten_tomatoes_sentences,
)
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from nas_prune.export import export_sub_network
from nas_prune.space import DecoderMediumSpace, DecoderSmallSpace, SmallSpace
from nas_prune.supernet import EncoderForSequenceClassification, SubNetwork, load_pretrained

TARGET = 1.3
"""Issue 2's target: time ratio / FLOPs ratio at most this."""


@dataclass
class Candidate:
    """One sub-network of the small space and its static costs."""

    label: str
    config: dict[str, int]
    sub: SubNetwork
    params_ratio: float = 0.0
    flops_ratio: float = 0.0
    times: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    """(mode, threads) -> wall-clock seconds per pass, one per repeat."""
    cpu_times: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    """(mode, threads) -> CPU seconds of this process per pass (all its threads)."""

    @property
    def shape(self) -> str:
        c = self.config
        return f"{c['num_layers']}L / {c['num_heads']}H / {c['num_units']}F"


def choose_uniform(model, space: SmallSpace, target: float, tol: float) -> dict[str, int]:
    """All layers kept; (num_heads, num_units) with encoder-params ratio within `tol` of
    `target`, heads and units scaled as evenly as possible (then closest ratio)."""
    full = model.num_params(encoder_only=True)
    best, best_key = None, None
    for h in range(1, space.num_heads + 1):
        for u in range(1, space.num_units + 1):
            config = {"num_layers": space.num_layers, "num_heads": h, "num_units": u}
            ratio = model.num_params(space.to_sub_network(config), encoder_only=True) / full
            err = abs(ratio - target)
            imbalance = abs(h / space.num_heads - u / space.num_units)
            key = (err > tol, imbalance if err <= tol else err, err)
            if best_key is None or key < best_key:
                best, best_key = config, key
    return best


def choose_layer_drop(model, space: SmallSpace, target: float) -> dict[str, int]:
    """Full-width layers; the number of (leading) layers whose params ratio is closest."""
    full = model.num_params(encoder_only=True)
    configs = [
        {"num_layers": n, "num_heads": space.num_heads, "num_units": space.num_units}
        for n in range(1, space.num_layers + 1)
    ]
    return min(
        configs,
        key=lambda c: abs(
            model.num_params(space.to_sub_network(c), encoder_only=True) / full - target
        ),
    )


def batch_flops(model, sub: SubNetwork, batches) -> int:
    """FLOPs of `sub` over the actual batches (padded length of each batch)."""
    return sum(b["input_ids"].shape[0] * model.flops(sub, b["input_ids"].shape[1]) for b in batches)


def add_mask_hooks(hf_model, sub: SubNetwork, head_dim: int) -> None:
    """Emulate the reference code's masking on a stock transformers BERT/RoBERTa: the full
    network runs; head outputs (attention context) and FFN activations are multiplied by 0/1."""
    layers = hf_model.base_model.encoder.layer
    for layer, heads, units in zip(layers, sub.heads, sub.units, strict=True):
        n_heads = layer.attention.self.num_attention_heads
        n_units = layer.intermediate.dense.out_features
        head_mask = torch.zeros(n_heads)
        head_mask[list(range(heads)) if isinstance(heads, int) else list(heads)] = 1.0
        head_mask = head_mask.repeat_interleave(head_dim)
        unit_mask = torch.zeros(n_units)
        unit_mask[list(range(units)) if isinstance(units, int) else list(units)] = 1.0

        def mask_heads(_module, _inputs, output, m=head_mask):
            return (output[0] * m, *output[1:])

        def mask_units(_module, _inputs, output, m=unit_mask):
            return output * m

        layer.attention.self.register_forward_hook(mask_heads)
        layer.intermediate.register_forward_hook(mask_units)


@torch.no_grad()
def logits(model, batches) -> torch.Tensor:
    return torch.cat([model(**b).logits for b in batches])


@torch.no_grad()
def timed_pass(model, batches) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one forward pass over `batches`."""
    start, cpu = time.perf_counter(), time.process_time()
    for b in batches:
        model(**b)
    return time.perf_counter() - start, time.process_time() - cpu


def select(net, sub: SubNetwork | None) -> None:
    if sub is not None:
        net.set_sub_network(sub)


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


# ------------------------------------------------------------------------------ decoders

DECODER_CONFIGS: dict[str, tuple[str, dict[str, int]]] = {
    "full": ("decoder_small", {"num_layers": 30, "kv_heads": 3, "queries_per_kv": 3,
                               "units": 1536}),
    "layer-drop 22": ("decoder_small", {"num_layers": 22, "kv_heads": 3, "queries_per_kv": 3,
                                        "units": 1536}),
    "narrow 30": ("decoder_small", {"num_layers": 30, "kv_heads": 2, "queries_per_kv": 3,
                                    "units": 1152}),
    "hidden 384": ("decoder_small", {"num_layers": 30, "kv_heads": 3, "queries_per_kv": 3,
                                     "units": 1536, "hidden": 384}),
    "per-layer taper": ("decoder_medium", {
        **{f"kv_heads_{i}": (3, 1, 0)[i % 3] for i in range(30)},
        **{f"queries_per_kv_{i}": 2 for i in range(30)},
        **{f"units_{i}": 1536 if i < 10 else 768 if i < 20 else 256 for i in range(30)}}),
    "small 24": ("decoder_small", {"num_layers": 24, "kv_heads": 2, "queries_per_kv": 2,
                                   "units": 768}),
    "alternating blocks": ("decoder_medium", {
        **{f"kv_heads_{i}": 2 * (i % 2 == 0) for i in range(30)},
        **{f"queries_per_kv_{i}": 3 for i in range(30)},
        **{f"units_{i}": 1024 * (i % 2) for i in range(30)}}),
    "small 16": ("decoder_small", {"num_layers": 16, "kv_heads": 1, "queries_per_kv": 3,
                                   "units": 512}),
    "small 6": ("decoder_small", {"num_layers": 6, "kv_heads": 1, "queries_per_kv": 2,
                                  "units": 256}),
}
"""Sub-networks of SmolLM2-135M (30 layers, 3 KV heads x 3 queries, MLP 1536, hidden 576) by
label: (space, config). decoder_medium configs give every layer its own shape; "alternating
blocks" keeps attention only in even layers and the MLP only in odd ones. Another decoder gets
its own full network and the configs clipped to its shape (the per-layer ones only when it
has 30 layers)."""

DECODE_CONFIGS = ("full", "layer-drop 22", "per-layer taper", "small 24", "small 16",
                  "small 6")
"""Exported and timed for decode (stock Llama and our class, largest to smallest)."""


CLOCK_NAMES = {"thread": "CPU time of the timing thread, which leaves out time other processes "
               "hold the core", "wall": "wall clock"}


def decoder_sub_networks(model) -> dict[str, tuple[str, object]]:
    """label -> (space name, DecoderSubNetwork) of `DECODER_CONFIGS` for `model`; configs that
    do not fit another decoder's shape are clipped to it (uniform) or left out (per layer)."""
    c = model.config
    spaces = {"decoder_small": DecoderSmallSpace.for_model(c, hidden=True),
              "decoder_medium": DecoderMediumSpace.for_model(c)}
    limits = {"num_layers": c.num_hidden_layers, "kv_heads": c.num_key_value_heads,
              "queries_per_kv": c.queries_per_group, "units": c.intermediate_size,
              "hidden": c.hidden_size}
    subs = {}
    for label, (space, config) in DECODER_CONFIGS.items():
        if label == "full":
            subs[label] = (space, model.full_sub_network)
        elif space == "decoder_small":
            config = {k: min(v, limits[k]) for k, v in config.items()}
            subs[label] = (space, spaces[space].to_sub_network(
                {"hidden": c.hidden_size, **config}))
        elif len(config) == 3 * c.num_hidden_layers:
            config = {k: min(v, limits[k.rsplit("_", 1)[0]]) for k, v in config.items()}
            subs[label] = (space, spaces[space].to_sub_network(config))
    return subs


def describe(sub, hidden: int) -> str:
    """Layers kept, mean KV heads x queries and MLP width over the kept blocks, hidden
    channels (`hidden` when the sub-network keeps them all)."""
    layers = sum(sub.layers)
    attn = [(k, g) for k, g in zip(sub.kv_heads, sub.queries_per_kv, strict=True) if k]
    mlp = [n for n in sub.units if n]
    kv = statistics.mean(k for k, _ in attn) if attn else 0
    q = statistics.mean(g for _, g in attn) if attn else 0
    units = statistics.mean(mlp) if mlp else 0
    return (f"{layers}L ({len(attn)} attn x {kv:.3g}KV x {q:.3g}Q, {len(mlp)} MLP x "
            f"{units:.0f}), h {sub.hidden or hidden}")


def decoder_main(args: argparse.Namespace) -> None:
    """The decoder mode (issue 14): prefill time/FLOPs through the supernet, then exported
    decode latency."""
    from nas_prune.models import load_pretrained, resolve
    from nas_prune.profile import decoder_timings, time_callable

    quiet_transformers()
    torch.set_num_threads(1)
    started = time.perf_counter()
    load_before = os.getloadavg()
    clock = args.clock if args.clock != "auto" else (
        "thread" if load_before[0] > 0.5 else "wall")
    cpu = torch.device("cpu")
    path = resolve(args.decoder)
    model = load_pretrained(path, "lm").eval()
    subs = decoder_sub_networks(model)
    batch, prompt = args.prefill_batch, args.prompt_len
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt),
                        generator=torch.Generator().manual_seed(args.seed))
    full_flops, full_params = model.flops(None, prompt), model.num_params()

    def prefill() -> None:
        with torch.no_grad():
            model(ids)

    samples: dict[str, list[float]] = {label: [] for label in subs}
    for _, sub in subs.values():  # warm-up
        model.set_sub_network(sub)
        prefill()
    order = list(subs)
    for rep in range(args.repeats):
        random.Random(args.seed * 1000 + rep).shuffle(order)
        for label in order:
            model.set_sub_network(subs[label][1])
            samples[label].append(time_callable(prefill, cpu, 0, 1, clock).median_ms)
    load_mid = os.getloadavg()

    # exported: extract, save, load back as the profiler does, check, time decode
    exported: dict[str, dict[str, object]] = {}
    decode: dict[str, list[float]] = {}
    prefill_exp: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_subnet_speed.") as tmp:
        loaded = {}
        for label in (lb for lb in DECODE_CONFIGS if lb in subs):
            sub = subs[label][1]
            out = export_sub_network(model, sub, Path(tmp) / label.replace(" ", "_"))
            config = json.loads((out / "config.json").read_text())
            small = load_pretrained(str(out), "lm").eval()
            model.set_sub_network(sub)
            with torch.no_grad():
                diff = float((small(ids[:1]).logits - model(ids[:1]).logits).abs().max())
            exported[label] = {"as": config["architectures"][0], "diff": diff,
                               "params": small.num_params()}
            loaded[label] = small
        model.reset_super_network()
        order = list(loaded)
        for rep in range(args.repeats):
            random.Random(args.seed * 1000 + 500 + rep).shuffle(order)
            for label in order:
                pre, dec = decoder_timings(loaded[label], 1, prompt, args.new_tokens, cpu,
                                           warmup=1 if rep == 0 else 0, repeats=1,
                                           clock=clock, seed=args.seed)
                prefill_exp.setdefault(label, []).append(pre.median_ms)
                decode.setdefault(label, []).append(dec.median_ms)
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()

    # ------------------------------------------------------------------------------ report
    print(f"Command: `{command_line()}`\n")
    print(f"Machine: {machine_summary([1])}\n")
    print(f"Model: {path} ({model.config.family}, {model.config.num_hidden_layers} layers, "
          f"{model.config.num_key_value_heads} KV heads x {model.config.queries_per_group} "
          f"queries, MLP {model.config.intermediate_size}, hidden {model.config.hidden_size}, "
          f"{full_params:,} parameters, {model.dtype}). Prefill: {batch} x {prompt} random "
          f"tokens, no KV cache, {args.repeats} shuffled interleaved rounds after one warm-up "
          f"pass each; medians. Clock: {clock} ({CLOCK_NAMES[clock]}). "
          f"Load average (1 min) before / after prefill / at the end: {load_before[0]:.2f} / "
          f"{load_mid[0]:.2f} / {load_after[0]:.2f}.\n")
    full_ms = statistics.median(samples["full"])
    headers = ["sub-network", "space", "shape", "params ratio", "FLOPs ratio", "prefill ms",
               "time ratio", "time/FLOPs", f"target <= {TARGET}", "spread"]
    rows, misses = [], []
    for label, (space, sub) in subs.items():
        times = samples[label]
        median = statistics.median(times)
        flops_ratio = model.flops(sub, prompt) / full_flops
        score = median / full_ms / flops_ratio
        if score > TARGET:
            misses.append(f"{label} ({score:.2f}, {score / TARGET - 1:.0%} over)")
        rows.append([label, space, describe(sub, model.config.hidden_size),
                     fmt(model.num_params(sub) / full_params, 3),
                     fmt(flops_ratio, 3), fmt(median, 1), fmt(median / full_ms, 3),
                     fmt(score), "yes" if score <= TARGET else "NO",
                     f"{(max(times) - min(times)) / median:.0%}"])
    print("**Prefill through the supernet (sliced forward)**, relative to the full network "
          f"({fmt(full_ms, 1)} ms); spread = (max - min) / median over the rounds\n")
    print(markdown_table(headers, rows) + "\n")
    print(f"Target (time ratio / FLOPs ratio <= {TARGET}): "
          + (f"met by all {len(rows)} sub-networks." if not misses
             else f"missed by {', '.join(misses)}.") + "\n")

    full_decode = statistics.median(decode["full"]) if "full" in decode else None
    headers = ["sub-network", "exported as", "params", "params ratio", "max abs logit diff",
               "prefill ms (1 x prompt)", "decode ms/token", "decode ratio", "tokens/s"]
    rows, by_size = [], []
    for label, info in exported.items():
        dec = statistics.median(decode[label])
        by_size.append((info["params"], dec, label))
        rows.append([label, info["as"], f"{info['params']:,}",
                     fmt(info["params"] / full_params, 3), f"{info['diff']:.1e}",
                     fmt(statistics.median(prefill_exp[label]), 1), fmt(dec, 2),
                     fmt(dec / full_decode, 3) if full_decode else "-", fmt(1e3 / dec, 1)])
    print(f"**Exported, loaded back and decoded** (greedy, KV cache, batch 1, {prompt}-token "
          f"prompt, {args.new_tokens} new tokens; per-token medians over {args.repeats} "
          "rounds; logit diff: exported vs supernet on one prompt)\n")
    print(markdown_table(headers, rows) + "\n")
    by_size.sort(reverse=True)
    falling = all(a[1] > b[1] for a, b in zip(by_size, by_size[1:], strict=False))
    print("Decode latency falls with size (largest to smallest): "
          + ("yes" if falling else "NO") + ", "
          + " > ".join(f"{label} {ms:.2f}" for _, ms, label in by_size) + " ms/token.\n")
    print(f"Script run time: {elapsed:.0f} s.")
    if args.json:
        args.json.write_text(json.dumps({
            "command": command_line(), "machine": machine_summary([1]), "clock": clock,
            "load": [load_before[0], load_mid[0], load_after[0]], "elapsed_s": elapsed,
            "prefill_ms": samples, "exported_prefill_ms": prefill_exp,
            "decode_ms_per_token": decode}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="pre-trained model dir (default: MiniLM)")
    parser.add_argument("--sentences", type=int, default=512, help="validation sentences")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128, help="truncation length")
    parser.add_argument(
        "--targets",
        type=float,
        nargs="+",
        default=[0.25, 0.5, 0.75],
        help="encoder-params ratios of the all-layers sub-networks",
    )
    parser.add_argument(
        "--tol",
        type=float,
        default=0.01,
        help="accepted |params ratio - target| before balancing heads/units",
    )
    parser.add_argument(
        "--layer-drop",
        type=float,
        default=0.5,
        help="params ratio of the layer-dropping variant (0: none)",
    )
    parser.add_argument(
        "--masking-target",
        type=float,
        default=0.25,
        help="which target's sub-network is also timed with real masks (0: none)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="torch.set_num_threads settings to measure",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per model")
    parser.add_argument(
        "--warmup-batches",
        type=int,
        default=4,
        help="untimed batches per model before timing, per thread setting",
    )
    parser.add_argument("--no-export", action="store_true", help="skip the exported models")
    parser.add_argument("--seed", type=int, default=0, help="sentence sample and pass order")
    parser.add_argument("--json", type=Path, default=None, help="also write raw times here")
    decoder = parser.add_argument_group("decoder mode (issue 14)")
    decoder.add_argument("--decoder", nargs="?", const="smollm2", default=None,
                         help="time a decoder instead: smollm2 (default) or a checkpoint path")
    decoder.add_argument("--prefill-batch", type=int, default=2, help="prompts per prefill")
    decoder.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
    decoder.add_argument("--new-tokens", type=int, default=16, help="decoded tokens per sample")
    decoder.add_argument("--clock", choices=["auto", "wall", "thread"], default="auto",
                         help="auto: the thread's CPU time if the 1-min load average is > 0.5")
    args = parser.parse_args()
    if args.decoder:
        decoder_main(args)
        return

    quiet_transformers()
    torch.manual_seed(args.seed)
    model_dir = args.model or default_model_dir()
    started = time.perf_counter()
    load_before = os.getloadavg()

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = rotten_tomatoes_sentences(args.sentences, args.seed)
    batches = make_batches(tokenizer, texts, args.batch_size, args.max_length)
    lengths = [b["input_ids"].shape[1] for b in batches]
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    model: EncoderForSequenceClassification = load_pretrained(model_dir, num_labels=2).eval()
    space = SmallSpace.for_model(model.config)
    full_params = model.num_params(encoder_only=True)

    candidates = [Candidate("100% (full)", space.largest(), model.full_sub_network)]
    for target in sorted(args.targets, reverse=True):
        config = choose_uniform(model, space, target, args.tol)
        candidates.append(Candidate(f"{target:.0%}", config, space.to_sub_network(config)))
    if args.layer_drop:
        config = choose_layer_drop(model, space, args.layer_drop)
        candidates.append(
            Candidate(f"{args.layer_drop:.0%} layer-drop", config, space.to_sub_network(config))
        )
    full_flops = batch_flops(model, model.full_sub_network, batches)
    for c in candidates:
        c.params_ratio = model.num_params(c.sub, encoder_only=True) / full_params
        c.flops_ratio = batch_flops(model, c.sub, batches) / full_flops

    # (candidate, mode) -> the model to time and the sub-network to select in it (supernet)
    runners: dict[tuple[int, str], tuple[torch.nn.Module, SubNetwork | None]] = {}
    checks: dict[tuple[int, str], float] = {}
    exported_class: dict[int, str] = {}
    reference: dict[int, torch.Tensor] = {}
    check_batches = batches[:2]
    for i, c in enumerate(candidates):
        runners[i, "supernet"] = (model, c.sub)
        model.set_sub_network(c.sub)
        reference[i] = logits(model, check_batches)
    model.reset_super_network()

    tmp = tempfile.TemporaryDirectory(prefix="bench_subnet_speed.")
    if not args.no_export:
        for i, c in enumerate(candidates):
            out = export_sub_network(model, c.sub, Path(tmp.name) / f"sub{i}", tokenizer)
            small = AutoModelForSequenceClassification.from_pretrained(
                out, trust_remote_code=True
            ).eval()
            exported_class[i] = type(small).__name__
            checks[i, "exported"] = float((logits(small, check_batches) - reference[i]).abs().max())
            runners[i, "exported"] = (small, None)

    masked_index = None
    if args.masking_target:
        matches = [i for i, c in enumerate(candidates) if c.label == f"{args.masking_target:.0%}"]
        if matches:
            masked_index = matches[0]
            plain = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
            with torch.no_grad():  # the same (random) classifier as the supernet, to compare
                plain.classifier.weight.copy_(model.head.out.weight)
                plain.classifier.bias.copy_(model.head.out.bias)
            add_mask_hooks(plain.eval(), candidates[masked_index].sub, model.config.head_dim)
            checks[masked_index, "masking"] = float(
                (logits(plain, check_batches) - reference[masked_index]).abs().max()
            )
            runners[masked_index, "masking"] = (plain, None)

    load_during: dict[int, tuple[float, float]] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        load_start = os.getloadavg()[0]
        for net, sub in runners.values():  # warm-up
            select(net, sub)
            timed_pass(net, batches[: args.warmup_batches])
        order = list(runners)
        for rep in range(args.repeats):
            random.Random(args.seed * 1000 + threads * 100 + rep).shuffle(order)
            for i, mode in order:
                net, sub = runners[i, mode]
                select(net, sub)
                wall, cpu = timed_pass(net, batches)
                candidates[i].times.setdefault((mode, threads), []).append(wall)
                candidates[i].cpu_times.setdefault((mode, threads), []).append(cpu)
        load_during[threads] = (load_start, os.getloadavg()[0])
    model.reset_super_network()
    tmp.cleanup()
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()

    # ------------------------------------------------------------------------------ report
    print(f"Command: `{command_line()}`\n")
    print(f"Machine: {machine_summary(args.threads)}\n")
    print(
        f"Data: {args.sentences} Rotten Tomatoes sentences, {len(batches)} batches of "
        f"{args.batch_size}, dynamic padding (padded length mean {statistics.mean(lengths):.1f}, "
        f"max {max(lengths)}; {real_tokens} real tokens). {args.repeats} timed passes per model "
        f"and thread setting after {args.warmup_batches} warm-up batches; medians. "
        f"Load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}.\n"
    )
    if max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1):
        print(
            "WARNING: other processes were using the CPU during this run; timings (above "
            "all with more than one thread) may be inflated and noisy. Re-run on a quiet "
            "machine to confirm.\n"
        )
    headers = [
        "sub-network",
        "layers / heads / FFN",
        "encoder params",
        "params ratio",
        "FLOPs ratio",
        "exported as",
        "max abs logit diff, exported vs supernet",
    ]
    rows = []
    for i, c in enumerate(candidates):
        rows.append(
            [
                c.label,
                c.shape,
                f"{model.num_params(c.sub, encoder_only=True):,}",
                fmt(c.params_ratio, 3),
                fmt(c.flops_ratio, 3),
                exported_class.get(i, "-"),
                f"{checks[i, 'exported']:.1e}" if (i, "exported") in checks else "-",
            ]
        )
    print(markdown_table(headers, rows) + "\n")

    worst_spread = 0.0
    raw: dict[str, object] = {
        "command": command_line(),
        "machine": machine_summary(),
        "lengths": lengths,
        "results": [],
    }
    for threads in args.threads:
        full_time = statistics.median(candidates[0].times["supernet", threads])
        headers = [
            "sub-network",
            "FLOPs ratio",
            "supernet s",
            "time ratio",
            "time/FLOPs",
            "exported s",
            "time ratio",
            "time/FLOPs",
            "masking time ratio",
            "masking time/FLOPs",
            f"target <= {TARGET} (supernet / exported)",
        ]
        rows = []
        for c in candidates:
            row = [c.label, fmt(c.flops_ratio, 3)]
            verdicts = []
            for mode in ("supernet", "exported"):
                times = c.times.get((mode, threads))
                if not times:
                    row += ["-", "-", "-"]
                    verdicts.append("-")
                    continue
                median = statistics.median(times)
                worst_spread = max(worst_spread, (max(times) - min(times)) / median)
                ratio = median / full_time
                row += [fmt(median), fmt(ratio, 3), fmt(ratio / c.flops_ratio)]
                verdicts.append("yes" if ratio / c.flops_ratio <= TARGET else "NO")
                raw["results"].append(
                    {
                        "label": c.label,
                        "mode": mode,
                        "threads": threads,
                        "seconds": times,
                        "cpu_seconds": c.cpu_times[mode, threads],
                        "flops_ratio": c.flops_ratio,
                        "params_ratio": c.params_ratio,
                    }
                )
            row += ["1.000", fmt(1.0 / c.flops_ratio), " / ".join(verdicts)]
            rows.append(row)
        print(
            f"**{threads} thread{'s' if threads > 1 else ''}** "
            f"(ratios relative to the full network through the supernet, {fmt(full_time)} s; "
            "masking computes the full network, so its time ratio is 1.0; load average "
            f"{load_during[threads][0]:.2f} -> {load_during[threads][1]:.2f})\n"
        )
        print(markdown_table(headers, rows) + "\n")

        # Cross-check that is robust to other processes taking the CPU away: process CPU time
        # (with 2+ threads it also counts worker threads' spinning, so it is only indicative).
        full_cpu = statistics.median(candidates[0].cpu_times["supernet", threads])
        cpu_rows = []
        for c in candidates:
            row = [c.label]
            for mode in ("supernet", "exported"):
                cpu = c.cpu_times.get((mode, threads))
                row.append(fmt(statistics.median(cpu) / full_cpu / c.flops_ratio) if cpu else "-")
            cpu_rows.append(row)
        print(
            f"CPU-time cross-check, {threads} thread{'s' if threads > 1 else ''}: "
            "(median process CPU time ratio vs the full supernet) / FLOPs ratio\n"
        )
        print(markdown_table(["sub-network", "supernet", "exported"], cpu_rows) + "\n")

        if masked_index is not None:
            c = candidates[masked_index]
            masked = statistics.median(c.times["masking", threads])
            worst_spread = max(
                worst_spread,
                (max(c.times["masking", threads]) - min(c.times["masking", threads])) / masked,
            )
            raw["results"].append(
                {
                    "label": c.label,
                    "mode": "masking",
                    "threads": threads,
                    "seconds": c.times["masking", threads],
                    "cpu_seconds": c.cpu_times["masking", threads],
                }
            )
            stock = candidates[0].times.get(("exported", threads))
            ratio = masked / full_time
            line = (
                f"Masking measured ({threads} thr.): {c.label} sub-network via stock "
                f"transformers BERT + mask hooks: {fmt(masked)} s = {fmt(ratio, 3)} x the "
                f"full supernet (time/FLOPs {fmt(ratio / c.flops_ratio)})"
            )
            if stock:
                line += (
                    f", {fmt(masked / statistics.median(stock), 3)} x the unmasked stock "
                    "model (exported 100%)"
                )
            line += f"; max abs logit diff vs supernet {checks[masked_index, 'masking']:.1e}."
            print(line + "\n")

    print(
        f"Largest (max - min) / median over the repeats of any cell: {worst_spread:.1%}. "
        f"Script run time: {elapsed:.0f} s."
    )
    if args.json:
        raw["elapsed_s"] = elapsed
        args.json.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
