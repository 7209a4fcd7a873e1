"""Search under Ray Tune: orchestration overhead and search quality (issue 4).

Takes a trained supernet checkpoint directory (`--supernet`, e.g. the `full` strategy on
rotten_tomatoes) and the task it was trained on.

1. Orchestration overhead. `nas_prune.search.driver.run_search` scores N random sub-networks
   (random searcher, FIFO, objectives error and params_ratio) with 1 and with 2 concurrent
   trials. The same configs are then scored by a plain loop in this process, one torch thread,
   through `score_sub_network` with the same `TrialSetup`: the same supernet, the same
   validation batches, the same work as a trial minus Tune (the errors must agree exactly).
   Throughput is sub-networks scored per minute, end to end (Tune: the whole `run_search`
   call, its worker start and supernet load included; loop: supernet and data load included)
   and in steady state (Tune: completions after the first `workers` ones over the time since
   then; loop: after the load).
2. Search quality. Each method (searcher, `+moasha` for the MO-ASHA scheduler) runs
   `--budget` trials per seed. Hypervolume is taken over each run's complete evaluations
   (trials stopped early by MO-ASHA are left out, their error covers part of the validation
   set only) with objectives (error, params_ratio), both minimised, under two explicit
   normalisations: min-max bounds fitted to all runs' points pooled (`pareto.Normaliser`,
   reference point 1.1 per objective) and Klein et al.'s quantile transform over all runs
   (`pareto.quantile_normalise`, reference point 2 per objective, best possible 4). The
   bounds and reference points are printed. Every run scores the same validation subset
   (`valid_seed`), so the spread over seeds is the searchers' own, not that of the examples.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import command_line, machine_summary, markdown_table, quiet_transformers

from nas_prune import data as data_lib
from nas_prune.checkpoint import read_meta
from nas_prune.options import SearchOptions, TaskOptions
from nas_prune.search import pareto
from nas_prune.search.driver import check_checkpoint, run_search
from nas_prune.search.worker import TrialSetup, resident_evaluator, score_sub_network

log = logging.getLogger("bench_search")

OBJECTIVES = ["error", "params_ratio"]
TARGETS = {1: 0.8, 2: 1.6}
"""Issue 4: Tune's throughput at least 0.8x the loop's with one worker, more than 1.6x with two."""


def completions_per_minute(times: list[float], workers: int) -> float:
    """Steady-state rate from sorted completion times: completions after the first `workers`
    over the time since the `workers`-th one."""
    if len(times) <= workers:
        return float("nan")
    return 60 * (len(times) - workers) / (times[-1] - times[workers - 1])


def options(args, **overrides) -> SearchOptions:
    values = {"objectives": OBJECTIVES, "valid_examples": args.valid_examples,
              "batch_size": args.batch_size, **overrides}
    return SearchOptions(**values)


def overhead(args, work: Path) -> tuple[list[list[str]], dict]:
    """Part 1: Tune vs a plain loop. Rows of the table and raw numbers."""
    raw: dict = {"tune": {}, "loop": {}}
    frames = {}
    for workers in args.workers:
        opts = options(args, searcher="random", num_samples=args.overhead_samples, seed=0,
                       num_workers=workers)
        started = time.perf_counter()
        frame = run_search(args.supernet, args.task, work / "results", f"overhead-w{workers}",
                           opts, storage_path=work / "tune")
        wall = time.perf_counter() - started
        frames[workers] = frame
        done = sorted(frame["wall_time_s"])
        raw["tune"][workers] = {"wall_s": wall, "n": len(frame), "completions_s": done,
                                "eval_s": frame["eval_time_s"].tolist()}
        log.info("Tune, %d worker(s): %d sub-networks in %.1f s", workers, len(frame), wall)

    # the same configs (those of the first run), the same setup, in this process
    reference = frames[args.workers[0]]
    configs = [json.loads(c) for c in reference["config"]]
    opts = options(args, searcher="random", num_samples=args.overhead_samples, seed=0)
    # the space and token length run_search takes from the supernet, as it sets them up
    _, space, max_length = check_checkpoint(args.supernet, opts, data_lib.load_task(args.task))
    setup = TrialSetup(str(args.supernet.resolve()), args.task, opts, space, max_length)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        resident_evaluator(setup)  # supernet and validation batches, as a trial worker loads them
        loaded = time.perf_counter()
        errors, stamps = [], []
        for config in configs:
            *_, final = score_sub_network(config, setup)
            errors.append(final["error"])
            stamps.append(time.perf_counter() - loaded)
        finished = time.perf_counter()
    finally:
        torch.set_num_threads(threads)
    loop_wall, load_s = finished - started, loaded - started
    loop_steady = 60 * len(configs) / (finished - loaded)
    loop_e2e = 60 * len(configs) / loop_wall
    mismatch = float(np.max(np.abs(np.asarray(errors) - reference["error"].to_numpy())))
    raw["loop"] = {"wall_s": loop_wall, "load_s": load_s, "n": len(configs),
                   "completions_s": stamps, "max_abs_error_diff_vs_tune": mismatch}
    log.info("loop: %d sub-networks in %.1f s (load %.1f s)", len(configs), loop_wall, load_s)

    rows = [["plain loop (1 thread)", str(len(configs)), f"{loop_wall:.1f}", f"{load_s:.1f}",
             f"{loop_e2e:.1f}", f"{loop_steady:.1f}", "1.00 / 1.00", "-"]]
    for workers in args.workers:
        t = raw["tune"][workers]
        e2e = 60 * t["n"] / t["wall_s"]
        steady = completions_per_minute(t["completions_s"], workers)
        target = TARGETS.get(workers)
        verdict = "-"
        if target is not None:
            ok = e2e / loop_e2e >= target if workers == 1 else e2e / loop_e2e > target
            verdict = f"{'>=' if workers == 1 else '>'} {target}: {'yes' if ok else 'NO'}"
        rows.append([f"Tune, {workers} worker{'s' if workers > 1 else ''}", str(t["n"]),
                     f"{t['wall_s']:.1f}", "-", f"{e2e:.1f}", f"{steady:.1f}",
                     f"{e2e / loop_e2e:.2f} / {steady / loop_steady:.2f}", verdict])
    raw["mean_eval_s"] = float(np.mean(raw["tune"][args.workers[0]]["eval_s"]))
    return rows, raw


def quality(args, work: Path) -> tuple[list[str], list[list[str]], list[list[str]], dict]:
    """Part 2: hypervolume per method and seed. Header notes, per-run rows, summary rows, raw."""
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            searcher, _, scheduler = method.partition("+")
            scheduler = scheduler or "fifo"
            moasha = scheduler == "moasha"
            opts = options(args, searcher=searcher, scheduler=scheduler,
                           num_samples=args.budget, seed=seed, valid_seed=args.valid_seed,
                           num_workers=args.quality_workers,
                           max_t=args.moasha_max_t if moasha else 1,
                           grace_period=args.grace_period,
                           reduction_factor=args.reduction_factor)
            name = f"quality-{method.replace('+', '-')}-s{seed}"
            started = time.perf_counter()
            frame = run_search(args.supernet, args.task, work / "results", name, opts,
                               storage_path=work / "tune")
            wall = time.perf_counter() - started
            final = frame.sort_values("fidelity").groupby("trial_id").tail(1)
            max_fidelity = frame["fidelity"].max()
            complete = final[final["fidelity"] >= max_fidelity]
            runs.append({
                "method": method, "seed": seed, "wall_s": wall, "trials": len(final),
                "full_equivalents": float(final["fidelity"].sum() / max_fidelity),
                "points": complete[OBJECTIVES].to_numpy(float),
            })
            log.info("%s seed %d: %d trials (%d complete) in %.0f s", method, seed, len(final),
                     len(complete), wall)

    pooled = np.concatenate([r["points"] for r in runs])
    normaliser = pareto.Normaliser.fit(pooled)
    minmax_ref = np.full(len(OBJECTIVES), pareto.DEFAULT_REFERENCE)
    quantile_ref = np.full(len(OBJECTIVES), pareto.QUANTILE_REFERENCE)
    transformed = pareto.quantile_normalise([r["points"] for r in runs])
    for run, q in zip(runs, transformed, strict=True):
        record = pareto.hypervolume_record(run["points"], normaliser, minmax_ref)
        run["hv_minmax"] = record["hypervolume"]
        run["hv_quantile"] = pareto.hypervolume(q, quantile_ref)
        run["front"] = int(pareto.pareto_mask(run["points"]).sum()) if len(run["points"]) else 0
        best = run["points"][:, 0].min() if len(run["points"]) else float("nan")
        run["best_error"] = float(best)

    notes = [
        f"min-max normalisation (`pareto.Normaliser.fit` on all {len(pooled)} complete "
        f"evaluations of all runs): lower {np.round(normaliser.lower, 4).tolist()}, upper "
        f"{np.round(normaliser.upper, 4).tolist()} for ({', '.join(OBJECTIVES)}); reference "
        f"point {minmax_ref.tolist()}",
        "quantile normalisation (`pareto.quantile_normalise` over all runs, Klein et al.): "
        f"reference point {quantile_ref.tolist()}, best possible hypervolume "
        f"{float(np.prod(quantile_ref)):g}",
    ]
    per_run = [[r["method"], str(r["seed"]), str(r["trials"]), f"{r['full_equivalents']:.1f}",
                str(len(r["points"])), str(r["front"]), f"{r['best_error']:.4f}",
                f"{r['hv_minmax']:.4f}", f"{r['hv_quantile']:.4f}", f"{r['wall_s']:.0f}"]
               for r in runs]
    summary = []
    for method in args.methods:
        mine = [r for r in runs if r["method"] == method]
        row = [method, str(len(mine))]
        for key in ("hv_minmax", "hv_quantile"):
            values = [r[key] for r in mine]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            row += [f"{statistics.mean(values):.4f} ± {std:.4f}",
                    f"{min(values):.4f} - {max(values):.4f}"]
        row += [f"{statistics.mean(r['full_equivalents'] for r in mine):.1f}",
                f"{statistics.mean(r['wall_s'] for r in mine):.0f}"]
        summary.append(row)
    raw = {"normaliser": normaliser.to_dict(), "minmax_reference": minmax_ref.tolist(),
           "quantile_reference": quantile_ref.tolist(),
           "runs": [{**r, "points": r["points"].tolist()} for r in runs]}
    return notes, per_run, summary, raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--supernet", type=Path, required=True,
                        help="trained supernet checkpoint directory")
    parser.add_argument("--task", default="rotten_tomatoes",
                        help="task the supernet was trained on (a name or a local file)")
    parser.add_argument("--valid-examples", type=int, default=256,
                        help="validation examples a complete evaluation scores")
    parser.add_argument("--batch-size", type=int, default=32, help="validation batch size")
    parser.add_argument("--overhead-samples", type=int, default=100,
                        help="sub-networks per overhead run (0: skip the overhead part)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="concurrent trials of the overhead runs")
    parser.add_argument("--budget", type=int, default=100,
                        help="trials (sub-network evaluations) per search run (0: skip)")
    parser.add_argument("--methods", nargs="+",
                        default=["random", "local", "morea", "nsga2", "random+moasha"],
                        help="searchers, `searcher+moasha` for the MO-ASHA scheduler")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--valid-seed", type=int, default=0,
                        help="seed of the validation subset every search-quality run scores")
    parser.add_argument("--quality-workers", type=int, default=2,
                        help="concurrent trials of the search-quality runs")
    parser.add_argument("--moasha-max-t", type=int, default=4,
                        help="MO-ASHA: validation chunks of a complete evaluation")
    parser.add_argument("--grace-period", type=int, default=1, help="MO-ASHA grace period")
    parser.add_argument("--reduction-factor", type=float, default=2.0,
                        help="MO-ASHA reduction factor")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the Parquet results and Tune state here (default: a "
                             "temporary directory, removed at the end)")
    parser.add_argument("--json", type=Path, default=None, help="also write raw numbers here")
    args = parser.parse_args()
    if not (args.supernet / "config.json").exists():
        parser.error(f"{args.supernet} is not a checkpoint directory (no config.json)")
    args.task = TaskOptions(task=args.task)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("nas_prune").setLevel(logging.WARNING)
    quiet_transformers()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import ray

    started = time.perf_counter()
    load_before = os.getloadavg()
    cpus = max([*args.workers, args.quality_workers])
    ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_search.", dir=args.workdir))
    try:
        part1 = overhead(args, work) if args.overhead_samples else None
        part2 = quality(args, work) if args.budget else None
    finally:
        ray.shutdown()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()

    meta = read_meta(args.supernet)
    print(f"Command: `{command_line()}`\n")
    print(f"Machine: {machine_summary()}\n")
    print(f"Supernet: {args.supernet} (strategy {meta.get('strategy')}, space "
          f"{meta.get('space')}, task {meta.get('task')}, base {meta.get('base_model')}). "
          f"Task {args.task.task}, {args.valid_examples} validation examples per complete "
          f"evaluation (search quality: subset seed {args.valid_seed}) in batches of "
          f"{args.batch_size}. Ray with {cpus} CPUs. Load average "
          f"before/after: {load_before[0]:.2f} / {load_after[0]:.2f}.\n")
    if max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1):
        print("WARNING: other processes were using the CPU during this run; throughput is "
              "lower and noisier than on a quiet machine.\n")
    raw: dict = {"command": command_line(), "machine": machine_summary()}
    if part1:
        rows, raw["overhead"] = part1
        print(f"**Orchestration overhead** (random configs, FIFO, seed 0; mean evaluation "
              f"time inside a trial {raw['overhead']['mean_eval_s']:.2f} s; loop errors vs "
              "Tune's, max abs difference "
              f"{raw['overhead']['loop']['max_abs_error_diff_vs_tune']:.1e})\n")
        print(markdown_table(
            ["how", "sub-networks", "wall s", "of which load s", "per minute, end to end",
             "per minute, steady", "x loop (end to end / steady)", "target (end to end)"],
            rows) + "\n")
    if part2:
        notes, per_run, summary, raw["quality"] = part2
        print(f"**Search quality** ({args.budget} trials per run, objectives "
              f"{', '.join(OBJECTIVES)}; MO-ASHA: {args.moasha_max_t} validation chunks, "
              f"grace period {args.grace_period}, reduction factor {args.reduction_factor}; "
              f"{args.quality_workers} concurrent trials)\n")
        for note in notes:
            print(f"* {note}")
        print()
        print(markdown_table(
            ["method", "runs", "HV min-max, mean ± std", "min - max", "HV quantile, mean ± std",
             "min - max", "full evaluations", "wall s"], summary) + "\n")
        print(markdown_table(
            ["method", "seed", "trials", "full evaluations", "complete", "front", "best error",
             "HV min-max", "HV quantile", "wall s"], per_run) + "\n")
    print(f"Script run time: {elapsed:.0f} s.")
    if args.json:
        raw["elapsed_s"] = elapsed
        args.json.write_text(json.dumps(raw, indent=1, default=_jsonable))


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


if __name__ == "__main__":
    main()
