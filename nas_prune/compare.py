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
2. **Report on test.** Every reported figure is measured on the task's TEST split, the same
   examples, tokenised the same way, for every method and for the dense model; each row of the
   table carries the number of test examples and a digest of them (``test_examples``,
   ``test_digest``) so this can be checked. Classification reports accuracy
   (:func:`test_predictions`); language modelling (``task.spec.is_lm``: the test split is
   fixed-length token blocks) reports perplexity, exp(mean next-token negative log-likelihood
   over all test tokens) (:func:`test_block_nll`), lower being better; the validation error a
   choice is made on is then the validation perplexity.
3. **Intervals.** Each figure has a seeded percentile-bootstrap interval over test examples
   (95% by default): :func:`bootstrap_interval` of the per-example correctness, or
   :func:`perplexity_interval`, which resamples whole test blocks with their summed NLL and
   token counts.
4. **Paired tests at matched budgets.** At each budget every method is compared with the
   reference method (NAS + refine when present, else NAS) on the same test examples.
   Classification (:func:`paired_test`): the exact McNemar test on the discordant examples
   gives the p-value, a paired bootstrap the interval of the accuracy difference. Language
   modelling (:func:`paired_perplexity_test`): the difference is in log-perplexity (mean NLL per
   token), its interval a paired bootstrap over blocks, its p-value a paired sign-flip
   permutation test over blocks. p-values are per comparison (no multiple-testing correction);
   ``significant`` is ``p < alpha``.
5. **Cost, counted the same way for everyone.** Cost is training examples processed forward +
   backward and wall time, everything included. A candidate row may carry its own cost
   (``train_examples``, ``train_time_s``: what producing this model alone took, e.g. a refine or
   a baseline run) and its method's shared cost (``shared_train_examples``,
   ``shared_train_time_s``: what all of the method's models share, e.g. supernet training and the
   search). The cost at a budget is shared + own, so a one-budget method (one run per model) is
   charged per budget; :func:`total_costs` charges each method once for its shared cost plus
   the own cost of every model it trained, chosen at a budget or not. A missing cost column
   reads as "not counted" (NaN), never as zero.

`compare` runs all of this and returns the table; `write_comparison` writes it as Markdown,
CSV and a plot of the test figure (with interval bars) against the budget axis.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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

