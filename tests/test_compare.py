"""The comparison protocol: bootstrap intervals and paired tests against hand-made correctness
vectors, budget matching by validation only, and a whole comparison of tiny saved models on
the test split of a synthetic task; for language modelling, perplexity intervals and paired
tests over blocks, test perplexity against transformers' own loss, and a whole comparison of
tiny saved Llamas on the token blocks of a synthetic corpus."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaForCausalLM,
)

from nas_prune import cli, compare, data
from nas_prune.options import ProfileOptions
from tests.conftest import randomise_
from tests.test_lm_pipeline import _document, _tiny_llama
from tests.test_train import _synthetic_csv

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# ------------------------------------------------------------------------------ statistics
def test_bootstrap_interval_contains_the_mean_narrows_and_is_seeded():
    rng = np.random.default_rng(1)
    few, many = rng.random(100) < 0.7, rng.random(10_000) < 0.7
    mean, low, high = compare.bootstrap_interval(few)
    assert mean == pytest.approx(few.mean()) and low < mean < high
    assert 0.05 < high - low < 0.3  # about 2 * 1.96 * sqrt(0.21 / 100) = 0.18
    big_mean, big_low, big_high = compare.bootstrap_interval(many)
    assert big_low < big_mean < big_high and big_low < 0.7 < big_high
    assert (big_high - big_low) < (high - low) / 5  # sqrt(100) times narrower, about
    assert compare.bootstrap_interval(few, seed=3) == compare.bootstrap_interval(few, seed=3)
    assert compare.bootstrap_interval(many, seed=3) != compare.bootstrap_interval(many, seed=4)
    wide = compare.bootstrap_interval(few, level=0.99)
    assert wide[1] <= low and wide[2] >= high
    with pytest.raises(ValueError, match="level must lie strictly between 0 and 1"):
        compare.bootstrap_interval(few, level=95)


def test_exact_mcnemar_matches_the_binomial_by_hand():
    # 8 discordant pairs for a, 1 for b: 2 * (C(9,0) + C(9,1)) / 2^9
    assert compare.mcnemar_exact(8, 1) == pytest.approx(2 * 10 / 512)
    assert compare.mcnemar_exact(1, 8) == pytest.approx(2 * 10 / 512)
    assert compare.mcnemar_exact(5, 5) == 1.0
    assert compare.mcnemar_exact(0, 0) == 1.0


def test_paired_test_detects_a_real_difference_and_not_a_zero_one():
    rng = np.random.default_rng(0)
    b = rng.random(500) < 0.6
    a = b.copy()
    a[np.flatnonzero(~b)[:60]] = True  # a is right on 60 more examples, wrong on none more
    better = compare.paired_test(a, b)
    assert better["diff"] == pytest.approx(60 / 500)
    assert better["only_a"] == 60 and better["only_b"] == 0
    assert better["p_value"] < 1e-10 and 0 < better["low"] < better["diff"] < better["high"]
    assert compare.paired_test(b, a)["diff"] == pytest.approx(-60 / 500)

    same = compare.paired_test(b, b)
    assert same["diff"] == 0 and same["p_value"] == 1.0
    swapped = b.copy()  # as many examples flipped each way: accuracy equal, models differ
    right, wrong = np.flatnonzero(b)[:30], np.flatnonzero(~b)[:30]
    swapped[right], swapped[wrong] = False, True
    even = compare.paired_test(swapped, b)
    assert even["diff"] == 0 and even["p_value"] > 0.5 and even["low"] < 0 < even["high"]
    with pytest.raises(ValueError, match="same, non-empty set of examples"):
        compare.paired_test(a, b[:-1])


# ------------------------------------------------------------------------------ the choice
def test_budget_matching_chooses_by_validation_within_the_budget():
    rows = pd.DataFrame([
        # method, model_dir, params_ratio, validation error, a test accuracy to ignore
        ("nas", "n1", 0.30, 0.20, 0.95),
        ("nas", "n2", 0.45, 0.10, 0.70),
        ("nas", "n3", 0.60, 0.05, 0.60),
        ("nas", "n4", 0.20, float("nan"), 0.99),  # never scored on validation: never chosen
        ("pins", "p1", 0.50, 0.15, 0.99),
        ("pins", "p2", 0.40, 0.15, 0.50),  # ties p1 on validation and is smaller
        ("layer_drop", "l1", 0.70, 0.01, 0.99),
    ], columns=["method", "model_dir", "params_ratio", "error", "test_accuracy"])
    chosen = compare.match_budgets(rows, [0.5, 0.35, 1.0])
    picked = {(r.budget, r.method): r.model_dir for r in chosen.itertuples()}
    assert picked == {
        (0.35, "nas"): "n1",  # the only scored one within 0.35, however good n4 tests
        (0.5, "nas"): "n2", (0.5, "pins"): "p2",
        (1.0, "layer_drop"): "l1", (1.0, "nas"): "n3", (1.0, "pins"): "p2",
    }
    assert (chosen["params_ratio"] <= chosen["budget"]).all()
    assert chosen["budget"].is_monotonic_increasing
    # the test column plays no part: scrambling it changes nothing
    scrambled = rows.assign(test_accuracy=rows["test_accuracy"].to_numpy()[::-1])
    again = compare.match_budgets(scrambled, [0.5, 0.35, 1.0])
    assert list(again["model_dir"]) == list(chosen["model_dir"])
    with pytest.raises(ValueError, match="axis must be one of params_ratio, latency_ms"):
        compare.match_budgets(rows, [0.5], axis="flops")
    with pytest.raises(ValueError, match="lack column.s. latency_ms"):
        compare.match_budgets(rows, [0.5], axis="latency_ms")


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def task(tmp_path_factory, tokenizer):
    csv = _synthetic_csv(tmp_path_factory.mktemp("data") / "toy.csv")
    return data.tokenize(data.load_task(csv, seed=0), tokenizer, max_length=32)


def _stock_bert(path, tokenizer, seed: int) -> str:
    """A tiny stock BERT classifier with random O(0.1..1) weights (so its predictions vary
    from example to example), saved with the tokenizer."""
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=48, num_labels=2)
    randomise_(BertForSequenceClassification(config), seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("models")
    # seed 0 predicts both classes, seeds 1 and 3 one class each: a and b disagree
    return {name: _stock_bert(root / name, tokenizer, seed)
            for name, seed in (("dense", 3), ("a", 0), ("b", 1))}


def _accuracy_by_hand(model_dir, task, tokenizer) -> float:
    model = BertForSequenceClassification.from_pretrained(model_dir).eval()
    right = 0
    with torch.no_grad():
        for ex in task.test:
            ids = torch.tensor([ex["input_ids"]])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            right += int(logits.argmax(-1).item() == ex["labels"])
    return right / len(task.test)


FAST_LATENCY = ProfileOptions(repeats=1, warmup=0, seq_len=8)


def test_comparison_of_saved_models_on_the_same_test_examples(model_dirs, task, tokenizer,
                                                              tmp_path):
    a, b = model_dirs["a"], model_dirs["b"]
    candidates = pd.DataFrame([
        # method, trial, model_dir, params_ratio, validation error, own cost, shared cost
        ("nas", "t1", a, 0.40, 0.30, 0, 0.0, 5000, 50.0),
        ("nas", "t2", b, 0.80, 0.20, 0, 0.0, 5000, 50.0),
        ("pins", "p-0.5", b, 0.45, 0.35, 700, 7.0, None, None),
        ("pins", "p-0.9", a, 0.90, 0.50, 900, 9.0, None, None),  # trained, never chosen
        ("layer_drop", "layers-1", a, 0.70, 0.25, 300, 3.0, None, None),
    ], columns=["method", "trial_id", "model_dir", "params_ratio", "error", "train_examples",
                "train_time_s", "shared_train_examples", "shared_train_time_s"])
    frame = compare.compare(candidates, model_dirs["dense"], task, tokenizer, [0.5, 1.0],
                            latency=FAST_LATENCY, n_bootstrap=200, n_paired=500)
    got = [(r.budget if r.method != "dense" else None, r.method, r.trial_id)
           for r in frame.itertuples()]
    assert got == [(None, "dense", "dense"), (0.5, "nas", "t1"), (0.5, "pins", "p-0.5"),
                   (1.0, "layer_drop", "layers-1"), (1.0, "nas", "t2"), (1.0, "pins", "p-0.5")]
    # the same test examples for every model, and the accuracy is theirs
    n = len(task.test)
    assert (frame["test_examples"] == n).all()
    assert frame["test_digest"].nunique() == 1
    assert frame["test_digest"].iloc[0] == compare.test_digest(task)
    by_dir = {d: _accuracy_by_hand(d, task, tokenizer) for d in model_dirs.values()}
    for r in frame.itertuples():
        assert r.test_accuracy == pytest.approx(by_dir[r.model_dir])
        assert r.test_low <= r.test_accuracy <= r.test_high
        assert r.latency_ms > 0 and r.hardware
    # paired against NAS at the same budget; NAS itself and the dense model are not tested
    nas = frame[frame["method"] == "nas"].set_index("budget")
    for r in frame[~frame["method"].isin(["nas", "dense"])].itertuples():
        assert r.diff_vs_reference == pytest.approx(r.test_accuracy
                                                    - nas.loc[r.budget, "test_accuracy"])
        assert 0 <= r.p_value <= 1 and isinstance(r.significant, bool)
    assert frame.loc[frame["method"].isin(["nas", "dense"]), "p_value"].isna().all()
    differ = frame[(frame["budget"] == 0.5) & (frame["method"] == "pins")].iloc[0]
    assert differ["diff_vs_reference"] != 0 and differ["p_value"] < 1  # b against a
    same_model = frame[(frame["budget"] == 1.0) & (frame["method"] == "pins")].iloc[0]
    assert same_model["diff_vs_reference"] == 0 and same_model["p_value"] == 1.0  # both b
    # cost: NAS's shared cost at every budget, a one-budget method its own run per budget
    cost = {(r.budget, r.method): r.cost_examples for r in frame.itertuples()
            if r.method != "dense"}
    assert cost == {(0.5, "nas"): 5000, (0.5, "pins"): 700, (1.0, "layer_drop"): 300,
                    (1.0, "nas"): 5000, (1.0, "pins"): 700}
    totals = compare.total_costs(frame, candidates).set_index("method")
    assert totals.loc["nas", "examples"] == 5000 and totals.loc["nas", "models"] == 2
    # every model a method trained is paid for, chosen or not
    assert totals.loc["pins", "examples"] == 700 + 900 and totals.loc["pins", "models"] == 2

    markdown = compare.write_comparison(frame, tmp_path / "cmp", candidates)
    text = markdown.read_text()
    assert f"same {n} test examples" in text and text.count("\n| ") >= 7
    assert "| 0.5 | pins | p-0.5 |" in text
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 1000
    assert len(pd.read_csv(tmp_path / "cmp" / "comparison.csv")) == len(frame)


def _seed_run(root: Path, choices: dict[str, str], model_dirs, task, tokenizer,
              **kwargs) -> Path:
    """A run's compare directory: NAS and PINS each offer one model at budget 0.5 (`choices`:
    method -> model key), NAS at cost 5000 shared, PINS 700 of its own."""
    candidates = pd.DataFrame([
        ("nas", f"nas-{choices['nas']}", model_dirs[choices["nas"]], 0.45, 0.2, 0, 0.0, 5000),
        ("pins", f"pins-{choices['pins']}", model_dirs[choices["pins"]], 0.48, 0.3, 700, 7.0,
         None),
    ], columns=["method", "trial_id", "model_dir", "params_ratio", "error", "train_examples",
                "train_time_s", "shared_train_examples"])
    scores: dict[str, np.ndarray] = {}
    frame = compare.compare(candidates, model_dirs["dense"], task, tokenizer, [0.5],
                            measure_latency=False, n_bootstrap=100, n_paired=200,
                            scores_out=scores, **kwargs)
    compare.write_comparison(frame, root / "compare", candidates, scores)
    return root / "compare"


def test_seeds_are_pooled_per_test_example(model_dirs, task, tokenizer, tmp_path):
    """Runs of one recipe (seeds) pool into one table: each figure the mean over the runs'
    own choices, the paired difference per example averaged over the runs first, so two runs
    that swap which method got which model tie exactly."""
    run1 = _seed_run(tmp_path / "s1", {"nas": "a", "pins": "b"}, model_dirs, task, tokenizer)
    run2 = _seed_run(tmp_path / "s2", {"nas": "b", "pins": "a"}, model_dirs, task, tokenizer)
    run3 = _seed_run(tmp_path / "s3", {"nas": "a", "pins": "b"}, model_dirs, task, tokenizer)
    acc = {k: _accuracy_by_hand(model_dirs[k], task, tokenizer) for k in ("a", "b", "dense")}
    assert acc["a"] != acc["b"]
    # what a run stores is what pooling reads: the per-example correctness of each model
    frame, scores = compare.read_comparison(run1)
    assert frame.attrs["axis"] == "params_ratio" and frame.attrs["metric"] == "accuracy"
    assert set(scores) == set(frame["model_dir"])
    for key in ("dense", "a", "b"):
        assert scores[model_dirs[key]].mean() == pytest.approx(acc[key])

    swapped = compare.pool_seeds([run1, run2], n_bootstrap=100, n_paired=500)
    rows = swapped.set_index("method")
    assert list(swapped["method"]) == ["dense", "nas", "pins"]
    assert (swapped["seeds"] == 2).all() and (swapped["test_examples"] == len(task.test)).all()
    for method in ("nas", "pins"):
        assert rows.loc[method, "test_accuracy"] == pytest.approx((acc["a"] + acc["b"]) / 2)
        assert rows.loc[method, "test_low"] <= rows.loc[method, "test_accuracy"]
    assert rows.loc["nas", "trial_id"] == "nas-a / nas-b"
    assert rows.loc["nas", "test_by_seed"] == f"{acc['a']:.4f} / {acc['b']:.4f}"
    assert rows.loc["dense", "test_accuracy"] == pytest.approx(acc["dense"])
    pins = rows.loc["pins"]
    assert pins["diff_vs_reference"] == 0 and pins["p_value"] == 1.0 and not pins["significant"]
    assert rows.loc["nas", "cost_examples"] == 5000 and pins["cost_examples"] == 700
    assert rows.loc["nas", "params_ratio"] == pytest.approx(0.45)

    kept = compare.pool_seeds([run1, run3], n_bootstrap=100, n_paired=500).set_index("method")
    assert kept.loc["pins", "diff_vs_reference"] == pytest.approx(acc["b"] - acc["a"])
    assert kept.loc["pins", "p_value"] < 1
    assert kept.loc["pins", "diff_low"] <= acc["b"] - acc["a"] <= kept.loc["pins", "diff_high"]

    # the route users take: nas-prune compare --compare.pool, into OUT/compare
    pooled = tmp_path / "pooled"
    assert cli.main(["compare", "--out", str(pooled), "--compare.pool",
                     json.dumps([str(run1.parent), str(run2.parent)])]) == 0
    text = (pooled / "compare" / "comparison.md").read_text()
    assert "Pooled over 2 runs" in text and "| by seed |" in text
    assert f"| 0.5 | pins | pins-b / pins-a | {(acc['a'] + acc['b']) / 2:.4f}" in text
    written = pd.read_csv(pooled / "compare" / "comparison.csv")
    assert list(written["test_by_seed"]) == list(swapped["test_by_seed"])
    assert (pooled / "compare" / "comparison.png").stat().st_size > 1000


def test_pooling_refuses_runs_it_cannot_pool(model_dirs, task, tokenizer, tmp_path):
    run1 = _seed_run(tmp_path / "s1", {"nas": "a", "pins": "b"}, model_dirs, task, tokenizer)
    other = _seed_run(tmp_path / "s2", {"nas": "a", "pins": "b"}, model_dirs, task, tokenizer,
                      max_test_examples=len(task.test) - 3)
    with pytest.raises(compare.CompareError, match="different test examples"):
        compare.pool_seeds([run1, other])
    with pytest.raises(compare.CompareError, match="at least two runs"):
        compare.pool_seeds([run1])
    (other / "test_scores.parquet").unlink()
    with pytest.raises(compare.CompareError, match="lacks test_scores.parquet: run the compare"):
        compare.pool_seeds([run1, other])


def test_latency_budgets_are_measured_here_for_every_candidate(model_dirs, task, tokenizer,
                                                               tmp_path):
    pytest.importorskip("onnxruntime")
    candidates = pd.DataFrame({
        "method": ["nas", "pins"], "model_dir": [model_dirs["a"], model_dirs["b"]],
        "params_ratio": [0.5, 0.5], "error": [0.2, 0.3],
        "latency_ms": [1e9, 1e9],  # stale numbers from elsewhere are replaced
    })
    # every model timed by the profiler actors on every hardware type asked for
    latency = dataclasses.replace(FAST_LATENCY, hardware=["cpu", "cpu-onnxruntime"])
    frame = compare.compare(candidates, model_dirs["dense"], task, tokenizer, [1e6],
                            axis="latency_ms", latency=latency, n_bootstrap=50,
                            n_paired=50)
    assert list(frame["method"]) == ["dense", "nas", "pins"]
    assert (frame["latency_ms"] < 1e6).all() and (frame["hardware"] == "cpu").all()
    assert frame["latency_ms"].tolist() == frame["latency_ms[cpu]"].tolist()
    assert (frame["latency_ms[cpu-onnxruntime]"] > 0).all()
    # the plot: the budget axis (cpu latency) and one more panel for the other type
    png = compare.plot_comparison(frame, tmp_path / "cmp.png")
    one = compare.plot_comparison(frame.drop(columns=["latency_ms[cpu-onnxruntime]"]),
                                  tmp_path / "one.png")
    import matplotlib.image

    assert (matplotlib.image.imread(png).shape[1]
            > 1.8 * matplotlib.image.imread(one).shape[1])
    assert list(frame["trial_id"]) == ["dense", "a", "b"]  # named after their directories
    with pytest.raises(ValueError, match="no candidate fits"):
        compare.compare(candidates, model_dirs["dense"], task, tokenizer, [0.0],
                        axis="latency_ms", latency=FAST_LATENCY)
    gone = candidates.assign(model_dir=[model_dirs["a"], str(Path(model_dirs["b"]) / "gone")])
    with pytest.raises(ValueError, match="gone holds no saved model"):
        compare.compare(gone, model_dirs["dense"], task, tokenizer, [1.0],
                        measure_latency=False)


def test_one_sub_network_shape_is_timed_once(model_dirs, task, tokenizer):
    """A NAS sub-network and its refined copy (one config, two saved models) get one latency,
    so they cannot fall on either side of a budget; a baseline with the same config string is
    timed on its own."""
    config = json.dumps({"num_layers": 2, "num_heads": 4, "num_units": 48})
    candidates = pd.DataFrame({
        "method": ["nas", "nas+refine", "pins"],
        "model_dir": [model_dirs["a"], model_dirs["b"], model_dirs["dense"]],
        "config": [config, json.dumps(json.loads(config), sort_keys=True), config],
        "params_ratio": [0.5, 0.5, 0.5], "error": [0.2, 0.1, 0.3]})
    frame = compare.compare(candidates, model_dirs["dense"], task, tokenizer, [1e6],
                            axis="latency_ms", latency=FAST_LATENCY, n_bootstrap=20,
                            n_paired=20).set_index("method")
    assert frame.loc["nas", "latency_ms"] == frame.loc["nas+refine", "latency_ms"]
    # the baseline (the dense model's directory) is timed separately: one repeat of two
    # independent timings agreeing to the last bit would be a coincidence
    assert frame.loc["pins", "latency_ms"] != frame.loc["nas", "latency_ms"]


def test_test_predictions_score_the_test_split_in_order(model_dirs, task, tokenizer):
    logits, labels = compare.test_predictions(model_dirs["a"], task, tokenizer, batch_size=7)
    assert logits.shape == (len(task.test), 2)
    assert list(labels) == list(task.test["labels"])
    model = BertForSequenceClassification.from_pretrained(model_dirs["a"])
    again, _ = compare.test_predictions(model, task, tokenizer)
    np.testing.assert_allclose(again, logits, atol=1e-5)


# ------------------------------------------------------------------------------ perplexity
def test_perplexity_interval_contains_the_point_narrows_and_is_seeded():
    rng = np.random.default_rng(0)
    tokens = np.full(1000, 15)
    nll = rng.gamma(20.0, 0.15, size=1000) * 15  # about 3 nats per token, varying by block
    ppl, low, high = compare.perplexity_interval(nll[:40], tokens[:40])
    assert ppl == pytest.approx(math.exp(nll[:40].sum() / 600)) and low < ppl < high
    big, big_low, big_high = compare.perplexity_interval(nll, tokens)
    assert big == pytest.approx(math.exp(nll.sum() / tokens.sum())) and big_low < big < big_high
    assert (big_high - big_low) < (high - low) / 3  # sqrt(25) times narrower, about
    assert compare.perplexity_interval(nll, tokens, seed=3) == \
        compare.perplexity_interval(nll, tokens, seed=3)
    assert compare.perplexity_interval(nll, tokens, seed=3) != \
        compare.perplexity_interval(nll, tokens, seed=4)
    # a block of fewer tokens weighs less: the ratio of sums, not the mean of ratios
    assert compare.perplexity_interval([30.0, 2.0], [10, 1], n=10)[0] == \
        pytest.approx(math.exp(32 / 11))
    with pytest.raises(ValueError, match="one NLL and one token count per test block"):
        compare.perplexity_interval(nll, tokens[:-1])


def test_paired_perplexity_test_finds_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(1)
    tokens = np.full(200, 15)
    b = rng.gamma(20.0, 0.15, size=200) * 15
    worse = b + 15 * (0.05 + 0.05 * rng.standard_normal(200))  # 0.05 nats per token worse
    test = compare.paired_perplexity_test(worse, b, tokens, n=2000)
    assert test["diff"] == pytest.approx((worse - b).sum() / tokens.sum())
    assert test["p_value"] < 0.01 and 0 < test["low"] < test["diff"] < test["high"]
    assert test["p_value"] >= 1 / 2001  # a permutation p-value is never 0
    flipped = compare.paired_perplexity_test(b, worse, tokens, n=2000)
    assert flipped["diff"] == pytest.approx(-test["diff"]) and flipped["p_value"] < 0.01
    same = compare.paired_perplexity_test(b, b, tokens, n=2000)
    assert same["diff"] == 0 and same["p_value"] == 1.0 and same["a_lower"] == 0
    noise = b + 15 * 0.05 * rng.standard_normal(200)  # no difference on average
    null = compare.paired_perplexity_test(noise - (noise - b).mean(), b, tokens, n=2000)
    assert abs(null["diff"]) < 1e-12 and null["p_value"] > 0.5
    assert null["low"] < 0 < null["high"]
    with pytest.raises(ValueError, match="same, non-empty set of blocks"):
        compare.paired_perplexity_test(b, b[:-1], tokens)


@pytest.fixture(scope="module")
def lm_task(tmp_path_factory, word_tokenizer):
    """A synthetic corpus of 150 documents, cut into blocks of 16 tokens."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(150):
        (root / f"doc{i:03d}.txt").write_text(_document(rng))
    return data.tokenize(data.load_task(str(root)), word_tokenizer, 16)


