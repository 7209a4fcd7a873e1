"""Comparing pruning methods so that the numbers can be trusted (DESIGN.md decision 10,
METHODS.md section 6).

The protocol:

1. **Choose on validation.** Every method (NAS, NAS + refine, PINS, GRAIN, layer dropping, ...)
   offers candidate models, each with its *validation* error. At a budget b on an axis
   (``params_ratio``: parameters relative to the dense model, or ``latency_ms``: median latency
   measured here, for every candidate and the dense model with the same settings), a method's
   model is the candidate with the lowest validation error among those whose axis value is at
   most b (:func:`match_budgets`; ties go to the smaller axis value, then the model name). The
   test split plays no part in any choice.
2. **Report on test.** Every reported accuracy is measured on the task's TEST split, the same
   examples, tokenised the same way, for every method and for the dense model
   (:func:`test_predictions`); each row of the table carries the number of test examples and a
   digest of them (``test_examples``, ``test_digest``) so this can be checked.
3. **Intervals.** Each accuracy has a seeded percentile-bootstrap interval over test examples
   (:func:`bootstrap_interval`, 95% by default).
4. **Paired tests at matched budgets.** At each budget every method is compared with the
   reference method (NAS + refine when present, else NAS) on the same test examples
   (:func:`paired_test`): the exact McNemar test on the discordant examples gives the p-value, a
   paired bootstrap the interval of the accuracy difference. p-values are per comparison (no
   multiple-testing correction); ``significant`` is ``p < alpha``.
5. **Cost, counted the same way for everyone.** Cost is training examples processed forward +
   backward and wall time, everything included. A candidate row may carry its own cost
   (``train_examples``, ``train_time_s``: what producing this model alone took, e.g. a refine or
   a baseline run) and its method's shared cost (``shared_train_examples``,
   ``shared_train_time_s``: what all of the method's models share, e.g. supernet training and the
   search). The cost at a budget is shared + own, so a one-budget method (one run per model) is
   charged per budget; :func:`total_costs` charges each method once for its shared cost plus
   each distinct chosen model's own cost. A missing cost column reads as "not counted" (NaN),
   never as zero.

`compare` runs all of this and returns the table; `write_comparison` writes it as Markdown,
CSV and a plot of test accuracy (with interval bars) against the budget axis.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nas_prune.errors import NasPruneError

log = logging.getLogger(__name__)

AXES = {"params_ratio": "parameters (fraction of the dense model)",
        "latency_ms": "latency (ms, median)"}
"""The budget axes and their labels."""

COST_COLUMNS = ("train_examples", "train_time_s", "shared_train_examples", "shared_train_time_s")
"""Optional cost columns of a candidate row (see the module docstring)."""

REFERENCES = ("nas+refine", "nas")
"""The default reference method of the paired tests: the first of these among the candidates."""


class CompareError(NasPruneError):
    """The comparison cannot be made as asked; the message says what to change."""


# ------------------------------------------------------------------------------ test scoring
def test_predictions(model_dir_or_model: str | os.PathLike | Any, task: Any, tokenizer: Any,
                     batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a model on the TEST split of a tokenised task, with the labels.

    Args:
        model_dir_or_model: a saved model directory (stock Hugging Face, our encoder, a GRAIN
            export: loaded through the transformers Auto classes with
            ``trust_remote_code=True``) or a loaded model.
        task: a tokenised ``nas_prune.data.TaskData``; its ``test`` split is scored, in order.
        tokenizer: the tokenizer the task was tokenised with (pads the batches).
        batch_size: examples per forward pass.

    Returns:
        ``(logits, labels)``: float32 ``(n, num_labels)`` and the ``n`` labels.
    """
    import torch

    from nas_prune import data as data_lib

    model = model_dir_or_model
    if isinstance(model, str | os.PathLike):
        from transformers import AutoModelForSequenceClassification

        import nas_prune.supernet  # noqa: F401  registers our encoder with the Auto classes

        model = AutoModelForSequenceClassification.from_pretrained(
            str(model), trust_remote_code=True)
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    try:
        with torch.no_grad():
            for batch in data_lib.make_loader(task.test, tokenizer, batch_size):
                labels.append(batch.pop("labels").numpy())
                out = model(**{k: v.to(device) for k, v in batch.items()})
                logits.append(out.logits.float().cpu().numpy())
    finally:
        model.train(was_training)
    if not labels:
        raise CompareError("the task's test split is empty; give a task with test examples")
    return np.concatenate(logits), np.concatenate(labels)


