"""Memory of the supernet vs the plain transformers model (issue 2: at most 1.1x).

Every measurement runs in a fresh subprocess, so allocations of one model never mix with
another's. Each child imports the same modules (torch, transformers, the BERT modelling code,
nas_prune.supernet), tokenises one batch of 32 Rotten Tomatoes sentences and then, by mode:

* baseline: nothing more (the cost of the interpreter, the imports, tokenizer and batch);
* plain: `AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)`;
* supernet: `nas_prune.supernet.load_pretrained(model_dir, num_labels=2)`, which builds our
  module on the meta device and takes over the transformers model's tensors (no second copy).

RSS (`/proc/self/status` VmRSS; the anonymous part too) is read after loading (after
`gc.collect()`), after touching every parameter (a sum over each), which makes the whole model
resident, and after one `torch.no_grad` forward on the batch. Touching matters because
transformers memory-maps safetensors checkpoints: pages of a plain model that were never read
(most of the word-embedding table) are not resident. The peak is `resource.getrusage(RUSAGE_SELF)
.ru_maxrss`. All numbers are MiB above the baseline process's (median over `--repeats`
processes per mode).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from _common import (
    REPO,
    command_line,
    default_model_dir,
    machine_summary,
    markdown_table,
    rotten_tomatoes_sentences,
)

MODES = ("baseline", "plain", "supernet")
TARGET = 1.1
"""Issue 2's target: supernet memory at most this times the plain model's."""
KEYS = ("load", "load_anon", "load_peak", "touched", "forward", "peak")


def _status() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def child(mode: str, model_dir: str, threads: int) -> dict[str, float]:
    """One measurement in this (fresh) process; returns MiB figures."""
    import torch
    import transformers
    import transformers.models.bert.modeling_bert  # noqa: F401  (same imports in every mode)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import nas_prune.supernet as supernet

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer(
        rotten_tomatoes_sentences(32),
        padding="longest",
        truncation=True,
        max_length=128,
        return_tensors="pt",
    )
    gc.collect()
    before = _status()

    model = None
    start = time.perf_counter()
    if mode == "plain":
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    elif mode == "supernet":
        model = supernet.load_pretrained(model_dir, num_labels=2)
    elif mode != "baseline":
        raise SystemExit(f"unknown mode {mode!r}")
    load_s = time.perf_counter() - start
    gc.collect()
    loaded = _status()
    params = 0
    if model is not None:
        model.eval()
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        with torch.no_grad():
            for p in model.parameters():
                p.sum()
    gc.collect()
    touched = _status()
    if model is not None:
        with torch.no_grad():
            model(**batch)
    gc.collect()
    forward = _status()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "before": before["VmRSS"],
        "load": loaded["VmRSS"],
        "load_anon": loaded["RssAnon"],
        "load_file": loaded["RssFile"],
        "load_peak": loaded["VmHWM"],
        "forward": forward["VmRSS"],
        "touched": touched["VmRSS"],
        "peak": peak,
        "param_mib": params / 2**20,
        "load_s": load_s,
    }


def run_child(mode: str, model_dir: str, threads: int) -> dict[str, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        mode,
        "--model",
        model_dir,
        "--threads",
        str(threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="pre-trained model dir (default: MiniLM)")
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per mode")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_dir = args.model or default_model_dir()

    if args.child:
        print(json.dumps(child(args.child, model_dir, args.threads)))
        return

    started = time.perf_counter()
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for _ in range(args.repeats):  # interleaved, so slow drifts hit every mode alike
        for mode in MODES:
            runs[mode].append(run_child(mode, model_dir, args.threads))
    elapsed = time.perf_counter() - started

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    base = {key: med("baseline", key) for key in KEYS}
    # The peak of a model process is compared with the baseline process's peak, every RSS
    # figure with the baseline's RSS at the same point.
    delta = {mode: {key: med(mode, key) - base[key] for key in KEYS} for mode in MODES[1:]}
    spread, spread_at = max(
        (max(r[key] for r in runs[m]) - min(r[key] for r in runs[m]), f"{m}, {key}")
        for m in MODES
        for key in KEYS
    )

    print(f"Command: `{command_line()}`\n")
    print(f"Machine: {machine_summary([args.threads])}\n")
    print(
        f"Baseline process (imports + tokenizer + one batch of 32): RSS {base['load']:.0f} MiB, "
        f"peak {base['peak']:.0f} MiB. Model parameters: "
        f"{med('plain', 'param_mib'):.1f} MiB (plain), {med('supernet', 'param_mib'):.1f} MiB "
        f"(supernet). Medians over {args.repeats} fresh processes per mode; largest spread "
        f"(max - min) of any figure: {spread:.1f} MiB ({spread_at}).\n"
    )
    headers = [
        "model (MiB above baseline)",
        "RSS after load",
        "of which anonymous",
        "peak during load",
        "RSS, all weights touched",
        "RSS after forward",
        "peak RSS (ru_maxrss)",
        "load s",
    ]
    rows = [
        [mode, *(f"{delta[mode][k]:.1f}" for k in KEYS), f"{med(mode, 'load_s'):.2f}"]
        for mode in MODES[1:]
    ]
    print(markdown_table(headers, rows) + "\n")

    headers = [
        "ratio vs plain",
        "after load",
        "peak during load",
        "all weights touched",
        "after forward",
        "peak (ru_maxrss)",
        f"peak <= {TARGET}x",
        f"steady state (touched) <= {TARGET}x",
    ]
    rows = []
    for mode in MODES[2:]:
        keys = ("load", "load_peak", "touched", "forward", "peak")
        ratios = dict(zip(keys, (delta[mode][k] / delta["plain"][k] for k in keys), strict=True))
        rows.append(
            [
                mode,
                *(f"{r:.2f}" for r in ratios.values()),
                *("yes" if ratios[k] <= TARGET else "NO" for k in ("peak", "touched")),
            ]
        )
    print(markdown_table(headers, rows) + "\n")
    print(f"Script run time: {elapsed:.0f} s.")


if __name__ == "__main__":
    main()
