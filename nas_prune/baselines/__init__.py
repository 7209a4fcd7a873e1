"""Published pruning methods run beside NAS, on the same teacher, data and results store.

Each method is a module registered in :data:`nas_prune.registry.BASELINES` by name and imported
only when used (a lazy registry, like Ray Tune's ``SEARCH_ALG_IMPORT``), so one method's
dependencies never burden another. Every method module defines

* ``Options``: a dataclass, one docstring under each field (the CLI help), validated in
  ``__post_init__``; a ``max_length`` field, if any, is the tokenisation length the caller uses;
* ``run(teacher_dir, task, tokenizer, out_dir, opts, *, done=(), on_row=None) -> list[dict]``:
  prune the fine-tuned teacher at ``teacher_dir`` on the tokenised ``task``, save each produced
  model under ``out_dir/<trial_id>/`` and return one evaluation row per model (the keys of
  :data:`ROW_KEYS`, optionally ``latency_ms`` and ``hardware``), validation split metrics;
  models whose trial id is in ``done`` are not trained again, and ``on_row(row)`` is called as
  each model is saved, before the next one starts.

:func:`run_method` is what the CLI (``nas-prune baseline <method>``) and the pipeline
(``nas-prune run`` with ``baselines: [...]``) call: it runs a method, measures the latency of
each saved model that has none yet (:func:`measure_latency`) and appends each row to the results
store under the experiment ``baseline-<method>-seed<seed>`` as soon as its model is saved, so an
interrupted run keeps every finished model and, run again, trains only the missing ones.

Methods (METHODS.md): ``pins`` (Ren & Zhu 2023, unstructured), ``grain`` (Yang et al. 2023,
structured intra-attention), ``layer_drop`` (keep the first k layers of an encoder and
fine-tune; for a decoder, drop the layers that change the residual stream least) and
``llm_pruner`` (Ma et al. 2023, one-shot structured pruning of decoder LMs). Which methods
apply to which model family and task: :data:`APPLIES`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from nas_prune import registry
from nas_prune.errors import BaselineError

log = logging.getLogger(__name__)

ROW_KEYS = (
    "method", "task", "model", "seed", "trial_id", "config", "fidelity", "fidelity_unit",
    "error", "metric_name", "metric_value", "params", "params_ratio", "flops", "wall_time_s",
    "eval_time_s", "status", "message",
)
"""Keys every row returned by a method's ``run`` has (see nas_prune.results)."""


APPLIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "pins": (("encoder",), ("classification",)),
    "grain": (("encoder",), ("classification",)),
    "layer_drop": (("encoder", "decoder"), ("classification", "lm")),
    "llm_pruner": (("decoder",), ("lm",)),
}
"""Method -> (model families, task kinds) it prunes."""


def check_applies(name: str, family: str | None, task_kind: str) -> None:
    """BaselineError, before any work, when method `name` cannot prune a `family` ("encoder",
    "decoder"; None: not known yet, not checked) model for a `task_kind` task."""
    families, kinds = APPLIES.get(name, (("encoder", "decoder"), ("classification", "lm")))
    if (family is not None and family not in families) or task_kind not in kinds:
        fits = [m for m, (f, k) in APPLIES.items()
                if (family is None or family in f) and task_kind in k]
        raise BaselineError(
            f"baseline {name} prunes {' or '.join(families)} models for "
            f"{' or '.join(kinds)}; this run is {task_kind} with "
            f"{'an ' + family if family else 'a'} model: choose from {', '.join(fits)}")


def get(name: str) -> ModuleType:
    """The module of baseline `name`, imported now.

    Raises:
        BaselineError: `name` is not registered.
    """
    return registry.load(registry.BASELINES, name, "baseline", BaselineError)


def make_options(name: str, values: Mapping[str, Any] | None = None) -> Any:
    """Baseline `name`'s ``Options`` from a mapping of option names (YAML, CLI), naming
    unknown keys."""
    import dataclasses

    cls = get(name).Options
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise BaselineError(f"unknown {name} option(s) {', '.join(unknown)}; known: "
                            f"{', '.join(sorted(known))}")
    return cls(**values)