test_predictions.__test__ = False  # a scorer, not a pytest test, wherever it is imported


def correct_predictions(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per test example, whether the argmax of the logits is the label (bool array)."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise CompareError("per-example accuracy needs a classification task; regression "
                           f"outputs of shape {logits.shape} have no right or wrong answers")
    return logits.argmax(axis=1) == np.asarray(labels)


def test_digest(task: Any) -> str:
    """16 hex digits identifying a tokenised task's test split: its examples' token ids and
    labels, in order."""
    sha = hashlib.sha1()
    for ids, label in zip(task.test["input_ids"], task.test["labels"], strict=True):
        sha.update(np.asarray(ids, dtype=np.int64).tobytes())
        sha.update(np.float64(label).tobytes())
    return sha.hexdigest()[:16]


test_digest.__test__ = False


# ------------------------------------------------------------------------------ statistics
def _boot_means(values: np.ndarray, n: int, rng: np.random.Generator,
                chunk: int = 256) -> np.ndarray:
    """Means of `n` bootstrap resamples (with replacement, same size) of `values`, each row of
    `values` (shape (m,) or (m, k)) resampled as a unit."""
    m = len(values)
    means = []
    for start in range(0, n, chunk):
        index = rng.integers(0, m, size=(min(chunk, n - start), m))
        means.append(values[index].mean(axis=1))
    return np.concatenate(means)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise CompareError(f"level must lie strictly between 0 and 1 (e.g. 0.95), got {level}")


