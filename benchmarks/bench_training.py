"""Training benchmarks of issue 3 on the real MiniLM and the whole Rotten Tomatoes data.

Three measurements, each printed as a Markdown table:

1. **Dense fine-tuning** (`nas_prune.train.finetune`, DeepSpeed on the CPU): wall time and the
   validation and *test* accuracy of the fine-tuned teacher (target: test accuracy >= 0.80).
2. **Supernet vs. cut**: the teacher is trained further as a weight-sharing supernet with the
   `full` strategy (sandwich + in-place distillation, heads/neurons rewired by importance first,
   `nas_prune.train.train_supernet`). The validation accuracy of the largest, the middle and the
   smallest SMALL-space sub-networks is compared with the same sub-networks cut from the plain
   fine-tuned teacher, both as it is and after the same importance rewiring the supernet starts
   with (so the gain of supernet training is separated from the gain of rewiring alone).
3. **Throughput**: optimizer steps of standard fine-tuning through the DeepSpeed engine
   (`nas_prune.train.train`, exactly what users run) vs. a plain PyTorch loop (torch AdamW,
   the same warm-up/decay schedule and gradient clipping) on a second copy of the same model
   and the same batches, alternating step by step; examples per second over the steps after a
   warm-up (target: DeepSpeed >= 0.9x plain).

Stages 1 and 2 write checkpoints under `--out` and are skipped when already finished, so an
interrupted run continues; `--supernet` of this script is then usable by bench_search.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, command_line, machine_summary, markdown_table, quiet_transformers

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions"))

import torch  # noqa: E402

from nas_prune import data as data_lib  # noqa: E402
from nas_prune import train as train_lib  # noqa: E402
from nas_prune.checkpoint import load_checkpoint, read_meta  # noqa: E402
from nas_prune.evaluate import evaluate  # noqa: E402
from nas_prune.importance import rewire  # noqa: E402
from nas_prune.options import FinetuneOptions, SupernetOptions  # noqa: E402
from nas_prune.space import make_space  # noqa: E402
from nas_prune.supernet import load_pretrained  # noqa: E402

TARGET_ACCURACY = 0.80
TARGET_THROUGHPUT = 0.9


def _shared(args: argparse.Namespace) -> dict[str, Any]:
    """The training options fine-tuning and supernet training of this script share."""
    return {"batch_size": args.batch_size, "lr": args.lr, "max_length": args.max_length,
            "seed": args.seed, "log_every": 50}


def _options(args: argparse.Namespace, **changes) -> FinetuneOptions:
    """Fine-tuning options (the standard strategy on the full network)."""
    return FinetuneOptions(**{**_shared(args), "pooling": args.pooling, **changes})


def _supernet_options(args: argparse.Namespace, **changes) -> SupernetOptions:
    """Supernet training options (the pooling is the teacher's)."""
    return SupernetOptions(**{**_shared(args), **changes})


def _accuracy(model, split, tokenizer, spec, sub=None) -> float:
    loader = data_lib.make_loader(split, tokenizer, 128)
    return evaluate(model, loader, spec, sub=sub)["metric"]


# ----------------------------------------------------------------------------- 1 and 2
def fine_tune_and_supernet(args, task, tokenizer) -> tuple[str, str]:
    out = Path(args.out)
    teacher_dir, supernet_dir = out / "teacher", out / "supernet"

    def stage(label: str, directory: Path, epochs: float, fit) -> tuple[Any, list]:
        """Train with `fit()` unless `directory` holds a finished run; the model and its row."""
        seconds_file = out / f"{directory.name}_seconds.txt"
        if not read_meta(directory).get("finished"):
            seconds_file.write_text(f"{fit().seconds:.1f}\n")
        model, meta = load_checkpoint(directory)
        return model, [label, f"{epochs:g}", meta["total_steps"],
                       f"{float(seconds_file.read_text()):.0f}",
                       f"{_accuracy(model, task.valid, tokenizer, task.spec):.4f}",
                       f"{_accuracy(model, task.test, tokenizer, task.spec):.4f}"]

    teacher, teacher_row = stage(
        "dense fine-tuning (standard)", teacher_dir, args.finetune_epochs,
        lambda: train_lib.finetune(args.model, task, teacher_dir,
                                   _options(args, epochs=args.finetune_epochs),
                                   tokenizer=tokenizer))
    supernet, supernet_row = stage(
        "supernet (full), full network", supernet_dir, args.supernet_epochs,
        lambda: train_lib.train_supernet(
            teacher_dir, task, supernet_dir,
            _supernet_options(args, strategy="full", epochs=args.supernet_epochs)))
    rows = [teacher_row, supernet_row]
    print(f"\n### Fine-tuning and supernet training (head pooling: {teacher.config.pooling})\n")
    print(markdown_table(["run", "epochs", "steps", "seconds", "valid accuracy", "test accuracy"],
                         rows))
    test_acc = float(rows[0][-1])
    print(f"\nTarget (dense test accuracy >= {TARGET_ACCURACY}): "
          f"{'met' if test_acc >= TARGET_ACCURACY else 'NOT met'} ({test_acc:.4f}).")

    # the same SMALL-space sub-networks: supernet vs cut from the plain teacher
    space = make_space("small", teacher.config)
    rewired, _ = load_checkpoint(teacher_dir)
    loader = data_lib.make_loader(task.train, tokenizer, args.batch_size, shuffle=True,
                                  seed=args.seed + 1)  # the rewiring batches train() uses
    rewire(rewired, [b for _, b in zip(range(8), loader, strict=False)])
    cut_rows = []
    largest = space.largest()
    # the space's own middle / smallest drop layers; the same widths with every layer kept show
    # whether a failure is the depth's (MiniLM's [CLS] state after few layers) or the width's
    candidates = (("largest", largest), ("middle", space.middle()),
                  ("smallest", space.smallest()),
                  ("middle depth, all heads and neurons",
                   {**largest, "num_layers": space.middle()["num_layers"]}),
                  ("middle width, all layers",
                   {**space.middle(), "num_layers": largest["num_layers"]}),
                  ("smallest width, all layers",
                   {**space.smallest(), "num_layers": largest["num_layers"]}))
    for name, config in candidates:
        sub = space.to_sub_network(config)
        accs = [_accuracy(m, task.valid, tokenizer, task.spec, sub)
                for m in (teacher, rewired, supernet)]
        ratio = supernet.num_params(sub) / supernet.num_params()
        cut_rows.append([name, f"{config['num_layers']}L / {config['num_heads']}H / "
                         f"{config['num_units']}F", f"{ratio:.3f}",
                         *(f"{a:.4f}" for a in accs), f"{accs[2] - accs[0]:+.4f}"])
    print("\n### Sub-networks: supernet vs. cut from the fine-tuned model (validation accuracy)\n")
    print(markdown_table(["sub-network", "layers / heads / FFN", "params ratio",
                          "cut from teacher", "cut from rewired teacher", "supernet (full)",
                          "supernet - cut"], cut_rows))
    return str(teacher_dir), str(supernet_dir)


# ----------------------------------------------------------------------------- 3 throughput
class _PlainTwin:
    """A plain PyTorch training loop, stepped from train()'s `on_step` callback so the two loops
    alternate step by step (a busy machine slows both alike). What a user would write without
    DeepSpeed: the same batches (train()'s loader and seed), torch AdamW with the same weight
    decay, linear warm-up then linear decay, gradient clipping at 1.0."""

    def __init__(self, args, task, tokenizer, opts: FinetuneOptions, steps: int):
        self.model = load_pretrained(args.model, num_labels=task.spec.num_labels,
                                     pooling=args.pooling).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opts.lr,
                                           weight_decay=opts.weight_decay)
        warm = max(1, int(opts.warmup_ratio * steps))
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: s / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
        self.batches = iter(data_lib.make_loader(task.train, tokenizer, opts.batch_size,
                                                 shuffle=True, seed=opts.seed * 100_003))
        self.deepspeed_s: list[float] = []
        self.plain_s: list[float] = []
        self.mark = None

    def step(self) -> None:
        batch = next(self.batches)
        self.model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, step: int, loss: float) -> None:
        """After DeepSpeed step `step`: time it, then run and time one plain step."""
        now = time.perf_counter()
        if self.mark is not None:
            self.deepspeed_s.append(now - self.mark)
        self.step()
        self.mark = time.perf_counter()
        self.plain_s.append(self.mark - now)


