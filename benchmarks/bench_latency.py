"""CPU latency of MiniLM sub-networks vs their FLOPs, and the latency predictor's error (issue 5).

Two measurements, both through nas_prune.profile's own code (what `nas-prune profile` and the
`latency:<hardware>` search objectives use):

1. Speed vs FLOPs. Sub-networks of the SMALL space (all layers at about 75 / 50 / 25% of the
   heads and FFN neurons, and the first half of the layers whole) are timed by a
   `nas_prune.profile.Profiler` in this process: each is cut out as a physically smaller model
   (`extract_sub_network`) and its forward pass on a fixed random batch is timed by
   `time_callable` (warm-up, repeats, median), fp32 with a pinned torch thread count, at every
   batch size x sequence length asked for. Each round times every sub-network once in a
   shuffled order (load from other processes spreads over all of them); the table gives the
   median over rounds of the per-round medians. The speedup over the full model is compared
   with its limit, 1 / FLOPs ratio (`model.flops(sub, seq_len)`).
2. Predictor error. For each shape and clock asked for, `measure_tables` builds the lookup
   table (Kwon et al.: the fixed part, one attention block per head count, one FFN block per
   neuron count, each timed on extracted models run whole) in a Ray profiler actor on the
   `cpu` hardware type, `profile_configs` measures N random configs (seeded) in another
   one, and `relative_errors` compares `LatencyTable.predict` with the measurements (median
   and max relative error, median ratio, Spearman), as a search with `latency="predicted"`
   would see them. `--predictor-space` picks the space the configs come from: small+hidden
   also varies the hidden width (the table is then timed at four widths and interpolated), and
   a decoder supernet (`--model`, with decoder_small[+hidden] or decoder_medium[+hidden] and
   no `--shapes`) is checked for both phases, the prefill and the decode per token. The "wall"
   clock is latency as a user sees it, and on a machine shared with other processes also
   their load; the "thread" clock (CPU time of the timing thread, one torch thread) leaves
   that load out (`nas_prune.profile.CLOCKS`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import random
import statistics
import time
from pathlib import Path

import numpy as np
from _common import command_line, machine_summary, markdown_table, quiet_transformers

from nas_prune import data, metrics
from nas_prune.checkpoint import load_checkpoint
from nas_prune.options import ProfileOptions
from nas_prune.profile import (
    CLOCKS,
    PHASES,
    Profiler,
    is_decoder,
    measure_tables,
    profile_configs,
    relative_errors,
)
from nas_prune.space import SmallSpace, make_space

log = logging.getLogger("bench_latency")


def shape_arg(text: str) -> tuple[int, int]:
    """`BxL` -> (batch size, sequence length)."""
    try:
        batch, length = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected BATCHxLENGTH such as 1x128, got {text!r}") from None
    return batch, length


def candidates(space: SmallSpace, targets: list[float], layer_drop: float):
    """(label, config): the full model, all layers with `target` of the heads and neurons, and
    the first `layer_drop` of the layers whole."""
    out = [("100% (full)", space.largest())]
    for target in sorted(targets, reverse=True):
        out.append((f"{target:.0%}", {
            "num_layers": space.num_layers,
            "num_heads": max(1, round(space.num_heads * target)),
            "num_units": max(1, round(space.num_units * target)),
        }))
    if layer_drop:
        out.append((f"{layer_drop:.0%} layer-drop", {
            "num_layers": max(0, round(space.num_layers * layer_drop)),
            "num_heads": space.num_heads,
            "num_units": space.num_units,
        }))
    return out


def shape_of(config: dict[str, int]) -> str:
    if "num_heads" not in config:  # another space's config: its values in order
        return " / ".join(f"{k}={v}" for k, v in config.items())
    hidden = f" / {config['hidden']}d" if "hidden" in config else ""
    return f"{config['num_layers']}L / {config['num_heads']}H / {config['num_units']}F{hidden}"


def speed_vs_flops(args, model, space, subs) -> tuple[list[list[str]], list[dict]]:
    """Part 1: rows of the speed table and the raw timings."""
    full_label = subs[0][0]
    rows, raw = [], []
    for batch, length in args.shapes:
        settings = ProfileOptions(batch_size=batch, seq_len=length, dtype="fp32",
                                  warmup=args.warmup, repeats=args.repeats,
                                  threads=args.threads)
        profiler = Profiler(args.model, "small", "cpu", settings)
        medians: dict[str, list[float]] = {label: [] for label, _ in subs}
        p90s: dict[str, list[float]] = {label: [] for label, _ in subs}
        order = list(subs)
        load = os.getloadavg()[0]
        for rnd in range(args.rounds):
            random.Random(args.seed * 1000 + rnd).shuffle(order)
            for label, config in order:
                result = profiler.measure(config)
                medians[label].append(result["median_ms"])
                p90s[label].append(result["p90_ms"])
        full_ms = statistics.median(medians[full_label])
        full_flops = model.flops(None, length)
        for label, config in subs:
            ms = statistics.median(medians[label])
            flops_ratio = model.flops(space.to_sub_network(config), length) / full_flops
            time_ratio = ms / full_ms
            spread = (max(medians[label]) - min(medians[label])) / ms
            rows.append([f"{batch} x {length}", label, shape_of(config), f"{flops_ratio:.3f}",
                         f"{ms:.2f}", f"{time_ratio:.3f}", f"{1 / time_ratio:.2f}",
                         f"{1 / flops_ratio:.2f}", f"{flops_ratio / time_ratio:.2f}",
                         f"{spread:.0%}"])
            raw.append({"batch_size": batch, "seq_len": length, "label": label,
                        "config": config, "median_ms": medians[label], "p90_ms": p90s[label],
                        "flops_ratio": flops_ratio})
        log.info("timed %d sub-networks at %dx%d (load average %.2f -> %.2f)", len(subs),
                 batch, length, load, os.getloadavg()[0])
        del profiler
    return rows, raw


def predictor_error(args, space) -> tuple[list[list[str]], list[dict]]:
    """Part 2: rows of the predictor table and the raw predictions and measurements."""
    import ray

    rng = np.random.default_rng(args.seed)
    configs, seen = [], set()
    while len(configs) < args.configs:  # distinct sub-networks (0 layers: one, whatever width)
        config = space.sample(rng)
        key = space.to_sub_network(config)
        if key not in seen:
            seen.add(key)
            configs.append(config)
    if not ray.is_initialized():
        ray.init(num_cpus=1, include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
    rows, raw = [], []
    try:
        for (batch, length), clock in itertools.product(args.predictor_shapes, args.clocks):
            settings = ProfileOptions(hardware=["cpu"], batch_size=batch, seq_len=length,
                                      dtype="fp32", warmup=args.warmup, repeats=args.repeats,
                                      threads=args.threads, clock=clock)
            load = os.getloadavg()[0]
            started = time.perf_counter()
            table = measure_tables(args.model, args.predictor_space, ["cpu"], settings)["cpu"]
            table_s = time.perf_counter() - started
            started = time.perf_counter()
            measured = profile_configs(args.model, args.predictor_space, configs, settings)
            measure_s = time.perf_counter() - started
            load_after = os.getloadavg()[0]
            for phase in PHASES if table.new_tokens else PHASES[:1]:
                column = "median_ms" if phase == "prefill" else "decode_ms"
                measured_ms = [r[column] for r in measured]
                predicted_ms = [table.predict(space.to_sub_network(c), phase) for c in configs]
                errors = relative_errors(predicted_ms, measured_ms)
                rel = np.abs(np.asarray(predicted_ms) - measured_ms) / np.asarray(measured_ms)
                worst = int(np.argmax(rel))
                bias = float(np.median(np.asarray(predicted_ms) / measured_ms))
                rho = metrics.spearman(np.asarray(predicted_ms), np.asarray(measured_ms))
                rows.append([f"{batch} x {length}", clock, phase, str(errors["n"]),
                             f"{errors['median']:.1%}", f"{errors['max']:.1%}",
                             f"{np.percentile(rel, 90):.1%}", f"{bias:.3f}", f"{rho:.3f}",
                             f"{shape_of(configs[worst])}: {predicted_ms[worst]:.2f} vs "
                             f"{measured_ms[worst]:.2f} ms", f"{table_s:.0f} / {measure_s:.0f}",
                             f"{load:.1f} / {load_after:.1f}"])
                raw.append({"batch_size": batch, "seq_len": length, "clock": clock,
                            "phase": phase, "table": table.to_dict(),
                            "configs": configs, "predicted_ms": predicted_ms,
                            "measured_ms": measured_ms, "errors": errors})
                log.info("predictor at %dx%d, %s clock, %s: median error %.1f%%, max %.1f%%",
                         batch, length, clock, phase, 100 * errors["median"],
                         100 * errors["max"])
    finally:
        ray.shutdown()
    return rows, raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="model or supernet checkpoint dir (default: the offline MiniLM)")
    parser.add_argument("--shapes", type=shape_arg, nargs="*",
                        default=[(1, 32), (1, 128), (32, 32), (32, 128)],
                        help="BATCHxLENGTH shapes of the speed table (none: skip it)")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.75, 0.5, 0.25],
                        help="fractions of heads and FFN neurons of the all-layers sub-networks")
    parser.add_argument("--layer-drop", type=float, default=0.5,
                        help="fraction of layers kept whole by the layer-drop variant (0: none)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="speed table: times each sub-network is measured, interleaved")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per measurement")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (pinned)")
    parser.add_argument("--configs", type=int, default=50,
                        help="random configs the predictor is checked on (0: skip)")
    parser.add_argument("--predictor-space", default="small",
                        help="space of the predictor check's configs: small, small+hidden, ... "
                             "or for a decoder --model decoder_small[+hidden], "
                             "decoder_medium[+hidden]")
    parser.add_argument("--predictor-shapes", type=shape_arg, nargs="+",
                        default=[(1, 128), (32, 32)],
                        help="BATCHxLENGTH shapes of the predictor check")
    parser.add_argument("--clocks", choices=sorted(CLOCKS), nargs="+", default=["wall", "thread"],
                        help="CPU timers of the predictor check (thread: needs --threads 1)")
    parser.add_argument("--seed", type=int, default=0, help="config sample and timing order")
    parser.add_argument("--json", type=Path, default=None, help="also write raw timings here")
    args = parser.parse_args()
    for name in ("rounds", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if "thread" in args.clocks and args.threads != 1:
        parser.error("the thread clock times one thread: use --threads 1 or --clocks wall")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quiet_transformers()
    args.model = args.model or data.default_model_path()
    started = time.perf_counter()
    load_before = os.getloadavg()
    model, _ = load_checkpoint(args.model)
    if args.shapes and is_decoder(model.config):
        parser.error("the speed table times encoders: give --shapes with no value for a decoder")
    speed_rows, speed_raw = [], []
    if args.shapes:
        space = SmallSpace.for_model(model.config)
        subs = candidates(space, args.targets, args.layer_drop)
        speed_rows, speed_raw = speed_vs_flops(args, model, space, subs)
    predictor_space = make_space(args.predictor_space, model.config)
    predictor_rows, predictor_raw = (predictor_error(args, predictor_space) if args.configs
                                     else ([], []))
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()

    print(f"Command: `{command_line()}`\n")
    print(f"Machine: {machine_summary([args.threads])}\n")
    print(f"Model: {args.model} ({model.config.num_hidden_layers} layers, "
          f"{model.config.num_attention_heads} heads, FFN {model.config.intermediate_size}). "
          f"fp32, eval mode, no grad; random token ids, no padding. {args.warmup} warm-up + "
          f"{args.repeats} timed runs per measurement. Load average before/after: "
          f"{load_before[0]:.2f} / {load_after[0]:.2f}.\n")
    if max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1):
        print("WARNING: other processes were using the CPU during this run; timings may be "
              "inflated and noisy. Re-run on a quiet machine to confirm.\n")
    if speed_rows:
        print(f"**Speed vs FLOPs** (`Profiler.measure`, extracted sub-networks; median over "
              f"{args.rounds} interleaved rounds of each measurement's median; speedup = full "
              "time / time, its FLOPs limit = 1 / FLOPs ratio; spread = (max - min) / median "
              "over the rounds)\n")
        print(markdown_table(
            ["batch x length", "sub-network", "layers / heads / FFN", "FLOPs ratio",
             "median ms", "time ratio", "speedup", "FLOPs limit", "speedup / limit", "spread"],
            speed_rows) + "\n")
    if predictor_rows:
        print(f"**Lookup-table predictor vs measurement** ({args.configs} distinct random "
              f"{args.predictor_space} configs, seed {args.seed}; table by `measure_tables`, "
              "measurements by `profile_configs`, each in a Ray profiler actor on the `cpu` "
              "type; phase = forward pass or prefill, or decode per token; ratio = median "
              "predicted / measured; Spearman = rank correlation; load = load average before "
              "the table / after the measurements)\n")
        print(markdown_table(
            ["batch x length", "clock", "phase", "configs", "median rel. error",
             "max rel. error",
             "p90 rel. error", "ratio", "Spearman", "worst: predicted vs measured",
             "table s / measure s", "load"],
            predictor_rows) + "\n")
    print(f"Script run time: {elapsed:.0f} s.")
    if args.json:
        args.json.write_text(json.dumps({"command": command_line(),
                                         "machine": machine_summary([args.threads]),
                                         "speed": speed_raw, "predictor": predictor_raw,
                                         "elapsed_s": elapsed}, indent=1))


if __name__ == "__main__":
    main()