def bootstrap_interval(correct: np.ndarray, n: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-example scores (e.g. correctness 0/1) and its percentile-bootstrap interval.

    Args:
        correct: one value per test example.
        n: bootstrap resamples.
        seed: seed of the resampling (the same seed gives the same interval).
        level: coverage of the interval.

    Returns:
        ``(mean, low, high)``.
    """
    values = np.asarray(correct, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise CompareError("bootstrap_interval needs at least one example")
    if n < 1:
        raise CompareError(f"n must be >= 1 resample, got {n}")
    _check_level(level)
    means = _boot_means(values, n, np.random.default_rng(seed))
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(values.mean()), float(low), float(high)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of `only_a` successes in
    ``only_a + only_b`` discordant pairs at probability 1/2."""
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    k = min(only_a, only_b)
    log_terms = [math.lgamma(discordant + 1) - math.lgamma(i + 1) - math.lgamma(discordant - i + 1)
                 - discordant * math.log(2) for i in range(k + 1)]
    top = max(log_terms)
    tail = math.exp(top) * sum(math.exp(t - top) for t in log_terms)
    return min(1.0, 2 * tail)


def paired_test(correct_a: np.ndarray, correct_b: np.ndarray, n: int = 10000, seed: int = 0,
                level: float = 0.95) -> dict[str, float]:
    """Compare two models' correctness on the same test examples.

    Args:
        correct_a: per example, whether model a is right (0/1 or bool).
        correct_b: the same for model b, on the same examples in the same order.
        n: paired bootstrap resamples (the examples are resampled, both models together).
        seed: seed of the resampling.
        level: coverage of the interval of the difference.

    Returns:
        ``diff`` (accuracy of a minus accuracy of b), ``low``/``high`` (its paired-bootstrap
        interval), ``p_value`` (two-sided exact McNemar test), ``only_a``/``only_b`` (examples
        only a / only b gets right).
    """
    a = np.asarray(correct_a).reshape(-1)
    b = np.asarray(correct_b).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise CompareError(f"a paired test needs the same, non-empty set of examples for both "
                           f"models; got {a.size} and {b.size} examples")
    for name, values in (("correct_a", a), ("correct_b", b)):
        if not np.isin(values, (0, 1)).all():
            raise CompareError(f"{name} must hold 0/1 correctness per example")
    _check_level(level)
    a, b = a.astype(np.float64), b.astype(np.float64)
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    diffs = _boot_means(a - b, n, np.random.default_rng(seed))
    tail = (1 - level) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return {"diff": float(a.mean() - b.mean()), "low": float(low), "high": float(high),
            "p_value": mcnemar_exact(only_a, only_b), "only_a": only_a, "only_b": only_b}


# ------------------------------------------------------------------------------ the choice
def _check_axis(axis: str) -> None:
    if axis not in AXES:
        raise CompareError(f"axis must be one of {', '.join(AXES)}, got {axis!r}")


def match_budgets(rows: pd.DataFrame, budgets: Sequence[float],
                  axis: str = "params_ratio") -> pd.DataFrame:
    """For each budget and method, the candidate with the lowest *validation* error among
    those whose `axis` value is at most the budget.

    Args:
        rows: candidates, with at least ``method``, ``error`` (validation) and `axis`; rows
            whose error or axis value is missing are never chosen. Other columns (a test score
            included) are carried along and play no part in the choice.
        budgets: the budgets, in units of `axis`.
        axis: ``params_ratio`` or ``latency_ms``.

    Returns:
        One row per (budget, method) with a candidate within the budget: the chosen row's
        columns plus ``budget``, ordered by budget then method. Methods with nothing within a
        budget have no row there.
    """
    _check_axis(axis)
    missing = [c for c in ("method", "error", axis) if c not in rows]
    if missing:
        raise CompareError(f"candidate rows lack column(s) {', '.join(missing)}")
    if not len(budgets):
        raise CompareError("give at least one budget")
    usable = rows.dropna(subset=["error", axis])
    name = "model_dir" if "model_dir" in usable else "method"
    usable = usable.assign(_name=usable[name].astype(str))
    chosen = []
    for budget in sorted(float(b) for b in budgets):
        fits = usable[usable[axis] <= budget]
        for _method, group in fits.groupby("method", sort=True):
            best = group.sort_values(["error", axis, "_name"], kind="stable").iloc[0]
            chosen.append({**best.drop("_name").to_dict(), "budget": budget})
    columns = [*(c for c in rows.columns if c != "budget"), "budget"]
    return pd.DataFrame(chosen, columns=columns)


# ------------------------------------------------------------------------------ the comparison
def _cost(row: Mapping[str, Any], own: str, shared: str) -> float:
    """Shared + own cost of a candidate row; NaN when its own cost was not counted."""
    own_value = row.get(own)
    if own_value is None or pd.isna(own_value):
        return float("nan")
    shared_value = row.get(shared)
    shared_value = 0.0 if shared_value is None or pd.isna(shared_value) else shared_value
    return float(own_value) + float(shared_value)


def _check_saved(model_dir: str) -> None:
    if not (Path(model_dir) / "config.json").exists():
        raise CompareError(f"{model_dir} holds no saved model (no config.json); export or "
                           "re-create the candidate's model first")


def compare(
    candidates: pd.DataFrame,
    dense_dir: str | os.PathLike,
    task: Any,
    tokenizer: Any,
    budgets: Sequence[float],
    axis: str = "params_ratio",
    *,
    reference: str | None = None,
    latency: Any = None,
    measure_latency: bool = True,
    n_bootstrap: int = 1000,
    n_paired: int = 10000,
    seed: int = 0,
    level: float = 0.95,
    alpha: float = 0.05,
    batch_size: int = 64,
) -> pd.DataFrame:
    """The comparison table of the module docstring's protocol.

    Args:
        candidates: one row per candidate model: ``method``, ``model_dir`` (a saved model),
            ``error`` (validation), ``params_ratio``, optionally ``latency_ms``, ``trial_id``
            and the :data:`COST_COLUMNS`.
        dense_dir: the dense fine-tuned model (the teacher), scored on the same test examples.
        task: the tokenised task; its test split is what every number is measured on.
        tokenizer: the tokenizer `task` was tokenised with.
        budgets: budgets on `axis`.
        axis: ``params_ratio`` or ``latency_ms``.
        reference: the method every other is tested against at each budget (default:
            ``nas+refine`` when among the candidates, else ``nas``).
        latency: ``nas_prune.options.ProfileOptions`` of the latency measurements.
        measure_latency: measure the latency of the models here, all with the same settings
            (every candidate and the dense model when `axis` is ``latency_ms``, else the
            chosen ones); False keeps the candidates' own ``latency_ms``.
        n_bootstrap: resamples of each accuracy's interval.
        n_paired: resamples of each paired difference's interval.
        seed: seed of all resampling.
        level: coverage of the intervals.
        alpha: significance level of the paired tests.
        batch_size: test examples per forward pass.

    Returns:
        One row for the dense model (budget NaN), then one per (budget, method): ``budget``,
        ``method``, ``trial_id``, ``model_dir``, ``valid_error`` (the choice criterion),
        ``test_accuracy``, ``test_low``, ``test_high``, ``test_examples``, ``test_digest``,
        ``params_ratio``, ``latency_ms``, ``hardware``, ``cost_examples``, ``cost_time_s``,
        ``train_examples``, ``train_time_s`` (the model's own part), ``reference``,
        ``diff_vs_reference``, ``diff_low``, ``diff_high``, ``p_value``, ``significant``.
    """
    _check_axis(axis)
    if "model_dir" not in candidates:
        raise CompareError("candidate rows need a model_dir column (the saved model of each)")
    if not 0 < alpha < 1:
        raise CompareError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    frame = candidates.copy()
    for column in ("trial_id", "latency_ms", "hardware", *COST_COLUMNS):
        if column not in frame:
            frame[column] = None
    frame["model_dir"] = [str(p) for p in frame["model_dir"]]
    frame["trial_id"] = [Path(d).name if t is None or pd.isna(t) else t
                         for t, d in zip(frame["trial_id"], frame["model_dir"], strict=True)]
    lat_cache: dict[str, dict[str, Any]] = {}

    def timed(model_dir: str) -> dict[str, Any]:
        if model_dir not in lat_cache:
            from nas_prune.baselines import measure_latency as measure

            _check_saved(model_dir)

            lat_cache[model_dir] = measure(model_dir, latency)
        return lat_cache[model_dir]

    if axis == "latency_ms" and measure_latency:
        measured = [timed(d) for d in frame["model_dir"]]
        frame["latency_ms"] = [m["latency_ms"] for m in measured]
        frame["hardware"] = [m["hardware"] for m in measured]
    chosen = match_budgets(frame, budgets, axis)
    if chosen.empty:
        raise CompareError(f"no candidate fits any of the budgets {list(budgets)} on {axis}")
    methods = set(chosen["method"])
    if reference is None:
        reference = next((m for m in REFERENCES if m in methods), None)
    elif reference not in set(frame["method"]):
        raise CompareError(f"reference method {reference!r} is not among the candidates "
                           f"({', '.join(sorted(set(frame['method'])))})")

    digest = test_digest(task)
    scored: dict[str, np.ndarray] = {}

    def correct(model_dir: str) -> np.ndarray:
        if model_dir not in scored:
            _check_saved(model_dir)
            logits, labels = test_predictions(model_dir, task, tokenizer, batch_size)
            scored[model_dir] = correct_predictions(logits, labels)
        return scored[model_dir]

    def accuracy(model_dir: str) -> dict[str, Any]:
        mean, low, high = bootstrap_interval(correct(model_dir), n_bootstrap, seed, level)
        return {"test_accuracy": mean, "test_low": low, "test_high": high,
                "test_examples": len(correct(model_dir)), "test_digest": digest}

    dense_dir = str(dense_dir)
    dense = {"budget": float("nan"), "method": "dense", "trial_id": "dense",
             "model_dir": dense_dir, "valid_error": float("nan"), **accuracy(dense_dir),
             "params_ratio": 1.0, "cost_examples": float("nan"), "cost_time_s": float("nan"),
             "train_examples": float("nan"), "train_time_s": float("nan"),
             "reference": reference}
    if measure_latency:
        dense.update(timed(dense_dir))
    table = [dense]
    for _, row in chosen.iterrows():
        out = {"budget": row["budget"], "method": row["method"], "trial_id": row["trial_id"],
               "model_dir": row["model_dir"], "valid_error": float(row["error"]),
               **accuracy(row["model_dir"]), "params_ratio": float(row["params_ratio"]),
               "latency_ms": row["latency_ms"], "hardware": row["hardware"],
               "cost_examples": _cost(row, "train_examples", "shared_train_examples"),
               "cost_time_s": _cost(row, "train_time_s", "shared_train_time_s"),
               "train_examples": row["train_examples"], "train_time_s": row["train_time_s"],
               "reference": reference}
        if measure_latency and axis != "latency_ms":
            out.update(timed(row["model_dir"]))
        ref = chosen[(chosen["budget"] == row["budget"]) & (chosen["method"] == reference)]
        if reference is not None and row["method"] != reference and not ref.empty:
            test = paired_test(correct(row["model_dir"]), correct(ref["model_dir"].iloc[0]),
                               n_paired, seed, level)
            out.update({"diff_vs_reference": test["diff"], "diff_low": test["low"],
                        "diff_high": test["high"], "p_value": test["p_value"],
                        "significant": bool(test["p_value"] < alpha)})
        table.append(out)
    columns = ["budget", "method", "trial_id", "model_dir", "valid_error", "test_accuracy",
               "test_low", "test_high", "test_examples", "test_digest", "params_ratio",
               "latency_ms", "hardware", "cost_examples", "cost_time_s", "train_examples",
               "train_time_s", "reference", "diff_vs_reference", "diff_low", "diff_high",
               "p_value", "significant"]
    result = pd.DataFrame(table, columns=columns)
    result.attrs.update({"axis": axis, "level": level, "alpha": alpha, "seed": seed})
    log.info("compared %d methods at %d budgets on %d test examples", len(methods),
             len(set(chosen["budget"])), dense["test_examples"])
    return result


def total_costs(frame: pd.DataFrame, candidates: pd.DataFrame) -> pd.DataFrame:
    """What each compared method cost in all: its shared cost once plus the own cost of every
    model it trained (all its `candidates`, chosen at a budget or not: a refine of the whole
    Pareto set, or one baseline run per budget, is paid in full)."""
    rows = []
    cand = candidates.assign(model_dir=[str(p) for p in candidates["model_dir"]])
    for method in sorted(set(frame.loc[frame["method"] != "dense", "method"])):
        mine = cand[cand["method"] == method].drop_duplicates("model_dir")
        total = {"method": method, "models": len(mine)}
        for own, shared, key in (("train_examples", "shared_train_examples", "examples"),
                                 ("train_time_s", "shared_train_time_s", "time_s")):
            own_values = mine[own] if own in mine else pd.Series([np.nan] * len(mine))
            shared_value = mine[shared].max() if shared in mine else np.nan
            value = float(own_values.astype(float).sum(min_count=len(mine)))
            total[key] = value + (0.0 if pd.isna(shared_value) else float(shared_value))
        rows.append(total)
    return pd.DataFrame(rows, columns=["method", "models", "examples", "time_s"])


# ------------------------------------------------------------------------------ writing
def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def _yes_no(value: Any) -> str:
    if value is None or pd.isna(value):
        return "—"
    return "yes" if value else "no"


def comparison_markdown(frame: pd.DataFrame, costs: pd.DataFrame | None = None) -> str:
    """The comparison table (and the total costs, if given) as Markdown."""
    axis = frame.attrs.get("axis", "params_ratio")
    level = frame.attrs.get("level", 0.95)
    digest = frame["test_digest"].iloc[0]
    n = int(frame["test_examples"].iloc[0])
    reference = frame["reference"].iloc[0]
    lines = [
        f"Test accuracy on the same {n} test examples for every model (digest {digest}), "
        f"{level:.0%} percentile-bootstrap intervals; each method's model at a budget is its "
        f"validation-best with {axis} <= budget. Δ and p: paired against {reference} at the "
        "same budget (exact McNemar test; Δ interval by paired bootstrap).",
        "",
        f"| budget ({axis}) | method | model | test accuracy [{level:.0%} CI] | params ratio | "
        "latency ms | cost: train examples | cost: time s | Δ vs ref [CI] | p | significant |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in frame.iterrows():
        diff = r.get("diff_vs_reference")
        delta = "—" if pd.isna(diff) else (f"{diff:+.4f} [{r['diff_low']:+.4f}, "
                                            f"{r['diff_high']:+.4f}]")
        lines.append(
            f"| {_fmt(r['budget'], '.4g')} | {r['method']} | {r['trial_id']} | "
            f"{r['test_accuracy']:.4f} [{r['test_low']:.4f}, {r['test_high']:.4f}] | "
            f"{_fmt(r['params_ratio'], '.3f')} | {_fmt(r['latency_ms'], '.2f')} | "
            f"{_fmt(r['cost_examples'], ',.0f')} | {_fmt(r['cost_time_s'], '.1f')} | {delta} | "
            f"{_fmt(r.get('p_value'), '.3g')} | {_yes_no(r.get('significant'))} |"
        )
    if costs is not None and not costs.empty:
        lines += ["", "Total cost of each method (shared cost once, plus every model it "
                  "trained, chosen or not):", "", "| method | models | train examples | time s |",
                  "|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['models']} | {_fmt(r['examples'], ',.0f')} | "
                  f"{_fmt(r['time_s'], '.1f')} |" for _, r in costs.iterrows()]
    return "\n".join(lines) + "\n"


def plot_comparison(frame: pd.DataFrame, out_png: str | os.PathLike) -> Path:
    """Test accuracy (with interval bars) of each method's chosen model against its value on
    the budget axis; the dense model as a line with its interval as a band, the budgets as
    dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = frame.attrs.get("axis", "params_ratio")
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    dense = frame[frame["method"] == "dense"]
    if not dense.empty:
        d = dense.iloc[0]
        ax.axhline(d["test_accuracy"], color="k", lw=1, label="dense model")
        ax.axhspan(d["test_low"], d["test_high"], color="k", alpha=0.08)
    picked = frame[frame["method"] != "dense"]
    for budget in sorted(set(picked["budget"])):
        ax.axvline(budget, color="grey", ls=":", lw=0.8)
    for i, (method, group) in enumerate(picked.groupby("method", sort=True)):
        group = group.drop_duplicates("model_dir").sort_values(axis)
        acc = group["test_accuracy"].to_numpy(float)
        bars = np.vstack([acc - group["test_low"].to_numpy(float),
                          group["test_high"].to_numpy(float) - acc])
        ax.errorbar(group[axis].to_numpy(float), acc, yerr=bars, fmt="o-", capsize=3,
                    color=f"C{i % 10}", label=method)
    ax.set_xlabel(AXES[axis])
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_comparison(frame: pd.DataFrame, out_dir: str | os.PathLike,
                     candidates: pd.DataFrame | None = None) -> Path:
    """Write ``comparison.md`` (the table, and the total costs when `candidates` are given),
    ``comparison.csv`` (every column) and ``comparison.png`` to `out_dir`; returns the
    Markdown file's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    costs = total_costs(frame, candidates) if candidates is not None else None
    markdown = out / "comparison.md"
    markdown.write_text(comparison_markdown(frame, costs))
    frame.to_csv(out / "comparison.csv", index=False)
    plot_comparison(frame, out / "comparison.png")
    return markdown