def throughput(args, task, tokenizer) -> None:
    steps = args.warmup_steps + args.timed_steps + 1
    opts = _options(args, max_steps=steps)
    twin = _PlainTwin(args, task, tokenizer, opts, steps)
    model = load_pretrained(args.model, num_labels=task.spec.num_labels, pooling=args.pooling)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        train_lib.train(model, task, tokenizer, tmp, opts, on_step=twin)
    # DeepSpeed step i (i >= 2) is timed from the end of plain step i-1; both lists then cover
    # the same batches 2..steps; the first `warmup_steps` pairs are dropped
    ds_s = twin.deepspeed_s[args.warmup_steps:]
    plain_s = twin.plain_s[1:][args.warmup_steps:]
    rows = []
    for name, seconds in (("DeepSpeed engine (nas_prune.train.train)", ds_s),
                          ("plain PyTorch loop", plain_s)):
        rows.append([name, len(seconds), f"{statistics.median(seconds):.3f}",
                     f"{len(seconds) * args.batch_size / sum(seconds):.1f}",
                     f"{sum(plain_s) / sum(seconds):.3f}"])
    print(f"\n### Training throughput: standard fine-tuning, batch {args.batch_size}, "
          f"{args.threads} threads ({len(ds_s)} timed steps of each loop, alternating step by "
          f"step on the same batches, after {args.warmup_steps} warm-up steps)\n")
    print(markdown_table(["loop", "steps", "median s/step", "examples/s", "vs plain"], rows))
    ratio = sum(plain_s) / sum(ds_s)
    print(f"\nTarget (DeepSpeed >= {TARGET_THROUGHPUT}x plain): "
          f"{'met' if ratio >= TARGET_THROUGHPUT else 'NOT met'} ({ratio:.3f}x).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=data_lib.default_model_path(),
                        help="pre-trained BERT/RoBERTa (default: the offline MiniLM)")
    parser.add_argument("--out", default=str(REPO / "build" / "bench_training"),
                        help="checkpoints (teacher/, supernet/); finished stages are reused")
    parser.add_argument("--max-examples", type=int, default=None,
                        help="cap on each split (default: the whole data)")
    parser.add_argument("--finetune-epochs", type=float, default=2.0)
    parser.add_argument("--supernet-epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=64,
                        help="tokens per example (Rotten Tomatoes snippets are ~30 tokens)")
    parser.add_argument("--pooling", choices=("auto", "cls", "mean"), default="auto",
                        help="classification head input (auto: MiniLM's own, mean)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--timed-steps", type=int, default=40)
    parser.add_argument("--skip", choices=("training", "throughput"), action="append",
                        default=[], help="skip a part")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    quiet_transformers()
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    print(f"Command: `{command_line()}`\n\nMachine: {machine_summary([args.threads])}; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    tokenizer = data_lib.load_tokenizer(args.model)
    raw = data_lib.load_task("rotten_tomatoes", max_examples=args.max_examples, seed=args.seed)
    print(f"\nData: rotten_tomatoes, {len(raw.train)} train / {len(raw.valid)} valid / "
          f"{len(raw.test)} test examples, max_length {args.max_length}.")
    task = data_lib.tokenize(raw, tokenizer, args.max_length)
    if "throughput" not in args.skip:
        throughput(args, task, tokenizer)
    if "training" not in args.skip:
        fine_tune_and_supernet(args, task, tokenizer)
    print(f"\nScript run time: {time.perf_counter() - started:.0f} s; load average at end "
          f"{os.getloadavg()[0]:.2f}.")


if __name__ == "__main__":
    main()
