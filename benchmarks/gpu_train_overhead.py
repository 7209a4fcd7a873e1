"""Where a training step's time goes on a GPU: MiniLM-shaped encoder (nas_prune's own class),
batch 32 x 64, bf16, one forward + backward + optimizer step per iteration, through

  plain    torch autocast + torch.optim.AdamW (fused), no DeepSpeed;
  ds-z0    nas_prune.engine.make_engine, ZeRO stage 0 (what fine-tuning uses by default);
  ds-z2    the same with ZeRO stage 2 (what benchmarks/gpu_check.sh's supernet step used);

then the top CPU-side operators of 10 ds-z2 steps (torch.profiler). Run on the GPU machine
after benchmarks/gpu_check_device.sh has set up /tmp/site (or with a .venv that has CUDA torch):

  PYTHONPATH=/tmp/site:. DS_ACCELERATOR=cuda python3 benchmarks/gpu_train_overhead.py
"""

from __future__ import annotations

import time

import torch
from transformers import BertConfig, BertForSequenceClassification

from nas_prune.engine import make_engine
from nas_prune.options import FinetuneOptions
from nas_prune.supernet import from_hf

STEPS, WARMUP, BATCH, LENGTH = 40, 10, 32, 64


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                        num_attention_heads=12, intermediate_size=1536, num_labels=2)
    return from_hf(BertForSequenceClassification(config), share=False, pooling="cls")


def batch(device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1000, 30000, (BATCH, LENGTH), generator=g).to(device),
            "attention_mask": torch.ones(BATCH, LENGTH, dtype=torch.long, device=device),
            "labels": torch.randint(0, 2, (BATCH,), generator=g).to(device)}


def timed(step, n: int) -> float:
    for _ in range(WARMUP):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / n * 1e3


def main() -> None:
    device = torch.device("cuda")
    b = batch(device)
    rows = []

    net = model().to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)

    def plain() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(net(**b).logits.float(), b["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rows.append(("plain (autocast bf16, fused AdamW)", timed(plain, STEPS)))

    engines = {}
    for stage in (0, 2):
        opts = FinetuneOptions(precision="bf16", zero_stage=stage, batch_size=BATCH, lr=1e-4)
        engine, _ = make_engine(model().to(device).train(), opts, total_steps=10**6)
        engines[stage] = engine

        def ds_step(engine=engine) -> None:
            logits = engine(**b).logits.float()
            loss = torch.nn.functional.cross_entropy(logits, b["labels"])
            engine.backward(loss)
            engine.step()

        rows.append((f"DeepSpeed ZeRO-{stage} (bf16, torch AdamW)", timed(ds_step, STEPS)))

        def fwd_only(engine=engine) -> None:
            with torch.no_grad():
                engine(**b)

        rows.append((f"  forward only, ZeRO-{stage} engine", timed(fwd_only, STEPS)))

    print(f"\n{torch.cuda.get_device_name(0)}; torch {torch.__version__}; batch {BATCH} x "
          f"{LENGTH}; ms per step, mean of {STEPS} after {WARMUP} warm-up\n")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} ms |")

    engine = engines[2]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            logits = engine(**b).logits.float()
            engine.backward(torch.nn.functional.cross_entropy(logits, b["labels"]))
            engine.step()
        torch.cuda.synchronize()
    print("\nZeRO-2, 10 steps, by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print("\nZeRO-2, 10 steps, by CUDA time:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