METRICS = {"accuracy": "higher is better", "perplexity": "lower is better"}
"""The test figure of a comparison (classification: accuracy; language modelling: perplexity),
and which way is better."""


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
    labels (a class, a target, or a block's tokens), in order."""
    sha = hashlib.sha1()
    for ids, label in zip(task.test["input_ids"], task.test["labels"], strict=True):
        sha.update(np.asarray(ids, dtype=np.int64).tobytes())
        sha.update(np.asarray(label, dtype=np.float64).tobytes())
    return sha.hexdigest()[:16]


test_digest.__test__ = False


def test_block_nll(model_dir_or_model: str | os.PathLike | Any, task: Any, tokenizer: Any,
                   batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per block of the TEST split of a tokenised language-modelling task, the summed
    next-token negative log-likelihood (nats, computed in float32) and the number of tokens
    predicted (labels shifted by one, -100 ignored: ``block length - 1`` for full blocks).

    Args:
        model_dir_or_model: a saved causal LM directory (a stock transformers Llama / Qwen2
            export or a nas_prune decoder checkpoint, loaded through
            ``nas_prune.decoder_loading.load_pretrained_decoder``) or a loaded causal LM.
        task: a tokenised ``nas_prune.data.TaskData`` of kind ``lm``; its ``test`` split is
            scored, in order.
        tokenizer: the tokenizer the task was tokenised with.
        batch_size: blocks per forward pass.

    Returns:
        ``(nll, tokens)``: float64 and int64 arrays of one value per test block. The test
        perplexity is ``exp(nll.sum() / tokens.sum())``.
    """
    import torch

    from nas_prune import data as data_lib

    model = model_dir_or_model
    if isinstance(model, str | os.PathLike):
        from nas_prune.decoder_loading import load_pretrained_decoder

        model = load_pretrained_decoder(str(model))
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, tokens = [], []
    try:
        with torch.no_grad():
            for batch in data_lib.make_loader(task.test, tokenizer, batch_size):
                labels = batch.pop("labels")[:, 1:].to(device)
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits[:, :-1]
                losses = torch.nn.functional.cross_entropy(
                    logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
                nll.append(losses.double().sum(1).cpu().numpy())
                tokens.append((labels != -100).sum(1).cpu().numpy())
    finally:
        model.train(was_training)
    if not nll:
        raise CompareError("the task's test split is empty; give a task with test blocks")
    return np.concatenate(nll), np.concatenate(tokens).astype(np.int64)


test_block_nll.__test__ = False


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


def _blocks(nll: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Per-block (NLL, tokens) rows, checked."""
    nll = np.asarray(nll, dtype=np.float64).reshape(-1)
    tokens = np.asarray(tokens, dtype=np.float64).reshape(-1)
    if nll.shape != tokens.shape or nll.size == 0:
        raise CompareError(f"perplexity needs one NLL and one token count per test block, "
                           f"at least one block; got {nll.size} and {tokens.size}")
    if (tokens < 0).any() or tokens.sum() <= 0:
        raise CompareError("token counts must be >= 0 with at least one predicted token")
    return np.stack([nll, tokens], axis=1)


def perplexity_interval(nll: np.ndarray, tokens: np.ndarray, n: int = 1000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float, float]:
    """Perplexity over test blocks and its percentile-bootstrap interval.

    The perplexity is ``exp(sum(nll) / sum(tokens))``; each resample draws as many blocks,
    with replacement, each with its own summed NLL and token count, and takes the same ratio.

    Args:
        nll: per block, the summed next-token negative log-likelihood (nats).
        tokens: per block, the tokens predicted.
        n: bootstrap resamples.
        seed: seed of the resampling (the same seed gives the same interval).
        level: coverage of the interval.

    Returns:
        ``(perplexity, low, high)``.
    """
    rows = _blocks(nll, tokens)
    if n < 1:
        raise CompareError(f"n must be >= 1 resample, got {n}")
    _check_level(level)
    means = _boot_means(rows, n, np.random.default_rng(seed))
    log_ppl = means[:, 0] / means[:, 1]
    tail = (1 - level) / 2
    low, high = np.exp(np.quantile(log_ppl, [tail, 1 - tail]))
    return float(np.exp(rows[:, 0].sum() / rows[:, 1].sum())), float(low), float(high)


def paired_perplexity_test(nll_a: np.ndarray, nll_b: np.ndarray, tokens: np.ndarray,
                           n: int = 10000, seed: int = 0, level: float = 0.95
                           ) -> dict[str, float]:
    """Compare two language models' perplexity on the same test blocks.

    The difference is in log-perplexity, ``diff = (sum(nll_a) - sum(nll_b)) / sum(tokens)``
    (mean NLL per token, nats; ``exp(diff)`` is the perplexity ratio a / b). Its interval is a
    paired percentile bootstrap: blocks are resampled with both models' NLL together. Its
    p-value is a two-sided paired sign-flip permutation test over blocks: under the null
    hypothesis that the two models' NLLs are exchangeable within each block, each block's
    difference ``nll_a - nll_b`` is negated with probability 1/2; p = (1 + number of the `n`
    random sign patterns whose |diff| is at least the observed |diff|) / (n + 1), so it is
    never below 1 / (n + 1), and it is 1 when the two models agree on every block.

    Args:
        nll_a: per block, model a's summed NLL.
        nll_b: the same for model b, on the same blocks in the same order.
        tokens: per block, the tokens predicted (the same for both models).
        n: bootstrap resamples and random sign patterns.
        seed: seed of both.
        level: coverage of the interval of the difference.

    Returns:
        ``diff``, ``low``/``high`` (its interval), ``p_value``, ``a_lower``/``b_lower``
        (blocks where a's / b's NLL is lower).
    """
    a = np.asarray(nll_a, dtype=np.float64).reshape(-1)
    b = np.asarray(nll_b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise CompareError(f"a paired test needs the same, non-empty set of blocks for both "
                           f"models; got {a.size} and {b.size} blocks")
    test = _sign_flip_test(_blocks(a - b, tokens), n, seed, level)
    return {**test, "a_lower": int((a < b).sum()), "b_lower": int((b < a).sum())}


def _sign_flip_test(rows: np.ndarray, n: int, seed: int, level: float) -> dict[str, float]:
    """The weighted mean difference ``sum(d) / sum(w)`` of per-unit rows (d, w), its paired
    percentile-bootstrap interval (units resampled) and its two-sided sign-flip permutation
    p-value (see `paired_perplexity_test`)."""
    if n < 1:
        raise CompareError(f"n must be >= 1 resample, got {n}")
    _check_level(level)
    rng = np.random.default_rng(seed)
    total = rows[:, 1].sum()
    diff = rows[:, 0].sum() / total
    means = _boot_means(rows, n, rng)
    tail = (1 - level) / 2
    low, high = np.quantile(means[:, 0] / means[:, 1], [tail, 1 - tail])
    d = rows[:, 0]
    slack = 1e-9 * (np.abs(d).sum() / total)  # float noise of a sum of the same numbers
    extreme = 0
    for start in range(0, n, 256):
        signs = rng.choice((-1.0, 1.0), size=(min(256, n - start), len(d)))
        extreme += int((np.abs(signs @ d) / total >= abs(diff) - slack).sum())
    return {"diff": float(diff), "low": float(low), "high": float(high),
            "p_value": (1 + extreme) / (n + 1)}


# ------------------------------------------------------------------------------ the choice
def _check_axis(axis: str) -> None:
    if axis not in AXES:
        raise CompareError(f"axis must be one of {', '.join(AXES)}, got {axis!r}")


def match_budgets(rows: pd.DataFrame, budgets: Sequence[float],
                  axis: str = "params_ratio", top: int = 1) -> pd.DataFrame:
    """For each budget and method, the candidate with the lowest *validation* error among
    those whose `axis` value is at most the budget (the `top` lowest, best first).

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
            ranked = group.sort_values(["error", axis, "_name"], kind="stable")
            for _, best in ranked.head(top).iterrows():
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
    max_test_examples: int | None = None,
    scores_out: dict[str, np.ndarray] | None = None,
) -> pd.DataFrame:
    """The comparison table of the module docstring's protocol.

    Args:
        candidates: one row per candidate model: ``method``, ``model_dir`` (a saved model),
            ``error`` (validation; perplexity for language modelling), ``params_ratio``,
            optionally ``latency_ms``, ``trial_id`` and the :data:`COST_COLUMNS`.
        dense_dir: the dense fine-tuned model (the teacher), scored on the same test examples.
        task: the tokenised task; its test split is what every number is measured on. A
            language-modelling task (``task.spec.is_lm``) is scored by perplexity.
        tokenizer: the tokenizer `task` was tokenised with.
        budgets: budgets on `axis`.
        axis: ``params_ratio`` or ``latency_ms``.
        reference: the method every other is tested against at each budget (default:
            ``nas+refine`` when among the candidates, else ``nas``).
        latency: ``nas_prune.options.ProfileOptions`` of the latency measurements.
        measure_latency: measure the latency of the models here, all by the profiler actors
            that time NAS sub-networks (nas_prune.profile.profile_saved), on every hardware
            type of `latency` with the same settings (every candidate and the dense model
            when `axis` is ``latency_ms``, else the chosen ones); False keeps the
            candidates' own ``latency_ms``.
        n_bootstrap: resamples of each test figure's interval.
        n_paired: resamples of each paired difference's interval (and, for perplexity, random
            sign patterns of its permutation test).
        seed: seed of all resampling (and of the test subset).
        level: coverage of the intervals.
        alpha: significance level of the paired tests.
        batch_size: test examples (blocks) per forward pass.
        max_test_examples: score only this many test examples (blocks), drawn with `seed`
            and kept in their order, the same ones for every model (a quicker comparison;
            the digest identifies them); None: the whole test split.
        scores_out: a dict this fills with every reported model's per-example test scores
            (``{model_dir: correctness}``, or (NLL, tokens) rows per block for language
            modelling), what `write_comparison` stores for `pool_seeds`.

    Returns:
        One row for the dense model (budget NaN), then one per (budget, method): ``budget``,
        ``method``, ``trial_id``, ``model_dir``, ``valid_error`` (the choice criterion),
        ``test_accuracy`` (language modelling: ``test_perplexity``), ``test_low``,
        ``test_high``, ``test_examples`` (and ``test_tokens``), ``test_digest``,
        ``params_ratio``, ``latency_ms`` (and ``decode_ms``) and ``hardware`` of the first
        hardware type, ``cost_examples``, ``cost_time_s``, ``train_examples``,
        ``train_time_s`` (the model's own part), ``reference``, ``diff_vs_reference``
        (language modelling: in log-perplexity), ``diff_low``, ``diff_high``, ``p_value``,
        ``significant``; with `measure_latency`, ``latency_ms[<hardware>]`` for every
        hardware type. The table's ``attrs`` hold ``axis``, ``metric``, ``level``,
        ``alpha`` and ``seed``.
    """
    _check_axis(axis)
    if "model_dir" not in candidates:
        raise CompareError("candidate rows need a model_dir column (the saved model of each)")
    if not 0 < alpha < 1:
        raise CompareError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    lm = bool(getattr(task.spec, "is_lm", False))
    metric = "perplexity" if lm else "accuracy"
    if max_test_examples is not None:
        task = _test_subset(task, max_test_examples, seed)
    frame = candidates.copy()
    for column in ("trial_id", "latency_ms", "hardware", *COST_COLUMNS):
        if column not in frame:
            frame[column] = None
    frame["model_dir"] = [str(p) for p in frame["model_dir"]]
    frame["trial_id"] = [Path(d).name if t is None or pd.isna(t) else t
                         for t, d in zip(frame["trial_id"], frame["model_dir"], strict=True)]
    lat_cache: dict[str, dict[str, dict[str, Any]]] = {}
    same_shape = _same_shape(frame)

    def time_all(model_dirs: Sequence[str]) -> None:
        """Time the models not yet timed, all at once, by the profiler actors on every
        hardware type (the runtime that times NAS sub-networks); one model of each NAS
        sub-network shape stands for all its copies (unrefined and refined)."""
        todo = [d for d in dict.fromkeys(same_shape.get(d, d) for d in model_dirs)
                if d not in lat_cache]
        for model_dir in todo:
            _check_saved(model_dir)
        if todo:
            from nas_prune.profile import profile_saved

            lat_cache.update(profile_saved(todo, latency))

    def timed(model_dir: str) -> dict[str, Any]:
        """The first hardware type's latency (the axis), and every type's in its column."""
        by_hardware = lat_cache[same_shape.get(model_dir, model_dir)]
        hardware, first = next(iter(by_hardware.items()))
        out = {"latency_ms": first["median_ms"], "hardware": hardware,
               **{latency_column(hw): r["median_ms"] for hw, r in by_hardware.items()}}
        if "decode_ms" in first:
            out["decode_ms"] = first["decode_ms"]
        return out

    dense_dir = str(dense_dir)
    if axis == "latency_ms" and measure_latency:
        time_all([*frame["model_dir"], dense_dir])
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

    def scores(model_dir: str) -> np.ndarray:
        """Per test example: correctness, or (language modelling) the block's (NLL, tokens)."""
        if model_dir not in scored:
            _check_saved(model_dir)
            if lm:
                scored[model_dir] = np.stack(test_block_nll(model_dir, task, tokenizer,
                                                            batch_size), axis=1)
            else:
                logits, labels = test_predictions(model_dir, task, tokenizer, batch_size)
                scored[model_dir] = correct_predictions(logits, labels)
        return scored[model_dir]

    def figure(model_dir: str) -> dict[str, Any]:
        values = scores(model_dir)
        if lm:
            mean, low, high = perplexity_interval(values[:, 0], values[:, 1], n_bootstrap,
                                                  seed, level)
            extra = {"test_tokens": int(values[:, 1].sum())}
        else:
            mean, low, high = bootstrap_interval(values, n_bootstrap, seed, level)
            extra = {}
        return {f"test_{metric}": mean, "test_low": low, "test_high": high,
                "test_examples": len(values), **extra, "test_digest": digest}

    def paired(model_dir: str, reference_dir: str) -> dict[str, float]:
        a, b = scores(model_dir), scores(reference_dir)
        if lm:
            return paired_perplexity_test(a[:, 0], b[:, 0], a[:, 1], n_paired, seed, level)
        return paired_test(a, b, n_paired, seed, level)

    if measure_latency:
        time_all([dense_dir, *chosen["model_dir"]])
    dense = {"budget": float("nan"), "method": "dense", "trial_id": "dense",
             "model_dir": dense_dir, "valid_error": float("nan"), **figure(dense_dir),
             "params_ratio": 1.0, "cost_examples": float("nan"), "cost_time_s": float("nan"),
             "train_examples": float("nan"), "train_time_s": float("nan"),
             "reference": reference}
    if measure_latency:
        dense.update(timed(dense_dir))
    table = [dense]
    for _, row in chosen.iterrows():
        out = {"budget": row["budget"], "method": row["method"], "trial_id": row["trial_id"],
               "model_dir": row["model_dir"], "valid_error": float(row["error"]),
               **figure(row["model_dir"]), "params_ratio": float(row["params_ratio"]),
               "latency_ms": row["latency_ms"], "hardware": row["hardware"],
               "cost_examples": _cost(row, "train_examples", "shared_train_examples"),
               "cost_time_s": _cost(row, "train_time_s", "shared_train_time_s"),
               "train_examples": row["train_examples"], "train_time_s": row["train_time_s"],
               "reference": reference}
        if lm and "decode_ms" in row:
            out["decode_ms"] = row["decode_ms"]
        if measure_latency:
            out.update(timed(row["model_dir"]))
        ref = chosen[(chosen["budget"] == row["budget"]) & (chosen["method"] == reference)]
        if reference is not None and row["method"] != reference and not ref.empty:
            test = paired(row["model_dir"], ref["model_dir"].iloc[0])
            out.update({"diff_vs_reference": test["diff"], "diff_low": test["low"],
                        "diff_high": test["high"], "p_value": test["p_value"],
                        "significant": bool(test["p_value"] < alpha)})
        table.append(out)
    per_hardware = sorted({k for row in table for k in row if k.startswith("latency_ms[")})
    result = pd.DataFrame(table, columns=_columns(lm) + per_hardware)
    result.attrs.update({"axis": axis, "metric": metric, "level": level, "alpha": alpha,
                         "seed": seed})
    if scores_out is not None:
        scores_out.update({d: scored[d] for d in result["model_dir"]})
    log.info("compared %d methods at %d budgets on %d test %s", len(methods),
             len(set(chosen["budget"])), dense["test_examples"], "blocks" if lm else "examples")
    return result


def _same_shape(frame: pd.DataFrame) -> dict[str, str]:
    """``{model_dir: the model_dir timed for it}``: the NAS rows (``nas``, ``nas+refine``)
    with one sub-network config share the first one's timing. Refine changes weights, not
    shapes, and two timings of one shape on a busy CPU can fall on either side of a latency
    budget (Rotten Tomatoes: 12.29 ms unrefined, over 12.5 refined, one session)."""
    if "config" not in frame:
        return {}
    from nas_prune.results import config_hash

    first: dict[str, str] = {}
    alias = {}
    for method, config, model_dir in zip(frame["method"], frame["config"], frame["model_dir"],
                                         strict=True):
        if method in ("nas", "nas+refine") and isinstance(config, str):
            alias[model_dir] = first.setdefault(config_hash(config), model_dir)
    return alias


def latency_column(hardware: str) -> str:
    """The comparison table's column of the latency on one hardware type."""
    return f"latency_ms[{hardware}]"


def _columns(lm: bool) -> list[str]:
    """The comparison table's columns (see `compare`)."""
    if lm:
        figure = ["test_perplexity", "test_low", "test_high", "test_examples", "test_tokens"]
        timing = ["latency_ms", "decode_ms"]
    else:
        figure = ["test_accuracy", "test_low", "test_high", "test_examples"]
        timing = ["latency_ms"]
    return ["budget", "method", "trial_id", "model_dir", "valid_error", *figure, "test_digest",
            "params_ratio", *timing, "hardware", "cost_examples", "cost_time_s",
            "train_examples", "train_time_s", "reference", "diff_vs_reference", "diff_low",
            "diff_high", "p_value", "significant"]


def _test_subset(task: Any, examples: int, seed: int) -> Any:
    """`task` with its test split reduced to `examples` of its examples, drawn with `seed`,
    in their original order."""
    if examples < 1:
        raise CompareError(f"max_test_examples must be >= 1, got {examples}")
    if examples >= len(task.test):
        return task
    keep = np.sort(np.random.default_rng(seed).choice(len(task.test), examples, replace=False))
    return dataclasses.replace(task, test=task.test.select(keep.tolist()))


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
    metric = frame.attrs.get("metric", "accuracy")
    level = frame.attrs.get("level", 0.95)
    digest = frame["test_digest"].iloc[0]
    n = int(frame["test_examples"].iloc[0])
    reference = frame["reference"].iloc[0]
    choice = f"each method's model at a budget is its validation-best with {axis} <= budget"
    if metric == "perplexity":
        tokens = int(frame["test_tokens"].iloc[0])
        intro = (f"Test perplexity (lower is better) on the same {n} test blocks ({tokens:,} "
                 f"predicted tokens) for every model (digest {digest}), {level:.0%} "
                 f"percentile-bootstrap intervals over blocks; {choice} (validation "
                 f"perplexity). Δ and p: paired against {reference} at the same budget; Δ is "
                 "the difference in log-perplexity (mean next-token NLL, nats per token; "
                 "exp(Δ) is the perplexity ratio), its interval by paired bootstrap over "
                 "blocks, p by a paired sign-flip permutation test over blocks.")
        head, delta_head = f"test perplexity, lower is better [{level:.0%} CI]", "Δ log-ppl"
        spec = ",.3f"
    else:
        intro = (f"Test accuracy on the same {n} test examples for every model (digest "
                 f"{digest}), {level:.0%} percentile-bootstrap intervals; {choice}. Δ and p: "
                 f"paired against {reference} at the same budget (exact McNemar test; Δ "
                 "interval by paired bootstrap).")
        head, delta_head, spec = f"test accuracy [{level:.0%} CI]", "Δ", ".4f"
    pooled = "test_by_seed" in frame.columns
    if pooled:
        runs = int(frame["seeds"].max())
        intro = (f"Pooled over {runs} runs of one recipe (seeds): each method's model at a "
                 f"budget is each run's own choice ({choice}); the figure is the mean over the "
                 f"runs, taken per test example first, on the same {n} test examples (digest "
                 f"{digest}); its {level:.0%} interval is a bootstrap over test examples of "
                 "the per-example means (test-sample uncertainty given these runs; the spread "
                 "between seeds is the 'by seed' column). Δ: per example the mean over the "
                 f"runs of (method - {reference}), paired-bootstrap interval, p by a paired "
                 "sign-flip permutation test over examples. Parameters, latency and cost are "
                 "the runs' means.")
    lines = [
        intro,
        "",
        f"| budget ({axis}) | method | model | {head} |{' by seed |' if pooled else ''} "
        f"params ratio | latency ms | cost: train examples | cost: time s | {delta_head} vs ref "
        "[CI] | p | significant |",
        "|---|---|---|---|" + ("---|" if pooled else "") + "---|---|---|---|---|---|---|",
    ]
    for _, r in frame.iterrows():
        diff = r.get("diff_vs_reference")
        delta = "—" if pd.isna(diff) else (f"{diff:+.4f} [{r['diff_low']:+.4f}, "
                                            f"{r['diff_high']:+.4f}]")
        lines.append(
            f"| {_fmt(r['budget'], '.4g')} | {r['method']} | {r['trial_id']} | "
            f"{format(r[f'test_{metric}'], spec)} [{format(r['test_low'], spec)}, "
            f"{format(r['test_high'], spec)}] | "
            + (f"{r['test_by_seed']} | " if pooled else "")
            + f"{_fmt(r['params_ratio'], '.3f')} | {_fmt(r['latency_ms'], '.2f')} | "
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
    """The test figure (accuracy, or perplexity on a log axis) with interval bars of each
    method's chosen model against its value on the budget axis, and against its measured
    latency on each hardware type (one panel per type); the dense model as a line with its
    interval as a band, the budgets as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = frame.attrs.get("axis", "params_ratio")
    metric = frame.attrs.get("metric", "accuracy")
    column = f"test_{metric}"
    known = frame["hardware"].dropna() if "hardware" in frame else pd.Series(dtype=object)
    first = known.iloc[0] if not known.empty else None
    panels = [(axis, AXES[axis] if axis != "latency_ms" or first is None
               else f"latency on {first} (ms, median)")]
    for name in sorted(c for c in frame.columns if c.startswith("latency_ms[")):
        hardware = name[len("latency_ms["):-1]
        if frame[name].notna().any() and not (axis == "latency_ms" and hardware == first):
            panels.append((name, f"latency on {hardware} (ms, median)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    dense = frame[frame["method"] == "dense"]
    picked = frame[frame["method"] != "dense"]
    for ax, (x, label) in zip(axes[0], panels, strict=True):
        if not dense.empty:
            d = dense.iloc[0]
            ax.axhline(d[column], color="k", lw=1, label="dense model")
            ax.axhspan(d["test_low"], d["test_high"], color="k", alpha=0.08)
        if x == axis:
            for budget in sorted(set(picked["budget"])):
                ax.axvline(budget, color="grey", ls=":", lw=0.8)
        for i, (method, group) in enumerate(picked.groupby("method", sort=True)):
            group = group.drop_duplicates("model_dir").dropna(subset=[x]).sort_values(x)
            value = group[column].to_numpy(float)
            bars = np.vstack([value - group["test_low"].to_numpy(float),
                              group["test_high"].to_numpy(float) - value])
            ax.errorbar(group[x].to_numpy(float), value, yerr=bars, fmt="o-", capsize=3,
                        color=f"C{i % 10}", label=method)
        ax.set_xlabel(label)
        if metric == "perplexity":
            ax.set_yscale("log")
            ax.set_ylabel("test perplexity (lower is better)")
        else:
            ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="upper right" if metric == "perplexity" else "lower right")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_comparison(frame: pd.DataFrame, out_dir: str | os.PathLike,
                     candidates: pd.DataFrame | None = None,
                     scores: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write ``comparison.md`` (the table, and the total costs when `candidates` are given),
    ``comparison.csv`` (every column), ``comparison.json`` (the table's ``attrs``: axis,
    metric, level, ...), ``comparison.png`` and, when `scores` are given (`compare`'s
    `scores_out`), ``test_scores.parquet`` (one row per model and test example: ``model_dir``,
    ``example`` and ``correct``, or ``nll`` and ``tokens`` per block) to `out_dir`; returns
    the Markdown file's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    costs = total_costs(frame, candidates) if candidates is not None else None
    markdown = out / "comparison.md"
    markdown.write_text(comparison_markdown(frame, costs))
    frame.to_csv(out / "comparison.csv", index=False)
    (out / "comparison.json").write_text(json.dumps(frame.attrs, indent=1, default=str))
    if scores:
        parts = []
        for model_dir, values in scores.items():
            values = np.asarray(values, dtype=np.float64)
            part = {"model_dir": model_dir, "example": np.arange(len(values))}
            if values.ndim == 2:
                part.update(nll=values[:, 0], tokens=values[:, 1])
            else:
                part["correct"] = values
            parts.append(pd.DataFrame(part))
        pd.concat(parts, ignore_index=True).to_parquet(out / "test_scores.parquet", index=False)
    plot_comparison(frame, out / "comparison.png")
    return markdown


def read_comparison(out_dir: str | os.PathLike
                    ) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The comparison `write_comparison` wrote to `out_dir` (its ``attrs`` restored) and its
    per-example test scores by model directory."""
    out = Path(out_dir)
    files = [out / "comparison.csv", out / "comparison.json", out / "test_scores.parquet"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CompareError(f"{out} lacks {', '.join(missing)}: run the compare stage there "
                           f"again (nas-prune compare --out {out.parent}) to write them")
    frame = pd.read_csv(files[0])
    frame.attrs.update(json.loads(files[1].read_text()))
    table = pd.read_parquet(files[2]).sort_values(["model_dir", "example"])
    columns = ["nll", "tokens"] if "nll" in table else ["correct"]
    scores = {str(d): (g[columns].to_numpy(np.float64) if len(columns) == 2
                       else g["correct"].to_numpy(np.float64))
              for d, g in table.groupby("model_dir", sort=False)}
    return frame, scores


def pool_seeds(out_dirs: Sequence[str | os.PathLike], *, n_bootstrap: int = 1000,
               n_paired: int = 10000, seed: int = 0, level: float = 0.95,
               alpha: float = 0.05) -> pd.DataFrame:
    """The comparisons of several runs of one recipe (different seeds, the same test
    examples), pooled: one row per (budget, method) that every run has.

    Each run chose its own model at each budget on validation; the pooled figure is the mean
    over the runs of those models' test figures, computed per test example first (a model's
    correctness, or a block's NLL, averaged over the runs), so that intervals and paired tests
    stay over test examples: the figure's percentile-bootstrap interval resamples examples
    with their per-example means; the difference to the reference method is, per example,
    the mean over the runs of (method - reference), its interval a paired bootstrap and its
    p-value a two-sided sign-flip permutation test over examples (classification; the
    exact McNemar test of a single run needs 0/1 outcomes). This is test-sample uncertainty
    given these runs: with few runs it does not estimate the spread between seeds, which the
    ``test_by_seed`` column shows. Validation errors, parameters, latency and cost are the
    runs' means.

    Args:
        out_dirs: the runs' compare directories (``OUT/compare``), each written by
            `write_comparison` with its test scores.
        n_bootstrap, n_paired, seed, level, alpha: as for `compare`.

    Returns:
        A table with `compare`'s columns (``trial_id`` the runs' models joined by " / ") plus
        ``seeds`` and ``test_by_seed``; ``attrs`` also hold ``runs`` (the directories).
    """
    if len(out_dirs) < 2:
        raise CompareError(f"pooling needs the comparisons of at least two runs, got "
                           f"{len(out_dirs)}")
    if not 0 < alpha < 1:
        raise CompareError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    runs = [read_comparison(d) for d in out_dirs]
    first = runs[0][0]
    for key in ("axis", "metric"):
        values = {frame.attrs.get(key) for frame, _ in runs}
        if len(values) > 1:
            raise CompareError(f"the runs were compared on different {key}s ({values}); pool "
                               f"runs of one comparison")
    digests = {str(frame["test_digest"].iloc[0]) for frame, _ in runs}
    if len(digests) > 1:
        raise CompareError(f"the runs were scored on different test examples (digests "
                           f"{sorted(digests)}); pool runs of one task and test split")
    lm = first.attrs.get("metric") == "perplexity"
    metric = "perplexity" if lm else "accuracy"

    def key(row) -> tuple:
        return ("dense",) if row["method"] == "dense" else (float(row["budget"]), row["method"])

    keyed = [{key(r): r for _, r in frame.iterrows()} for frame, _ in runs]
    common = [k for k in keyed[0] if all(k in other for other in keyed[1:])]
    left_out = sorted({k for table in keyed for k in table} - set(common), key=str)
    if left_out:
        log.warning("not in every run, left out of the pool: %s", left_out)
    references = {frame["reference"].iloc[0] for frame, _ in runs}
    if len(references) > 1:
        raise CompareError(f"the runs were tested against different reference methods "
                           f"({references}); pool runs of one comparison")
    reference = references.pop()

    def pooled_scores(k: tuple) -> np.ndarray:
        return np.mean([scores[table[k]["model_dir"]]
                        for table, (_, scores) in zip(keyed, runs, strict=True)], axis=0)

    def mean(k: tuple, column: str) -> float:
        values = [table[k].get(column) for table in keyed]
        values = [float(v) for v in values if v is not None and not pd.isna(v)]
        return float(np.mean(values)) if values else float("nan")

    table = []
    for k in common:
        rows = [t[k] for t in keyed]
        values = pooled_scores(k)
        if lm:
            figure, low, high = perplexity_interval(values[:, 0], values[:, 1], n_bootstrap,
                                                    seed, level)
        else:
            figure, low, high = bootstrap_interval(values, n_bootstrap, seed, level)
        out = {"budget": float("nan") if k == ("dense",) else k[0], "method": rows[0]["method"],
               "trial_id": " / ".join(str(r["trial_id"]) for r in rows),
               "model_dir": " ; ".join(str(r["model_dir"]) for r in rows),
               "seeds": len(rows),
               "test_by_seed": " / ".join(f"{r[f'test_{metric}']:.4f}" for r in rows),
               f"test_{metric}": figure, "test_low": low, "test_high": high,
               "test_examples": len(values), "test_digest": rows[0]["test_digest"],
               "hardware": rows[0].get("hardware"), "reference": reference}
        if lm:
            out["test_tokens"] = int(values[:, 1].sum())
        for column in ("valid_error", "params_ratio", "latency_ms", "decode_ms",
                       "cost_examples", "cost_time_s", "train_examples", "train_time_s",
                       *(c for c in first.columns if c.startswith("latency_ms["))):
            if column in first:
                out[column] = mean(k, column)
        ref = None if k == ("dense",) else (k[0], reference)
        if ref in common and k != ref:
            mine, theirs = values, pooled_scores(ref)
            rows_d = (np.stack([mine[:, 0] - theirs[:, 0], mine[:, 1]], axis=1) if lm
                      else np.stack([mine - theirs, np.ones(len(mine))], axis=1))
            test = _sign_flip_test(rows_d, n_paired, seed, level)
            out.update({"diff_vs_reference": test["diff"], "diff_low": test["low"],
                        "diff_high": test["high"], "p_value": test["p_value"],
                        "significant": bool(test["p_value"] < alpha)})
        table.append(out)
    columns = [*_columns(lm), "seeds", "test_by_seed"]
    columns += sorted({c for row in table for c in row if c.startswith("latency_ms[")})
    result = pd.DataFrame(table, columns=columns)
    result.attrs.update({"axis": first.attrs.get("axis", "params_ratio"), "metric": metric,
                         "level": level, "alpha": alpha, "seed": seed,
                         "runs": [str(d) for d in out_dirs]})
    return result
