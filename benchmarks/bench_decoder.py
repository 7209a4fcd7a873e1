"""The decoder targets, measured: SmolLM2-135M pruned for language modelling on the built-in
corpus, NAS against LLM-Pruner and layer dropping on the test split (nas_prune.compare).

Stages (nas_prune.pipeline stage functions; re-running the same command in the same --out
resumes, finished stages are skipped):

1. the pre-trained model is adopted as the teacher (no fine-tuning), or with --teacher-steps
   fine-tuned on the corpus's training blocks first ("teacher correction", Sreenivas et al.
   2024, "LLM Pruning and Distillation in Practice: The Minitron Approach": a teacher that has
   not seen the distillation data distils worse); every method then starts from that teacher
   and the dense row is it; the decoder supernet (space --space, default decoder_small) is
   trained from it with a distilling strategy (--strategy, default ``full``: sandwich +
   in-place distillation);
2. the search scores --trials sub-networks on --valid-blocks validation blocks;
3. the baselines run on the same teacher and blocks: LLM-Pruner at the budgets (its
   ``params_ratios``) and layer dropping (ShortGPT block influence) keeping, per budget, the
   number of layers whose parameter ratio is the closest at or below it; both with
   --baseline-steps recovery steps (0: one-shot);
4. the comparison on the test split (budgets --budgets, at most --test-blocks test blocks, drawn
   with the comparison's seed, the same for every model): each method's model chosen on
   validation perplexity, test perplexity with 95% bootstrap intervals over blocks, paired
   tests against NAS (log-perplexity), training cost;
5. the table: dense test perplexity; per budget and method the chosen model, its params
   ratio, test perplexity [CI], ratio to dense (targets: within 15% at 0.75, 40% at 0.5), the
   paired test against NAS and the training cost; then the exported decode latency of the
   chosen NAS models against the dense model (nas_prune.baselines.measure_latency).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_decoder.py --out build/bench_decoder
    PYTHONPATH=. .venv/bin/python benchmarks/bench_decoder.py --tiny   # smoke run, minutes

--tiny runs everything on a tiny random Llama (word-level tokenizer over the corpus's most
frequent words) with small settings, to check the script, not the targets. The table is
printed and written to OUT/bench_decoder.md; the comparison itself to OUT/compare/.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("bench_decoder")

TARGETS = {0.75: 1.15, 0.5: 1.40}
"""Budget (params ratio) -> the largest test perplexity, relative to the dense model's, the
target allows."""

CORPUS = "convention_speeches"
"""The built-in corpus (nas_prune.corpus)."""

TINY = {"block_length": 32, "steps": 8, "batch_size": 8, "lr": 1e-3, "trials": 8,
        "valid_blocks": 16, "baseline_steps": 2, "test_blocks": 32, "latency_repeats": 2}
"""The settings --tiny overrides (a smoke run of a couple of minutes on a CPU)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", help="run directory (default build/bench_decoder, "
                        "build/bench_decoder_tiny with --tiny)")
    parser.add_argument("--tiny", action="store_true",
                        help=f"a tiny random Llama and small settings ({TINY}): checks the "
                        "script in a couple of minutes")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.5],
                        help="parameter budgets (fraction of the dense model's parameters)")
    parser.add_argument("--block-length", type=int, default=128, help="tokens per block")
    parser.add_argument("--teacher-steps", type=int, default=0,
                        help="fine-tune the pre-trained model on the corpus for this many "
                        "steps of --batch-size blocks before anything else (0: adopt it as is)")
    parser.add_argument("--space", default="decoder_small",
                        choices=["decoder_small", "decoder_medium", "decoder_middle"],
                        help="search space of the supernet and the search")
    parser.add_argument("--strategy", default="full", choices=["kd", "full"],
                        help="supernet strategy (both distil from the full network)")
    parser.add_argument("--steps", type=int, default=200,
                        help="supernet training steps (0: none; the supernet is the teacher "
                        "with importance-sorted heads and neurons)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="blocks per step (supernet, recovery, refine)")
    parser.add_argument("--lr", type=float, default=5e-5,
                        help="peak learning rate (supernet, recovery, refine)")
    parser.add_argument("--trials", type=int, default=60, help="search trials")
    parser.add_argument("--budget-samples", type=int, default=0,
                        help="first trials drawn per budget among configs just below it "
                        "(search.budgets; 0: the searcher alone)")
    parser.add_argument("--valid-blocks", type=int, default=64,
                        help="validation blocks each trial is scored on")
    parser.add_argument("--baseline-steps", type=int, default=50,
                        help="recovery fine-tuning steps of each baseline model (0: one-shot)")
    parser.add_argument("--refine-blocks", type=int, default=0,
                        help="blocks each refined sub-network is distilled on (0: no "
                        "refine)")
    parser.add_argument("--refine-select", choices=["pareto", "budgets"], default="budgets",
                        help="refine every Pareto-optimal sub-network, or per budget the "
                        "validation-best within it (the one the comparison chooses)")
    parser.add_argument("--test-blocks", type=int, default=128,
                        help="test blocks scored per model (0: the whole test split)")
    parser.add_argument("--eval-batch-size", type=int, default=8,
                        help="blocks per scoring forward pass")
    parser.add_argument("--latency-repeats", type=int, default=10,
                        help="timed runs of each latency measurement (median)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and search")
    args = parser.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():  # explicit options win over the tiny settings
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    args.out = Path(args.out or ("build/bench_decoder_tiny" if args.tiny
                                 else "build/bench_decoder"))
    if not args.budgets or not all(0 < b < 1 for b in args.budgets):
        parser.error(f"--budgets must lie in (0, 1), got {args.budgets}")
    return args


# ------------------------------------------------------------------------------ the model
def tiny_model(out: Path, words: int = 500) -> str:
    """A tiny random Llama (6 layers, hidden 64, tied embeddings) with a word-level tokenizer
    over the `words` most frequent words of the corpus's training documents, saved to `out`
    (kept when already there)."""
    if (out / "config.json").exists():
        return str(out)
    from collections import Counter

    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from nas_prune import data

    special = ["<pad>", "<unk>", "</s>"]
    split = pre_tokenizers.Whitespace()
    counts = Counter(w for text in data.load_task(CORPUS).train["text"]
                     for w, _ in split.pre_tokenize_str(text.lower()))
    vocab = {w: i for i, w in enumerate([*special, *(w for w, _ in counts.most_common(words))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = split
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                        unk_token="<unk>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
                         pad_token_id=0, bos_token_id=None, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def layer_keeps(teacher_dir: Path, budgets: list[float]) -> dict[float, tuple[int, float]]:
    """Per budget, the number of layers k a layer-dropping model keeps (the largest whose
    parameter ratio is at most the budget: the closest from below) and that ratio; budgets
    that not even one layer fits are left out."""
    from nas_prune.checkpoint import load_checkpoint
    from nas_prune.decoder import DecoderSubNetwork

    model, _ = load_checkpoint(teacher_dir)
    c = model.config
    dense = model.num_params()
    ratios = {k: model.num_params(DecoderSubNetwork.uniform(
        c.num_hidden_layers, k, c.num_key_value_heads, c.queries_per_group,
        c.intermediate_size)) / dense for k in range(1, c.num_hidden_layers + 1)}
    keeps = {}
    for budget in budgets:
        fits = [k for k, r in ratios.items() if r <= budget]
        if fits:
            keeps[budget] = (max(fits), ratios[max(fits)])
        else:
            log.warning("layer dropping: even one layer keeps %.3f of the parameters, above "
                        "the budget %g; no layer-dropping model there", ratios[1], budget)
    return keeps


# ------------------------------------------------------------------------------ the options
def options(args: argparse.Namespace, model: str) -> Any:
    """The pipeline options of the run (baselines are added once the teacher is known)."""
    from nas_prune.options import PipelineOptions, replace

    length, batch = args.block_length, args.batch_size
    opts = replace(PipelineOptions(), {
        "model": model,
        "data": {"task": CORPUS},
        "finetune": ({"max_steps": args.teacher_steps, "batch_size": batch, "lr": args.lr,
                      "log_every": max(1, args.teacher_steps // 20)}
                     if args.teacher_steps else {"epochs": 0}) | {"max_length": length},
        "supernet": {"strategy": args.strategy, "space": args.space,
                     **({"max_steps": args.steps} if args.steps else {"epochs": 0}),
                     "batch_size": batch, "lr": args.lr,
                     "max_length": length, "rewire_batches": 4, "seed": args.seed,
                     "log_every": max(1, args.steps // 20)},
        "search": {"searcher": "local", "num_samples": args.trials,
                   "valid_examples": args.valid_blocks, "batch_size": args.eval_batch_size,
                   "flops_seq_len": length, "seed": args.seed,
                   **({"budgets": list(args.budgets), "budget_samples": args.budget_samples}
                      if args.budget_samples else {})},
        "profile": {"enabled": False, "seq_len": length, "warmup": 1,
                    "repeats": args.latency_repeats},
        "refine": {"enabled": args.refine_blocks > 0, "examples": args.refine_blocks or None,
                   "select": args.refine_select,
                   "batch_size": batch, "lr": args.lr, "max_length": length,
                   "flops_seq_len": length, "log_every": 10},
        "compare": {"budgets": list(args.budgets),
                    "reference": "nas+refine" if args.refine_blocks else "nas",
                    "batch_size": args.eval_batch_size},
    })
    return replace(opts, {"compare": {"max_test_examples": args.test_blocks or None}})


def with_baselines(opts: Any, args: argparse.Namespace, keeps: dict[float, tuple[int, float]]
                   ) -> Any:
    """`opts` with LLM-Pruner at the budgets and layer dropping at `keeps`."""
    from nas_prune.options import replace

    common = {"batch_size": args.batch_size, "lr": args.lr, "max_length": args.block_length,
              "seed": args.seed}
    layers = sorted({k for k, _ in keeps.values()})
    baselines = {"llm_pruner": {**common, "params_ratios": sorted(args.budgets),
                                "recovery_steps": args.baseline_steps}}
    if layers:
        baselines["layer_drop"] = {**common, "layers": layers,
                                   "finetune": args.baseline_steps > 0,
                                   "max_steps": max(1, args.baseline_steps)}
    return replace(opts, {"baselines": list(baselines), "baseline_options": baselines})


# ------------------------------------------------------------------------------ the table
def _num(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def bench_table(frame: Any, latency: list[dict[str, Any]], args: argparse.Namespace,
                keeps: dict[float, tuple[int, float]], seconds: dict[str, float]) -> str:
    """The benchmark's Markdown: the comparison by budget with the targets, then the decode
    latency of the chosen NAS models."""
    import pandas as pd

    dense = frame[frame["method"] == "dense"].iloc[0]
    dense_ppl = float(dense["test_perplexity"])
    reference = "NAS + refine" if args.refine_blocks else "NAS"
    n, tokens = int(dense["test_examples"]), int(dense["test_tokens"])
    lines = [
        f"Test perplexity (lower is better) on the same {n} test blocks of "
        f"{args.block_length} tokens ({tokens:,} predicted tokens, digest "
        f"{dense['test_digest']}) of `{CORPUS}`; 95% bootstrap intervals over blocks; each "
        "method's model at a budget is its lowest validation perplexity within the budget. "
        f"Δ log-ppl and p: paired against {reference} at the same budget (bootstrap interval, "
        "sign-flip permutation test over blocks). Cost: training blocks processed forward + "
        "backward and seconds, everything included (NAS: supernet + search; NAS + refine: "
        "that plus the model's refine).",
        "",
        f"Dense model: test perplexity {dense_ppl:,.3f} [{dense['test_low']:,.3f}, "
        f"{dense['test_high']:,.3f}]"
        + (f" (the pre-trained model fine-tuned {args.teacher_steps} steps of "
           f"{args.batch_size} blocks on the corpus first, the teacher every method starts "
           "from; that cost is charged to none of them)." if args.teacher_steps else "."),
        "",
        "| budget | method | model | params ratio | test ppl [95% CI] | ratio to dense | "
        f"target | Δ log-ppl vs {reference} [CI] | p | cost: blocks | cost: s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in frame[frame["method"] != "dense"].iterrows():
        ratio = float(r["test_perplexity"]) / dense_ppl
        limit = TARGETS.get(round(float(r["budget"]), 6))
        target = "—" if limit is None else (f"≤ {limit:.2f}: "
                                            f"{'met' if ratio <= limit else 'missed'}")
        diff = r["diff_vs_reference"]
        delta = "—" if pd.isna(diff) else (f"{diff:+.4f} [{r['diff_low']:+.4f}, "
                                            f"{r['diff_high']:+.4f}]")
        lines.append(
            f"| {r['budget']:g} | {r['method']} | {r['trial_id']} | {r['params_ratio']:.3f} | "
            f"{r['test_perplexity']:,.3f} [{r['test_low']:,.3f}, {r['test_high']:,.3f}] | "
            f"{ratio:.3f} | {target} | {delta} | {_num(r['p_value'], '.3g')} | "
            f"{_num(r['cost_examples'], ',.0f')} | {_num(r['cost_time_s'], ',.0f')} |")
    missing = [b for b in args.budgets if b not in keeps]
    if missing:
        lines += ["", f"No layer-dropping model fits the budget(s) {missing}."]
    lines += ["", "Exported decode latency of the chosen NAS models against the dense model "
              f"(nas_prune.baselines.measure_latency: batch 1, prefill of {args.block_length} "
              f"tokens, then per-token decode with the KV cache; median of "
              f"{args.latency_repeats}, one CPU thread unless on a GPU):", "",
              "| model | params ratio | prefill ms | decode ms / token | decode vs dense |",
              "|---|---|---|---|---|"]
    dense_decode = latency[0]["decode_ms"]
    for row in latency:
        lines.append(f"| {row['name']} | {row['params_ratio']:.3f} | {row['latency_ms']:.2f} | "
                     f"{row['decode_ms']:.3f} | {row['decode_ms'] / dense_decode:.2f} |")
    by_size = sorted(latency, key=lambda r: -r["params_ratio"])
    falls = all(a["decode_ms"] >= b["decode_ms"] for a, b in pairwise(by_size))
    lines += ["", f"Exported decode latency falls with size: {'yes' if falls else 'no'} "
              f"({latency[0].get('hardware', '?')}).", "",
              "Seconds per stage in this invocation (stages finished before are skipped): "
              + ", ".join(f"{k} {v:,.0f}" for k, v in seconds.items()) + "."]
    return "\n".join(lines) + "\n"


def decode_latency(frame: Any, teacher: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """measure_latency of the dense teacher and each distinct chosen NAS model."""
    from nas_prune.baselines import measure_latency
    from nas_prune.options import ProfileOptions

    settings = ProfileOptions(batch_size=1, seq_len=args.block_length, warmup=1,
                              repeats=args.latency_repeats)
    rows = [{"name": "dense", "params_ratio": 1.0, **measure_latency(teacher, settings)}]
    nas = frame[frame["method"] == "nas"].drop_duplicates("model_dir")
    for _, r in nas.sort_values("params_ratio", ascending=False).iterrows():
        rows.append({"name": f"nas {r['trial_id']} (budget {r['budget']:g})",
                     "params_ratio": float(r["params_ratio"]),
                     **measure_latency(r["model_dir"], settings)})
    return rows


# ------------------------------------------------------------------------------ the run
def run(args: argparse.Namespace) -> str:
    """Every stage into `args.out` (resumed); returns the Markdown table."""
    import pandas as pd

    from nas_prune import models, pipeline
    from nas_prune.rundir import RunDir

    out = RunDir(args.out)
    out.root.mkdir(parents=True, exist_ok=True)
    model = tiny_model(out.root / "tiny_model") if args.tiny else models.resolve("smollm2")
    opts = options(args, model)
    seconds: dict[str, float] = {}

    def stage(name: str, fn, *extra):
        log.info("== %s ==", name)
        started = time.perf_counter()
        value = fn(out, *extra)
        seconds[name] = time.perf_counter() - started
        return value

    stage("teacher", pipeline.finetune, opts)
    stage("supernet", pipeline.supernet, opts)
    stage("search", pipeline.search, opts)
    keeps = layer_keeps(out.teacher, list(args.budgets))
    log.info("layer dropping keeps %s", {b: k for b, (k, _) in keeps.items()})
    opts = with_baselines(opts, args, keeps)
    stage("baselines", pipeline.baselines, opts)
    if opts.refine.enabled:
        stage("refine", pipeline.refine, opts)
    stage("compare", pipeline.compare, opts)
    frame = pd.read_csv(out.compare / "comparison.csv")
    latency = decode_latency(frame, out.teacher, args)
    table = bench_table(frame, latency, args, keeps, seconds)
    (out.root / "bench_decoder.md").write_text(table)
    (out.root / "bench_decoder.json").write_text(json.dumps(
        {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
         "layer_keeps": {str(b): list(v) for b, v in keeps.items()}, "latency": latency,
         "stage_seconds": seconds}, indent=2))
    return table


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "transformers", "datasets", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    print(run(args))
    print((args.out / "compare" / "comparison.md").read_text())


if __name__ == "__main__":
    main()