def _tempered(model: LlamaForCausalLM, factor: float) -> LlamaForCausalLM:
    """`model` with its LM head scaled by `factor` (sharper or flatter predictions)."""
    with torch.no_grad():
        model.lm_head.weight.mul_(factor)
    return model


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory, word_tokenizer):
    """Saved causal LMs: the dense stock Llama, a tempered copy of it, the same weights saved
    as our decoder checkpoint, and an unrelated Llama."""
    from nas_prune.checkpoint import save_checkpoint
    from nas_prune.decoder_loading import from_hf

    root = tmp_path_factory.mktemp("lms")
    dirs = {}
    for name, model in (("dense", _tiny_llama(word_tokenizer)),
                        ("tempered", _tempered(_tiny_llama(word_tokenizer), 3.0)),
                        ("other", _tiny_llama(word_tokenizer, seed=1))):
        model.save_pretrained(root / name)
        word_tokenizer.save_pretrained(root / name)
        dirs[name] = str(root / name)
    save_checkpoint(root / "ours", from_hf(_tiny_llama(word_tokenizer)), word_tokenizer,
                    {"kind": "teacher", "task_kind": "lm", "finished": True})
    dirs["ours"] = str(root / "ours")
    return dirs


def _hf_perplexity(model_dir, task, tokenizer) -> float:
    """exp of transformers' own mean loss over the test blocks (all of one length)."""
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        losses = [float(model(**b).loss) for b in data.make_loader(task.test, tokenizer, 1)]
    return math.exp(np.mean(losses))


