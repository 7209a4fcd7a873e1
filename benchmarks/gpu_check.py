"""The GPU paths of nas_prune in one short run, ending in one table (see gpu_check.sh).

Steps, each through the library code users run:

1. teacher: a few fine-tuning steps (`nas_prune.train.finetune`), so that step 2 has a teacher;
2. supernet: `nas_prune.train.train_supernet` with `SupernetOptions(precision="bf16",
   zero_stage=2, max_steps=...)` (the DeepSpeed engine of the CPU path, on the GPU);
3. profiler: `nas_prune.profile.Profiler` on the GPU (CUDA events, bf16): the full model and
   SMALL sub-networks, and the lookup-table predictor against measurement on random configs;
4. search: a 20-trial random search (`nas_prune.search.driver.run_search`) with a
   `latency:<GPU type>` objective predicted by a table measured on the GPU by a profiler actor;
5. export: the search's most accurate sub-network to a model directory
   (`nas_prune.export.export_sub_network`) and to ONNX (`nas_prune.onnx_export.export_onnx`);
6. subnet speed: extracted sub-networks at about 50% and 25% of the FLOPs timed on the GPU,
   speedup over the full model vs its FLOPs limit (as benchmarks/bench_subnet_speed.py does on
   the CPU).

`--cpu-dry-run` runs the same steps on the CPU with a tiny random BERT, fp32 and few steps, to
check everything but the GPU itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import machine_summary, markdown_table, quiet_transformers

log = logging.getLogger("gpu_check")


class Check:
    """Runs the steps in order, records one table row per step, stops at the first failure."""

    def __init__(self) -> None:
        self.rows: list[list[str]] = []
        self.failed = False

    def step(self, name: str, fn: Callable[[], str]) -> None:
        if self.failed:
            self.rows.append([name, "skipped", "an earlier step failed", "-"])
            return
        started = time.perf_counter()
        try:
            result, status = fn(), "ok"
        except Exception as e:  # the table reports any failure; the traceback goes to stderr
            traceback.print_exc()
            result, status, self.failed = f"{type(e).__name__}: {e}"[:200], "FAILED", True
        self.rows.append([name, status, result, f"{time.perf_counter() - started:.0f}"])
        log.info("%s: %s (%s)", name, status, result)


def tiny_bert(path: Path, tokenizer) -> str:
    """A random BERT (hidden 64, 2 layers, 4 heads, FFN 128) with the MiniLM vocabulary."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="the same steps on the CPU with a tiny model (no GPU needed)")
    parser.add_argument("--out", type=Path, default=None,
                        help="working directory (default: a temporary one, removed after)")
    parser.add_argument("--steps", type=int, default=None,
                        help="supernet training steps (default 60 on GPU, 4 dry)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quiet_transformers()

    import torch

    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); "
                 "run on a GPU machine, or check the CPU-side steps with --cpu-dry-run")
    if args.out is None:
        with tempfile.TemporaryDirectory(prefix="nas_prune_gpu_check_") as tmp:
            sys.exit(run(Path(tmp), dry, args.steps))
    sys.exit(run(args.out, dry, args.steps))


