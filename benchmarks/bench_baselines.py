"""Baselines vs. the NAS Pareto front on Rotten Tomatoes with MiniLM (issue 7).

On one fine-tuned MiniLM teacher and one data split, this runs, through
`nas_prune.baselines.run_method` (the code `nas-prune baseline` runs):

* PINS (Ren & Zhu 2023) at 50% and 80% sparsity of the encoder's weight matrices;
* GRAIN (Yang et al. 2023) at 50%, 20% and 10% of the encoder weights;
* layer dropping: the first 1 and 3 of MiniLM's 6 layers, fine-tuned;

then prints one Markdown table (validation accuracy, parameters as a fraction of the dense
model, CPU latency of each saved model as stored and its speedup over the dense teacher, and
the best NAS sub-network within the same parameter budget) and writes one plot (the NAS
front, every baseline point and the dense model; `nas_prune.report.plot_pareto`).

NAS results come from an existing `nas-prune run` directory (`--run DIR`: its teacher and its
`results/`), so baselines and NAS share the teacher; the data options are this script's, whose
defaults are the `quick` preset's (pass the run's own if it used others). Without `--run` a
teacher is fine-tuned here and the NAS column is left empty (or read from `--nas-results`).

Defaults (about 25-30 min on a 2-core CPU, 1 torch thread for latency): the `quick` preset's
data (2,500 examples per split, 64 tokens), 150 optimizer steps (batch 16, ~1 epoch) per PINS
and GRAIN model instead of the papers' 20 epochs, 80 steps (batch 32) per layer-dropped model;
latency at batch 1 x 128 tokens, median of 10 runs. PINS and GRAIN are therefore far from
converged: the table is a like-for-like comparison at a small, equal training budget, not a
reproduction of the papers' numbers. Rows land in `<workdir>/results` (Parquet) and can be
re-plotted with `nas-prune report`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
from pathlib import Path

from _common import REPO, command_line, machine_summary, markdown_table, quiet_transformers

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions"))

import pandas as pd  # noqa: E402

from nas_prune import baselines, registry, report, results  # noqa: E402
from nas_prune import data as data_lib  # noqa: E402
from nas_prune import train as train_lib  # noqa: E402
from nas_prune.checkpoint import read_meta  # noqa: E402
from nas_prune.evaluate import dense_evaluation  # noqa: E402
from nas_prune.options import FinetuneOptions, ProfileOptions, TaskOptions  # noqa: E402


def _teacher(args: argparse.Namespace, task_options: TaskOptions) -> Path:
    if args.run:
        return args.run / "teacher"
    if args.teacher:
        return args.teacher
    out = args.workdir / "teacher"
    if not read_meta(out).get("finished"):
        tokenizer = data_lib.load_tokenizer(args.model)
        task = data_lib.tokenize(data_lib.load_task(task_options), tokenizer, args.max_length)
        opts = FinetuneOptions(epochs=args.teacher_epochs, batch_size=32, lr=1e-4,
                               max_length=args.max_length)
        train_lib.finetune(args.model, task, out, opts, tokenizer=tokenizer)
    return out


def _nas_rows(path: Path | None) -> pd.DataFrame:
    if path is None or not (path / "evaluations").exists():
        return pd.DataFrame()
    frame = report.final_rows(results.load(path))
    return frame[(frame["method"] == "nas") & (frame["status"] == "ok")]


def _nas_at(nas: pd.DataFrame, budget: float) -> tuple[str, str]:
    """Best NAS accuracy (and its params ratio) with at most `budget` of the dense params."""
    if nas.empty:
        return "n/a", ""
    within = nas[nas["params_ratio"] <= budget + 1e-9]
    if within.empty:
        return "none", ""
    best = within.sort_values("error").iloc[0]
    return f"{best['metric_value']:.4f}", f"{best['params_ratio']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a `nas-prune run` output dir: its teacher and "
                        "results/ (the NAS front) are used")
    parser.add_argument("--teacher", type=Path, help="fine-tuned teacher (instead of --run)")
    parser.add_argument("--nas-results", type=Path, help="NAS results dir (instead of --run)")
    parser.add_argument("--model", default=data_lib.default_model_path(),
                        help="pre-trained model for a teacher fine-tuned here (default: the "
                        "offline MiniLM)")
    parser.add_argument("--workdir", type=Path, default=REPO / "out" / "bench_baselines",
                        help="models, results and the plot go here")
    parser.add_argument("--max-examples", type=int, default=2500,
                        help="cap on each split (the quick preset's 2,500)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example")
    parser.add_argument("--teacher-epochs", type=float, default=2.0,
                        help="fine-tuning epochs of a teacher trained here")
    parser.add_argument("--pins-steps", type=int, default=150, help="steps per PINS model")
    parser.add_argument("--pins-sparsities", type=float, nargs="+", default=[0.5, 0.8])
    parser.add_argument("--grain-steps", type=int, default=150, help="steps per GRAIN model")
    parser.add_argument("--grain-ratios", type=float, nargs="+", default=[0.5, 0.2, 0.1],
                        help="fractions of the encoder weights GRAIN keeps")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 3],
                        help="layer counts kept by layer dropping")
    parser.add_argument("--layer-drop-steps", type=int, default=80,
                        help="fine-tuning steps per layer-dropped model")
    parser.add_argument("--methods", nargs="+", default=list(registry.BASELINES),
                        choices=list(registry.BASELINES))
    parser.add_argument("--latency-repeats", type=int, default=10)
    parser.add_argument("--latency-rounds", type=int, default=5,
                        help="interleaved latency rounds over all models for the table")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the models and rows of an earlier run in --workdir (only "
                        "re-measure latency and re-tabulate)")
    parser.add_argument("--plot", type=Path, help="PNG path (default: WORKDIR/baselines.png)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quiet_transformers()

    task_options = TaskOptions(task="rotten_tomatoes", max_examples=args.max_examples, seed=0)
    teacher = _teacher(args, task_options)
    nas = _nas_rows(args.nas_results or (args.run / "results" if args.run else None))
    tokenizer = data_lib.load_tokenizer(str(teacher))
    latency = ProfileOptions(seq_len=128, repeats=args.latency_repeats, threads=1)
    method_options = {
        "pins": {"sparsities": args.pins_sparsities, "max_steps": args.pins_steps,
                 "eval_every": 50, "eval_examples": 500, "max_length": args.max_length},
        "grain": {"target_ratios": args.grain_ratios, "max_steps": args.grain_steps,
                  "batch_size": 16, "max_length": args.max_length},
        "layer_drop": {"layers": args.layers, "max_steps": args.layer_drop_steps,
                       "batch_size": 32, "lr": 1e-4, "max_length": args.max_length},
    }
    store_root = args.workdir / "results"
    rows_file = args.workdir / "rows.json"
    reused = args.reuse and rows_file.exists()
    if reused:  # models and rows of an earlier run: only re-measure and re-tabulate
        rows = json.loads(rows_file.read_text())
    else:
        rows = []
        for name in args.methods:
            opts = baselines.make_options(name, method_options[name])
            task = data_lib.tokenize(data_lib.load_task(task_options), tokenizer,
                                     opts.max_length)
            rows += baselines.run_method(name, teacher, task, tokenizer,
                                         args.workdir / "baselines" / name, opts, store_root,
                                         latency=latency)
        rows_file.write_text(json.dumps(rows, indent=2, default=str))
    task = data_lib.tokenize(data_lib.load_task(task_options), tokenizer, args.max_length)
    dense = dense_evaluation(teacher, task, tokenizer)
    dense.update(baselines.measure_latency(teacher, latency))
    if not reused:
        results.ResultStore(store_root, "bench-dense").append_evaluations([dense])

    # one latency measurement per model is at the mercy of the moment; the table uses the
    # median over interleaved rounds of every model (dense included)
    dirs = {"dense": teacher, **{r["trial_id"]: args.workdir / "baselines" / r["method"]
                                 / r["trial_id"] for r in rows}}
    samples: dict[str, list[float]] = {key: [] for key in dirs}
    for _ in range(args.latency_rounds):
        for key, path in dirs.items():
            samples[key].append(baselines.measure_latency(path, latency)["latency_ms"])
    ms = {key: statistics.median(values) for key, values in samples.items()}
    spread = max((max(v) - min(v)) / statistics.median(v) for v in samples.values())

    table = [["dense", "-", f"{dense['metric_value']:.4f}", "1.000", f"{ms['dense']:.2f}",
              "1.00x", *_nas_at(nas, 1.0)]]
    for row in rows:
        table.append([row["method"], row["trial_id"], f"{row['metric_value']:.4f}",
                      f"{row['params_ratio']:.3f}", f"{ms[row['trial_id']]:.2f}",
                      f"{ms['dense'] / ms[row['trial_id']]:.2f}x",
                      *_nas_at(nas, row["params_ratio"])])
    png = args.plot or args.workdir / "baselines.png"
    frame = pd.concat([nas, results.load(store_root)], ignore_index=True)
    measured = frame["trial_id"].map(ms)  # the table's latencies in the plot too
    frame["latency_ms"] = measured.where(frame["method"] != "nas", frame["latency_ms"])
    report.plot_pareto(frame, png, dense=pd.Series({**dense, "latency_ms": ms["dense"]}))
    print(f"Command: `{command_line()}`\n")
    print(f"Machine: {machine_summary([1])}\n")
    print(f"Teacher: {teacher}; NAS results: {len(nas)} sub-networks; plot: {png}\n")
    print(markdown_table(
        ["method", "model", "valid accuracy", "params ratio", "CPU latency (ms)",
         "speedup vs dense", "best NAS accuracy within the budget", "its params ratio"],
        table))
    print(f"\nLatency: batch 1 x 128 tokens, 1 thread, median of {args.latency_repeats} runs per "
          f"measurement, median over {args.latency_rounds} interleaved rounds; largest spread "
          f"(max - min) / median of any model over the rounds: {spread:.0%}.")


if __name__ == "__main__":
    main()
