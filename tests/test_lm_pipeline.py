"""Language modelling and decoders through the whole pipeline: text corpora cut into token
blocks, perplexity against transformers' own loss, the next-token and vocabulary-distillation
losses, early refusals, and `nas-prune run` end to end on tiny random Llama models (language
modelling, and classification with a decoder), their exports loading as stock transformers
models in a fresh process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nas_prune import cli, corpus, data, report, results
from nas_prune.errors import DataError, OptionsError
from nas_prune.evaluate import evaluate
from nas_prune.export import SUBNETWORK_FILE
from nas_prune.options import TaskOptions
from nas_prune.train import kd_loss, task_loss
from tests.conftest import WORDS
from tests.test_train import _synthetic_csv


def _document(rng: np.random.Generator) -> str:
    """A few sentences a small model can learn something of: each starts with "the", words
    follow the list's order with skips."""
    sentences = []
    for _ in range(int(rng.integers(3, 7))):
        start = int(rng.integers(0, len(WORDS) - 8))
        sentences.append(" ".join(WORDS[start:start + int(rng.integers(4, 9))]) + " .")
    return " ".join(sentences)



@pytest.fixture(scope="module", autouse=True)
def _shut_ray_down_after():
    """The runs below start a local Ray in this process; later test modules start their own."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """40 documents, one text file each."""
    root = tmp_path_factory.mktemp("speeches")
    rng = np.random.default_rng(0)
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(_document(rng))
    return root


def _tiny_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, max_position_embeddings=64, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, word_tokenizer):
    out = tmp_path_factory.mktemp("tiny_llama")
    _tiny_llama(word_tokenizer).save_pretrained(out)
    word_tokenizer.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------ corpora
def test_text_files_are_documents_split_by_document(tmp_path, corpus_dir):
    task = data.load_task(str(corpus_dir))
    assert task.spec.kind == "lm" and task.spec.metric == "perplexity"
    assert (len(task.train), len(task.valid), len(task.test)) == (22, 10, 8)  # 40 * .3, .2
    splits = [set(s["text"]) for s in (task.train, task.valid, task.test)]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    # one file, documents at blank lines; capped per split
    one = tmp_path / "notes.txt"
    one.write_text("\n\n".join(f"paragraph {i} about work" for i in range(20)))
    task = data.load_task(TaskOptions(task=str(one), max_examples=3))
    assert task.spec.name == "notes" and task.spec.kind == "lm"
    assert len(task.train) == 3 and all(t.startswith("paragraph") for t in task.train["text"])
    # a table's text column, as language modelling when asked
    csv = _synthetic_csv(tmp_path / "toy.csv")
    task = data.load_task(TaskOptions(task=csv, kind="lm"))
    assert task.spec.kind == "lm" and "wonderful" in " ".join(task.train["text"])
    assert data.task_kind(TaskOptions(task=csv)) == "classification"
    assert data.task_kind(TaskOptions(task=str(one))) == "lm"


def test_too_little_text_is_a_clear_error(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only one paragraph")
    with pytest.raises(DataError, match="too few to hold out"):
        data.load_task(str(short))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no text files"):
        data.load_task(str(empty))


def test_builtin_corpus_ships_offline():
    task = data.load_task("convention_speeches")
    assert task.spec.source == "builtin" and task.spec.kind == "lm"
    assert len(task.train) + len(task.valid) + len(task.test) == 189
    assert data.task_name(TaskOptions(task="convention_speeches")) == "convention_speeches"


def test_blocks_are_the_documents_joined_by_eos(corpus_dir, word_tokenizer):
    task = data.load_task(str(corpus_dir))
    blocks = corpus.tokenize_blocks(task.valid, word_tokenizer, 16, "x", "valid")
    stream = []
    for doc in task.valid["text"]:
        stream += word_tokenizer(doc, add_special_tokens=False)["input_ids"]
        stream.append(word_tokenizer.eos_token_id)
    n = len(stream) // 16
    assert blocks["input_ids"] == [stream[i * 16:(i + 1) * 16] for i in range(n)]
    assert blocks["labels"] == blocks["input_ids"]
    batch = next(iter(data.make_loader(blocks, word_tokenizer, 4)))
    assert batch["labels"].shape == (4, 16) and bool(batch["attention_mask"].all())


# ------------------------------------------------------------------------------ scoring
def test_perplexity_is_transformers_loss(corpus_dir, word_tokenizer):
    from nas_prune.decoder_loading import from_hf

    hf = _tiny_llama(word_tokenizer)
    ours = from_hf(hf).eval()
    task = data.tokenize(data.load_task(str(corpus_dir)), word_tokenizer, 16)
    scores = evaluate(ours, data.make_loader(task.valid, word_tokenizer, 4), task.spec)
    with torch.no_grad():  # every block has 15 predicted tokens: the mean of the means
        losses = [float(hf(**b).loss) for b in data.make_loader(task.valid, word_tokenizer, 1)]
    assert scores["tokens"] == 15 * len(task.valid)
    assert scores["loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert scores["metric"] == scores["error"] == pytest.approx(math.exp(np.mean(losses)),
                                                                rel=1e-5)


def test_language_modelling_losses(word_tokenizer):
    hf = _tiny_llama(word_tokenizer)
    ids = torch.randint(3, len(word_tokenizer), (2, 10), generator=torch.Generator()
                        .manual_seed(0))
    with torch.no_grad():
        out = hf(input_ids=ids, labels=ids)
    assert float(task_loss(out.logits, ids)) == pytest.approx(float(out.loss), rel=1e-6)
    teacher = out.logits + torch.randn(out.logits.shape, generator=torch.Generator()
                                       .manual_seed(1))
    s, t = out.logits[:, :-1].flatten(0, 1), teacher[:, :-1].flatten(0, 1)
    expected = (torch.nn.functional.cross_entropy(s / 2, torch.softmax(t / 2, -1)) * 4
                + torch.nn.functional.cross_entropy(s, ids[:, 1:].flatten()))
    assert float(kd_loss(out.logits, teacher, ids, 2.0)) == pytest.approx(float(expected),
                                                                         rel=1e-5)


def test_baselines_that_cannot_prune_the_run_are_refused_first(tmp_path, corpus_dir,
                                                               tiny_llama_dir):
    from nas_prune import pipeline
    from nas_prune.errors import BaselineError
    from nas_prune.options import PipelineOptions

    opts = PipelineOptions(model=str(tiny_llama_dir), data=TaskOptions(str(corpus_dir)),
                           baselines=["layer_drop", "pins"])
    with pytest.raises(BaselineError, match="pins prunes encoder models for classification.*"
                                            "choose from layer_drop, llm_pruner"):
        pipeline.run(tmp_path / "run", opts)
    assert not (tmp_path / "run").exists()


def test_an_encoder_cannot_model_language(tmp_path, corpus_dir):
    from nas_prune import pipeline
    from nas_prune.options import PipelineOptions
    from nas_prune.rundir import RunDir

    opts = PipelineOptions(model=data.default_model_path(), data=TaskOptions(str(corpus_dir)))
    with pytest.raises(OptionsError, match="language modelling needs a causal LM"):
        pipeline.finetune(RunDir(tmp_path / "run"), opts)
    assert not (tmp_path / "run" / "teacher").exists()


# ------------------------------------------------------------------------------ end to end
_FRESH = textwrap.dedent(
    """
    import json, sys
    sys.modules["nas_prune"] = None  # the export must load without nas_prune
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    model_dir, kind, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    cls = AutoModelForCausalLM if kind == "lm" else AutoModelForSequenceClassification
    model = cls.from_pretrained(model_dir).eval()  # no trust_remote_code: a stock model
    x = torch.tensor(ids)
    with torch.no_grad():
        out = model(input_ids=x, labels=x if kind == "lm" else None)
    result = {"class": type(model).__name__, "logits": out.logits.tolist()}
    if kind == "lm":
        result["generated"] = model.generate(x[:1, :4], max_new_tokens=6, do_sample=False,
                                             pad_token_id=0).tolist()
    print(json.dumps(result))
    """
)


def _fresh(model_dir, kind: str, ids: torch.Tensor) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, "-c", _FRESH, str(model_dir), kind,
                           json.dumps(ids.tolist())], env=env, capture_output=True, text=True,
                          timeout=300, check=False, cwd=model_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_language_modelling_run_end_to_end(tmp_path, corpus_dir, tiny_llama_dir,
                                           word_tokenizer):
    from nas_prune.checkpoint import load_checkpoint, read_meta
    from nas_prune.space import make_space

    out = tmp_path / "run"
    code = cli.main([
        "run", "--preset", "quick-lm", "--out", str(out), "--model", str(tiny_llama_dir),
        "--data.task", str(corpus_dir), "--finetune.max_length", "16",
        "--supernet.max_length", "16", "--supernet.max_steps", "6",
        "--supernet.rewire_batches", "2", "--search.num_samples", "6",
        "--search.valid_examples", "12", "--search.batch_size", "4",
        "--profile.seq_len", "16", "--profile.repeats", "2",
        "--baselines", "[layer_drop, llm_pruner]", "--baseline_options", json.dumps({
            "layer_drop": {"layers": [2], "max_steps": 2, "batch_size": 4, "max_length": 16,
                           "calibration_blocks": 2},
            "llm_pruner": {"params_ratios": [0.8], "calibration_blocks": 2,
                           "max_length": 16}})])
    assert code == 0
    teacher = read_meta(out / "teacher")
    assert teacher["kind"] == "teacher" and teacher["task_kind"] == "lm"
    assert teacher["train_examples"] == 0  # the pre-trained model, adopted as is
    frame = results.load(out / "results")
    nas, dense = frame[frame["method"] == "nas"], frame[frame["method"] == "dense"]
    assert nas["trial_id"].nunique() == 6 and len(dense) == 1
    # the decoder baselines, on the same data into the same store, timed prefill + decode
    for method, trial in (("layer_drop", "layers-2"), ("llm_pruner", "params-0.8")):
        row = frame[frame["method"] == method]
        assert list(row["trial_id"]) == [trial], frame[["method", "trial_id"]]
        assert row["perplexity"].notna().all() and (row["decode_ms"] > 0).all()
        assert (out / "baselines" / method / trial / "config.json").exists()
    assert float(frame.loc[frame["method"] == "llm_pruner", "params_ratio"].iloc[0]) <= 0.8
    assert set(frame["family"]) == {"llama"} and set(frame["task_kind"]) == {"lm"}
    assert (frame["metric_name"] == "perplexity").all()
    assert np.allclose(frame["perplexity"], frame["error"])
    assert set(nas["fidelity_unit"]) == {"tokens"}
    complete = nas[nas["status"] == "ok"]
    assert (complete["fidelity"] == 12 * 15).all()  # 12 blocks of 16 tokens, 15 predicted

    # the dense row is the unpruned pre-trained model's perplexity on the same blocks
    hf = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    task = data.tokenize(data.load_task(str(corpus_dir)), word_tokenizer, 16)
    from nas_prune.evaluate import validation_subset

    valid = validation_subset(task.valid, 0, 12)
    with torch.no_grad():
        losses = [float(hf(**b).loss) for b in data.make_loader(valid, word_tokenizer, 1)]
    assert float(dense["perplexity"].iloc[0]) == pytest.approx(math.exp(np.mean(losses)),
                                                               rel=1e-4)

    # each export is a stock Llama that computes what the supernet's sub-network computes
    supernet, meta = load_checkpoint(out / "supernet")
    assert meta["space"] == "decoder_small" and meta["task_kind"] == "lm"
    space = make_space(meta["space"], supernet.config)
    ids = torch.tensor(valid["input_ids"][:2])
    exported = sorted((out / "export").iterdir())
    assert exported
    for model_dir in exported:
        info = json.loads((model_dir / SUBNETWORK_FILE).read_text())
        supernet.set_sub_network(space.to_sub_network(info["config"]))
        with torch.no_grad():
            expected = supernet(ids).logits
        fresh = _fresh(model_dir, "lm", ids)
        assert fresh["class"] == "LlamaForCausalLM"
        assert torch.allclose(torch.tensor(fresh["logits"]), expected, atol=1e-4)
        assert len(fresh["generated"][0]) == 10
    latency = results.load(out / "results", table="latency")
    assert len(latency) >= len(exported) and (latency["decode_ms"] > 0).all()
    assert (latency["seq_len"] == 16).all()  # the prefill's prompt length
    summary = (out / "report" / "summary.md").read_text()
    assert "perplexity" in summary and "decode_ms" in summary
    assert (out / "report" / "pareto.png").stat().st_size > 0


def test_decoder_classification_run_end_to_end(tmp_path, tiny_llama_dir, word_tokenizer):
    csv = tmp_path / "toy.csv"
    rng = np.random.default_rng(0)
    rows = [f"{' '.join(rng.choice(WORDS, 5))} {'proud' if i % 2 else 'hope'},{i % 2}"
            for i in range(240)]
    csv.write_text("text,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    code = cli.main([
        "run", "--out", str(out), "--model", str(tiny_llama_dir), "--data.task", str(csv),
        "--finetune.max_steps", "8", "--finetune.batch_size", "16", "--finetune.lr", "3e-3",
        "--finetune.max_length", "16", "--supernet.max_steps", "4", "--supernet.batch_size",
        "16", "--supernet.max_length", "16", "--search.num_samples", "5",
        "--search.searcher", "random", "--search.valid_examples", "48",
        "--search.batch_size", "16", "--profile.seq_len", "16", "--profile.repeats", "2",
        "--refine.examples", "32", "--refine.batch_size", "16", "--refine.max_length", "16",
        "--refine.select", "budgets", "--compare.budgets", "[0.9999]"])
    assert code == 0
    frame = results.load(out / "results")
    assert set(frame["family"].dropna()) == {"llama"}
    assert set(frame["task_kind"]) == {"classification"}
    assert (frame.loc[frame["method"] == "nas", "space"] == "decoder_small").all()
    # refine.select budgets: only the validation-best Pareto-optimal sub-network within the
    # one budget was refined; the rest of the Pareto set is exported unrefined
    front = report.front(report.final_rows(frame[frame["method"] == "nas"]),
                         ["error", "params_ratio"])
    fits = front[front["params_ratio"] <= 0.9999].sort_values(["error", "params_ratio"])
    refined = frame[frame["method"] == "nas+refine"]
    assert list(refined["trial_id"]) == [fits["trial_id"].iloc[0]]
    exported = sorted((out / "export").iterdir())
    assert sorted(d.name for d in exported) == sorted(front["trial_id"])
    info = json.loads((out / "export" / fits["trial_id"].iloc[0] / SUBNETWORK_FILE).read_text())
    assert "refine" in info
    ids = torch.tensor([word_tokenizer("the people want hope")["input_ids"]])
    fresh = _fresh(exported[0], "classification", ids)
    assert fresh["class"] == "LlamaForSequenceClassification"
    assert np.asarray(fresh["logits"]).shape == (1, 2)