def test_test_perplexity_is_transformers_loss(lm_task, lm_dirs, word_tokenizer):
    nll, tokens = compare.test_block_nll(lm_dirs["dense"], lm_task, word_tokenizer,
                                         batch_size=5)
    assert len(nll) == len(lm_task.test) >= 40 and (tokens == 15).all()
    expected = _hf_perplexity(lm_dirs["dense"], lm_task, word_tokenizer)
    assert math.exp(nll.sum() / tokens.sum()) == pytest.approx(expected, rel=1e-5)
    ours, _ = compare.test_block_nll(lm_dirs["ours"], lm_task, word_tokenizer)  # our class
    np.testing.assert_allclose(ours, nll, rtol=1e-5)
    # the interval over all blocks is narrower than over a few
    ppl, low, high = compare.perplexity_interval(nll, tokens)
    few = compare.perplexity_interval(nll[:8], tokens[:8])
    assert ppl == pytest.approx(expected, rel=1e-5) and low < ppl < high
    assert few[1] < few[0] < few[2] and high - low < few[2] - few[1]


class _Biased(torch.nn.Module):
    """A causal LM with a fixed bias added to its logits."""

    def __init__(self, inner: torch.nn.Module, bias: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("bias", bias)

    def forward(self, **batch):
        return SimpleNamespace(logits=self.inner(**batch).logits + self.bias)


def test_paired_test_on_real_blocks(lm_task, lm_dirs, word_tokenizer):
    model = LlamaForCausalLM.from_pretrained(lm_dirs["dense"]).eval()
    nll, tokens = compare.test_block_nll(model, lm_task, word_tokenizer)
    bias = torch.randn(len(word_tokenizer), generator=torch.Generator().manual_seed(0))
    biased, _ = compare.test_block_nll(_Biased(model, bias), lm_task, word_tokenizer)
    real = compare.paired_perplexity_test(biased, nll, tokens, n=2000)
    assert real["diff"] > 0 and real["p_value"] < 0.01 and real["low"] > 0
    again, _ = compare.test_block_nll(model, lm_task, word_tokenizer, batch_size=3)
    null = compare.paired_perplexity_test(again, nll, tokens, n=2000)
    assert abs(null["diff"]) < 1e-6 and null["p_value"] > 0.5


def test_comparison_of_saved_language_models(lm_task, lm_dirs, word_tokenizer, tmp_path):
    d = lm_dirs
    candidates = pd.DataFrame([
        # method, trial, model_dir, params_ratio, validation perplexity, own, shared cost
        ("nas", "small", d["tempered"], 0.40, 30.0, 0, 0.0, 4000, 40.0),
        ("nas", "big", d["dense"], 0.80, 20.0, 0, 0.0, 4000, 40.0),
        ("nas", "bigger", d["other"], 0.90, 25.0, 0, 0.0, 4000, 40.0),  # worse on validation
        ("llm_pruner", "params-0.5", d["ours"], 0.45, 22.0, 160, 2.0, None, None),
        ("layer_drop", "layers-2", d["other"], 0.70, 50.0, 300, 3.0, None, None),
    ], columns=["method", "trial_id", "model_dir", "params_ratio", "error", "train_examples",
                "train_time_s", "shared_train_examples", "shared_train_time_s"])
    frame = compare.compare(candidates, d["dense"], lm_task, word_tokenizer, [0.5, 1.0],
                            latency=FAST_LATENCY, n_bootstrap=200, n_paired=1000)
    assert list(frame["method"])[0] == "dense"
    picked = {(r.budget, r.method): r.trial_id for r in frame.itertuples() if r.method != "dense"}
    assert picked == {(0.5, "llm_pruner"): "params-0.5", (0.5, "nas"): "small",
                      (1.0, "layer_drop"): "layers-2", (1.0, "llm_pruner"): "params-0.5",
                      (1.0, "nas"): "big"}  # the lowest validation perplexity in each budget
    assert frame.attrs["metric"] == "perplexity" and "test_accuracy" not in frame
    n = len(lm_task.test)
    assert (frame["test_examples"] == n).all() and (frame["test_tokens"] == 15 * n).all()
    assert frame["test_digest"].nunique() == 1
    by_dir = {m: _hf_perplexity(m, lm_task, word_tokenizer)
              for m in (d["dense"], d["tempered"], d["other"])}
    by_dir[d["ours"]] = by_dir[d["dense"]]
    for r in frame.itertuples():
        assert r.test_perplexity == pytest.approx(by_dir[r.model_dir], rel=1e-5)
        assert r.test_low < r.test_perplexity < r.test_high
        assert r.latency_ms > 0 and r.decode_ms > 0
    # paired against NAS: the tempered model differs for real, the same weights do not
    tests = frame.set_index(["budget", "method"])
    real = tests.loc[(0.5, "llm_pruner")]
    assert real["diff_vs_reference"] == pytest.approx(
        math.log(real["test_perplexity"]) - math.log(tests.loc[(0.5, "nas"), "test_perplexity"]))
    assert real["significant"] and real["p_value"] < 0.01
    same = tests.loc[(1.0, "llm_pruner")]
    assert abs(same["diff_vs_reference"]) < 1e-6 and not same["significant"]
    assert tests.loc[(1.0, "nas"), "cost_examples"] == 4000
    assert tests.loc[(0.5, "llm_pruner"), "cost_examples"] == 160

    markdown = compare.write_comparison(frame, tmp_path / "cmp", candidates)
    text = markdown.read_text()
    assert f"same {n} test blocks" in text and "lower is better" in text
    assert "| 0.5 | llm_pruner | params-0.5 |" in text and "Δ log-ppl" in text
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 1000
    assert len(pd.read_csv(tmp_path / "cmp" / "comparison.csv")) == len(frame)

    capped = compare.compare(candidates, d["dense"], lm_task, word_tokenizer, [0.5],
                             measure_latency=False, n_bootstrap=50, n_paired=50,
                             max_test_examples=10)
    assert (capped["test_examples"] == 10).all() and (capped["test_tokens"] == 150).all()
    assert capped["test_digest"].iloc[0] != frame["test_digest"].iloc[0]
