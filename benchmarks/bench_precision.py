"""bf16 training on a CPU (`precision="bf16"`: DeepSpeed's torch autocast around fp32 weights)
against fp32, on the real MiniLM and Rotten Tomatoes:

1. **Speed**: optimizer steps of standard fine-tuning through the DeepSpeed engine
   (`nas_prune.train.train`, what users run), fp32 and bf16 in turn, `--rounds` rounds of
   `--steps` steps each on the same batches; median seconds per step after the first 3 of a
   round.
2. **Quality**: the teacher fine-tuned in each precision from the same seed (`--epochs` on
   `--max-examples` per split), its validation and test accuracy and wall time.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_precision.py
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import REPO, command_line, machine_summary, markdown_table, quiet_transformers

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions"))

import torch  # noqa: E402

from nas_prune import data as data_lib  # noqa: E402
from nas_prune import train as train_lib  # noqa: E402
from nas_prune.checkpoint import load_checkpoint  # noqa: E402
from nas_prune.evaluate import evaluate  # noqa: E402
from nas_prune.options import FinetuneOptions  # noqa: E402
from nas_prune.supernet import load_pretrained  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def speed(args, task, tokenizer) -> dict[str, list[float]]:
    """Seconds per optimizer step of each precision, over `rounds` alternating rounds."""
    seconds: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for _ in range(args.rounds):
        for precision in PRECISIONS:
            stamps: list[float] = []
            model = load_pretrained(args.model, num_labels=task.spec.num_labels)
            opts = FinetuneOptions(max_steps=args.steps, batch_size=args.batch_size,
                                   lr=1e-4, max_length=args.max_length, precision=precision,
                                   log_every=10**6)
            with tempfile.TemporaryDirectory(dir=args.out) as tmp:
                train_lib.train(model, task, tokenizer, tmp, opts,
                                on_step=lambda *_, s=stamps: s.append(time.perf_counter()))
            seconds[precision] += [b - a for a, b in zip(stamps[3:], stamps[4:], strict=False)]
    return seconds


def quality(args, task, tokenizer) -> list[list[str]]:
    rows = []
    for precision in PRECISIONS:
        out = Path(args.out) / f"teacher_{precision}"
        started = time.perf_counter()
        opts = FinetuneOptions(epochs=args.epochs, batch_size=args.batch_size, lr=1e-4,
                               max_length=args.max_length, precision=precision, log_every=50)
        train_lib.finetune(args.model, task, out, opts, tokenizer=tokenizer)
        seconds = time.perf_counter() - started
        model, _ = load_checkpoint(out)
        accuracy = {split: evaluate(model, data_lib.make_loader(getattr(task, split), tokenizer,
                                                                128), task.spec)["metric"]
                    for split in ("valid", "test")}
        rows.append([precision, f"{seconds:.0f}", f"{accuracy['valid']:.4f}",
                     f"{accuracy['test']:.4f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=data_lib.default_model_path())
    parser.add_argument("--out", default=str(REPO / "build" / "bench_precision"))
    parser.add_argument("--max-examples", type=int, default=2500,
                        help="cap on each split for the quality part")
    parser.add_argument("--epochs", type=float, default=2.0, help="fine-tuning epochs")
    parser.add_argument("--steps", type=int, default=23, help="steps per speed round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--skip", choices=("speed", "quality"), action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    quiet_transformers()
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(f"Command: `{command_line()}`\n\nMachine: {machine_summary([args.threads])}; "
          f"native bf16 (oneDNN): {torch.ops.mkldnn._is_mkldnn_bf16_supported()}; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    tokenizer = data_lib.load_tokenizer(args.model)
    raw = data_lib.load_task("rotten_tomatoes", max_examples=args.max_examples, seed=0)
    task = data_lib.tokenize(raw, tokenizer, args.max_length)
    if "speed" not in args.skip:
        seconds = speed(args, task, tokenizer)
        base = statistics.median(seconds["fp32"])
        rows = [[p, len(s), f"{statistics.median(s):.3f}",
                 f"{args.batch_size / statistics.median(s):.1f}",
                 f"{base / statistics.median(s):.2f}x"] for p, s in seconds.items()]
        print(f"\n### Speed: standard fine-tuning steps through the DeepSpeed engine, batch "
              f"{args.batch_size} x <= {args.max_length} tokens, {args.threads} threads\n")
        print(markdown_table(["precision", "timed steps", "median s/step", "examples/s",
                              "vs fp32"], rows))
    if "quality" not in args.skip:
        rows = quality(args, task, tokenizer)
        print(f"\n### Quality: the teacher fine-tuned {args.epochs:g} epochs in each precision "
              f"(seed 0; {len(task.train)} train / {len(task.valid)} valid / {len(task.test)} "
              f"test examples)\n")
        print(markdown_table(["precision", "seconds", "valid accuracy", "test accuracy"], rows))
    print(f"\nLoad average at end {os.getloadavg()[0]:.2f}.")


if __name__ == "__main__":
    main()
