"""Ray Train's TorchTrainer runs the same DeepSpeed training on 2 CPU workers (ZeRO-1, gloo)."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from nas_prune import data, train
from nas_prune.checkpoint import load_checkpoint
from nas_prune.errors import TrainingError
from nas_prune.evaluate import evaluate
from nas_prune.options import FinetuneOptions, SupernetOptions, TaskOptions
from tests.test_train import _synthetic_csv, save_tiny_bert


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def test_two_workers_train_like_one(ray_local, tmp_path):
    tokenizer = data.load_tokenizer(data.default_model_path())
    save_tiny_bert(tmp_path / "base", tokenizer)
    csv = _synthetic_csv(tmp_path / "toy.csv")
    opts = FinetuneOptions(epochs=8, batch_size=16, lr=3e-3, zero_stage=1)
    meta = train.train_distributed("finetune", tmp_path / "base", TaskOptions(task=csv),
                                   tmp_path / "teacher", opts, num_workers=2)
    assert meta["world_size"] == 2 and meta["finished"]
    # each step consumes one batch per worker: half the steps of one worker
    n_train = len(data.load_task(csv).train)
    assert meta["steps_done"] == 8 * (int(np.ceil(n_train / 16)) // 2)
    losses = meta["losses"]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    model, _ = load_checkpoint(tmp_path / "teacher")
    task = data.tokenize(data.load_task(csv), tokenizer, max_length=32)
    valid = evaluate(model, data.make_loader(task.valid, tokenizer, 64), task.spec)
    assert valid["metric"] == pytest.approx(meta["valid"]["metric"])
    assert valid["metric"] > 0.9

    # the supernet in bf16 (torch autocast on the CPU workers, fp32 gradients reduced by gloo)
    sn = SupernetOptions(strategy="full", max_steps=3, batch_size=16, zero_stage=1,
                         precision="bf16")
    meta = train.train_distributed("supernet", tmp_path / "teacher", TaskOptions(task=csv),
                                   tmp_path / "supernet", sn, num_workers=2)
    assert meta["kind"] == "supernet" and meta["steps_done"] == 3 and meta["world_size"] == 2
    assert np.isfinite(meta["losses"]).all()
    supernet, _ = load_checkpoint(tmp_path / "supernet")
    assert {p.dtype for p in supernet.parameters()} == {torch.float32}


def test_infeasible_worker_count_fails_fast(ray_local, tmp_path):
    with pytest.raises(TrainingError, match="need 3 CPUs but the Ray cluster has 2"):
        train.train_distributed("finetune", "unused", TaskOptions(task="unused"), tmp_path,
                                FinetuneOptions(), num_workers=3)