def experiment_name(method: str, opts: Any) -> str:
    """The results experiment of a baseline run: ``baseline-<method>-seed<seed>``."""
    return f"baseline-{method}-seed{getattr(opts, 'seed', 0)}"


def measure_latency(model_dir: str | os.PathLike, settings: Any = None) -> dict[str, Any]:
    """Latency of the model saved in `model_dir` as it is stored, timed by the profiler actors
    that time NAS sub-networks (nas_prune.profile.profile_saved: same hardware types, batch
    shape, dtype, clock and runtime), on every hardware type of `settings.hardware`.

    Returns:
        ``{"latency_ms": median (prefill for a causal LM), "hardware": <type>}`` on the first
        hardware type (``nas-prune compare`` reports every type), and ``decode_ms`` for a
        causal LM.
    """
    from nas_prune.options import ProfileOptions
    from nas_prune.profile import profile_saved

    settings = settings or ProfileOptions()
    timed = profile_saved([model_dir], settings)[str(model_dir)]
    hardware, row = next(iter(timed.items()))
    out = {"latency_ms": row["median_ms"], "hardware": hardware}
    if "decode_ms" in row:
        out["decode_ms"] = row["decode_ms"]
    return out


def check_rows(rows: Sequence[Mapping[str, Any]], method: str,
               out_dir: str | os.PathLike) -> None:
    """Raise BaselineError unless every row has the contract's keys and its model is saved
    in ``out_dir/<trial_id>/``."""
    for row in rows:
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise BaselineError(f"{method} returned a row without {', '.join(missing)}")
        if not (Path(out_dir) / str(row["trial_id"]) / "config.json").exists():
            raise BaselineError(f"{method} saved no model in {Path(out_dir) / row['trial_id']}")


def run_method(
    method: str,
    teacher_dir: str | os.PathLike,
    task: Any,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    opts: Any,
    results_root: str | os.PathLike,
    latency: Any = None,
    experiment: str | None = None,
) -> list[dict[str, Any]]:
    """Run baseline `method` and record its rows.

    Args:
        method: a :data:`nas_prune.registry.BASELINES` name.
        teacher_dir: fine-tuned teacher checkpoint (``nas-prune finetune``).
        task: the task, tokenised with the method's ``max_length``.
        tokenizer: saved with every produced model.
        out_dir: the method's model directory (one sub-directory per produced model).
        opts: the method's ``Options``.
        results_root: results store root (``<out>/results``).
        latency: ProfileOptions for :func:`measure_latency` of rows without latency; None
            for the defaults.
        experiment: results experiment (default :func:`experiment_name`).

    Returns:
        The rows appended to the store now (the models trained now; those the experiment
        already held are kept, not trained again).
    """
    from nas_prune.models import hf_family
    from nas_prune.results import ResultStore

    module = get(method)
    if not isinstance(opts, module.Options):
        raise BaselineError(f"{method} needs {module.__name__}.Options, got {type(opts).__name__}")
    store = ResultStore(results_root, experiment or experiment_name(method, opts))
    stored = store.evaluations()  # the pipeline keeps the dense reference row here too
    done = frozenset() if stored.empty else frozenset(
        stored.loc[stored["method"] != "dense", "trial_id"])
    log.info("== baseline %s ==%s", method,
             f" (kept from an earlier run: {', '.join(sorted(done))})" if done else "")
    rows: list[dict[str, Any]] = []

    def record(row: Mapping[str, Any]) -> None:
        """Store one finished model's row at once: a later interruption cannot lose it."""
        row = dict(row)
        check_rows([row], method, out_dir)
        row.setdefault("family", hf_family(teacher_dir))
        if row.get("latency_ms") is None:
            row.update(measure_latency(Path(out_dir) / row["trial_id"], latency))
        log.info("%s %s: %s %.4f, %d params (%.3f of dense), %.2f ms", method, row["trial_id"],
                 row["metric_name"], row["metric_value"], row["params"], row["params_ratio"],
                 row["latency_ms"])
        store.append_evaluations([row])
        rows.append(row)

    module.run(teacher_dir, task, tokenizer, out_dir, opts, done=done, on_row=record)
    return rows