def run(out: Path, dry: bool, steps: int | None) -> int:
    import numpy as np
    import ray
    import torch

    from nas_prune import data
    from nas_prune.options import (
        FinetuneOptions,
        ProfileOptions,
        SearchOptions,
        SupernetOptions,
        TaskOptions,
    )

    out.mkdir(parents=True, exist_ok=True)
    precision = "fp32" if dry else "bf16"
    steps = steps or (4 if dry else 60)
    task_opts = TaskOptions(max_examples=300 if dry else 3000)
    max_length = 32 if dry else 64
    shape = (8, 32) if dry else (32, 128)
    check = Check()
    state: dict[str, Any] = {}
    device = "cpu" if dry else torch.cuda.get_device_name(0)

    def teacher() -> str:
        from nas_prune.train import finetune

        tokenizer = data.load_tokenizer(data.default_model_path())
        base = tiny_bert(out / "tiny_base", tokenizer) if dry else data.default_model_path()
        task = data.tokenize(data.load_task(task_opts), tokenizer, max_length)
        state["task"] = task
        opts = FinetuneOptions(max_steps=max(2, steps // 2), batch_size=32, lr=1e-4,
                               max_length=max_length, precision=precision, log_every=10)
        result = finetune(base, task, out / "teacher", opts, tokenizer=tokenizer)
        return f"{result.steps} steps, {precision}, valid metric {result.valid.get('metric')}"

    def supernet() -> str:
        from nas_prune.train import train_supernet

        opts = SupernetOptions(precision=precision, zero_stage=2, max_steps=steps,
                               batch_size=32, lr=1e-4, max_length=max_length, log_every=10)
        started = time.perf_counter()
        result = train_supernet(out / "teacher", state["task"], out / "supernet", opts)
        rate = result.steps / (time.perf_counter() - started)
        return (f"{result.steps} steps ({rate:.2f}/s), {precision}, ZeRO-2, "
                f"{result.examples_per_second:.0f} examples/s, valid metric "
                f"{result.valid.get('metric')}")

    def profiler() -> str:
        from nas_prune.profile import Profiler, build_table, default_grid, relative_errors

        settings = ProfileOptions(batch_size=shape[0], seq_len=shape[1], repeats=20, warmup=5)
        threads = torch.get_num_threads()
        try:
            p = Profiler(str(out / "supernet"), "small", device, settings)
            cfg = p.model.config
            table = build_table(p.lookup_table(
                default_grid(cfg.num_attention_heads, cfg.num_attention_heads),
                default_grid(cfg.intermediate_size)))
            rng = np.random.default_rng(0)
            configs = [p.space.sample(rng) for _ in range(20)]
            measured = [p.measure(c)["median_ms"] for c in configs]
            full = p.measure(p.space.largest())
        finally:
            torch.set_num_threads(threads)
        state["profiler"] = p
        errors = relative_errors([table.predict(p.space.to_sub_network(c)) for c in configs],
                                 measured)
        timer = "CUDA events" if p.device.type == "cuda" else "perf_counter"
        return (f"{timer}, {p.dtype_name}, {shape[0]} x {shape[1]}: full model "
                f"{full['median_ms']:.2f} ms (p90 {full['p90_ms']:.2f}); lookup table vs 20 "
                f"measured configs: median rel. error {errors['median']:.1%}, max "
                f"{errors['max']:.1%}")

    def search() -> str:
        from nas_prune.profile import discover_hardware
        from nas_prune.search.driver import run_search

        ray.init(num_cpus=min(4, os.cpu_count() or 1), num_gpus=0 if dry else 1,
                 include_dashboard=False, configure_logging=False, log_to_driver=False)
        found = discover_hardware()
        gpu_types = [name for name, hw in found.items() if hw.gpu]
        if not dry and not gpu_types:
            raise RuntimeError(f"Ray found no accelerator_type for the GPU ({device}); "
                               f"hardware types present: {sorted(found)}")
        hardware = "cpu" if dry else gpu_types[0]
        opts = SearchOptions(searcher="random", num_samples=20, seed=0,
                             objectives=["error", "params_ratio", f"latency:{hardware}"],
                             valid_examples=64 if dry else 300, batch_size=32 if dry else 100,
                             num_workers=1 if dry else None)
        profile = ProfileOptions(hardware=[hardware], batch_size=shape[0], seq_len=shape[1],
                                 repeats=5, warmup=2)
        frame = run_search(out / "supernet", task_opts, out / "results", "gpu-check", opts,
                           profile=profile, storage_path=str(out / "tune"))
        final = frame.sort_values("fidelity").groupby("trial_id").tail(1)
        best = final.sort_values("error").iloc[0]
        config = best["config"]  # the store keeps configs as JSON
        state["best"] = json.loads(config) if isinstance(config, str) else dict(config)
        return (f"{final['trial_id'].nunique()} trials, latency:{hardware} predicted by a "
                f"table measured on {hardware}; best error {best['error']:.3f} at params "
                f"ratio {best['params_ratio']:.2f}, {best['latency_ms']:.2f} ms predicted")

    def export() -> str:
        from nas_prune.export import export_sub_network
        from nas_prune.onnx_export import export_onnx

        p = state["profiler"]
        sub = p.space.to_sub_network(state["best"])
        model = p.model.float().cpu()
        path = export_sub_network(model, sub, out / "export")
        onnx = export_onnx(path)
        size = onnx.stat().st_size / 1e6
        return f"{state['best']} -> {path.name}/ and {onnx.name} ({size:.1f} MB)"

    def subnet_speed() -> str:
        from nas_prune.profile import Profiler

        settings = ProfileOptions(batch_size=shape[0], seq_len=shape[1], repeats=20, warmup=5)
        threads = torch.get_num_threads()
        try:
            p = Profiler(str(out / "supernet"), "small", device, settings)
        finally:
            torch.set_num_threads(threads)
        space, model = p.space, p.model
        full_flops = model.flops(None, shape[1])
        full_ms = p.measure(space.largest())["median_ms"]
        parts = []
        for target in (0.5, 0.25):
            config = {"num_layers": space.num_layers,
                      "num_heads": max(1, round(space.num_heads * target)),
                      "num_units": max(1, round(space.num_units * target))}
            flops = model.flops(space.to_sub_network(config), shape[1]) / full_flops
            ms = p.measure(config)["median_ms"]
            parts.append(f"{flops:.0%} FLOPs: {full_ms / ms:.2f}x of {1 / flops:.2f}x "
                         f"({flops * full_ms / ms:.2f} of the limit)")
        return f"{p.dtype_name}, {shape[0]} x {shape[1]}: " + "; ".join(parts)

    started = time.perf_counter()
    try:
        check.step("1 teacher (fine-tune)", teacher)
        check.step(f"2 supernet ({precision}, ZeRO-2)", supernet)
        check.step("3 profiler", profiler)
        check.step("4 search (20 trials)", search)
        check.step("5 export (+ ONNX)", export)
        check.step("6 subnet speed", subnet_speed)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    mode = "CPU DRY RUN (tiny model, fp32; not a GPU result)" if dry else f"GPU: {device}"
    print(f"\n{mode}; {machine_summary()}; total {time.perf_counter() - started:.0f} s\n")
    print(markdown_table(["step", "status", "result", "s"], check.rows))
    return 1 if check.failed else 0


if __name__ == "__main__":
    main()
