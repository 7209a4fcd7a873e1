"""LLM-Pruner: one-shot structured pruning of a decoder language model by first-order group
importance, then optional short recovery training.

Ma, Fang and Wang, "LLM-Pruner: On the Structural Pruning of Large Language Models" (NeurIPS
2023, arXiv 2305.11627), block-wise mode, as fits our prefix sub-networks
(nas_prune.decoder):

* Coupled groups. An MLP neuron is its gate row, up row and down column (with their biases).
  An attention group is a *KV group* (``attention_unit="kv_group"``, the default): one K and
  one V head (rows and biases) with every query head that reads them (their Q rows and O
  columns), the group LLM-Pruner's dependency graph yields under grouped-query attention,
  since removing a K/V head orphans its query heads; without GQA it is one head. With
  ``attention_unit="query"`` the K/V heads stay and each layer keeps the same number of query
  heads in every group (its best ones), so the sliced layer is again a valid GQA shape.
* Importance: the paper's element-wise first-order Taylor term ``|w * dL/dw|`` (its
  ``--taylor param_first``) summed over each group's weights, with L the mean next-token loss
  over `calibration_blocks` blocks of the training split (the paper uses 10 samples), from one
  accumulated backward pass of the full model.
* Pruning: the same ratio r of each layer's groups is removed in the layers
  ``first_layer .. last_layer - 1``; the others stay whole. The paper prunes layers 4..29 of the
  32 of LLaMA-7B, so by default the first 1/8 and the last 1/16 of the layers (rounded) stay.
  A layer keeps ``n - floor(r n)`` of its n KV groups (or query heads per group) and of its MLP
  neurons, at least one of each. For each target in `params_ratios` (of the whole model's
  parameters, ``DecoderForCausalLM.num_params``: embeddings and LM head included) r is the
  smallest ratio whose model has at most that many parameters, i.e. the closest from below.
* Our implementation: the units are permuted so that the most important come first
  (``nas_prune.decoder_importance.reorder``; the function is unchanged), so the pruned model is
  a prefix ``DecoderSubNetwork``, extracted with ``extract_sub_network``.
* Recovery: the paper tunes LoRA adapters for two epochs on Alpaca. Here, when
  ``recovery_steps > 0``, all weights of the pruned model are fine-tuned on the next-token loss
  of the task's training blocks through the same DeepSpeed loop as the teacher
  (``nas_prune.train.train``, ``standard`` strategy; :func:`recover`) and the cost is counted.
  Default 0: the one-shot model, as in the paper's "w/o tune" rows.

Each row is charged what producing its model alone costs: the calibration blocks
(forward + backward) plus its recovery steps' blocks. The LM helpers here (teacher loading,
calibration batches, validation, recovery) are shared with the decoder path of
``layer_drop``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from nas_prune import data as data_lib
from nas_prune.errors import BaselineError, CheckpointError

log = logging.getLogger(__name__)

ATTENTION_UNITS = ("kv_group", "query")
"""What one attention group of LLM-Pruner is here (see the module docstring)."""


@dataclass
class Options:
    """LLM-Pruner options."""

    params_ratios: list[float] = field(default_factory=lambda: [0.75, 0.5])
    """Target fractions of the dense model's parameters (embeddings and LM head included);
    one pruned model each, the largest at or below its target."""
    calibration_blocks: int = 10
    """Training-split token blocks whose loss gradient gives the importance (paper: 10)."""
    first_layer: int | None = None
    """First layer pruned; None: round(L / 8), the paper's 4 of 32 layers kept at the input."""
    last_layer: int | None = None
    """Layer after the last one pruned (exclusive); None: L - round(L / 16), the paper's 30
    of 32."""
    attention_unit: str = "kv_group"
    """"kv_group": remove whole GQA groups (K/V head and its query heads); "query": keep every
    K/V head and remove query heads, the same number in each group."""
    recovery_steps: int = 0
    """Full fine-tuning steps on the task's training blocks after pruning (0: none)."""
    batch_size: int = 8
    """Blocks per calibration, recovery and evaluation batch."""
    lr: float = 5e-5
    """Peak recovery learning rate (AdamW; linear warm-up then linear decay)."""
    weight_decay: float = 0.0
    """Recovery AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Fraction of recovery steps with linear learning-rate warm-up."""
    max_length: int = 128
    """Tokens per block (the tokenisation length)."""
    seed: int = 0
    """Seed of the calibration blocks and the recovery data order."""
    log_every: int = 50
    """Log recovery progress every this many steps."""

    def __post_init__(self) -> None:
        self.params_ratios = [float(r) for r in self.params_ratios]
        if not self.params_ratios or not all(0 < r <= 1 for r in self.params_ratios):
            raise BaselineError(f"params_ratios must list fractions in (0, 1] of the dense "
                                f"model's parameters, e.g. 0.75 0.5; got {self.params_ratios}")
        if len(set(self.params_ratios)) != len(self.params_ratios):
            raise BaselineError(f"params_ratios lists a target twice: {self.params_ratios}")
        if self.attention_unit not in ATTENTION_UNITS:
            raise BaselineError(f"attention_unit must be one of {', '.join(ATTENTION_UNITS)}, "
                                f"got {self.attention_unit!r}")
        for name in ("calibration_blocks", "batch_size", "max_length", "log_every"):
            if getattr(self, name) < 1:
                raise BaselineError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.recovery_steps < 0:
            raise BaselineError(f"recovery_steps must be >= 0, got {self.recovery_steps}")
        for name in ("first_layer", "last_layer"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise BaselineError(f"{name} must be >= 0, got {getattr(self, name)}")
        try:
            self.train_options()
        except ValueError as e:
            raise BaselineError(str(e)) from None

    def train_options(self):
        """The recovery fine-tuning options (FinetuneOptions; at least one step, so that they
        validate when recovery is off)."""
        from nas_prune.options import FinetuneOptions

        return FinetuneOptions(max_steps=max(1, self.recovery_steps), batch_size=self.batch_size,
                               lr=self.lr, weight_decay=self.weight_decay,
                               warmup_ratio=self.warmup_ratio, max_length=self.max_length,
                               seed=self.seed, log_every=self.log_every)


# ------------------------------------------------------------------------ shared LM helpers
def load_decoder_teacher(teacher_dir: str | os.PathLike, task: data_lib.TaskData):
    """The dense decoder LM of teacher checkpoint `teacher_dir` for `task`, in eval mode, on
    the GPU when there is one, and its metadata."""
    import torch

    from nas_prune.checkpoint import check_teacher, load_checkpoint
    from nas_prune.decoder import DecoderForCausalLM

    teacher, meta = load_checkpoint(teacher_dir)
    check_teacher(meta, teacher.config.num_labels, task, teacher_dir)
    if not isinstance(teacher, DecoderForCausalLM):
        raise CheckpointError(f"{teacher_dir} holds a {type(teacher).__name__}, not a decoder "
                              "language model; give the dense causal LM teacher")
    c = teacher.config
    if any(x is not None for x in (c.layer_kv_heads, c.layer_queries_per_kv, c.layer_units)):
        raise CheckpointError(f"{teacher_dir} holds an already pruned decoder; give the dense "
                              "teacher")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return teacher.to(device).eval(), meta


def calibration_batches(split: Any, tokenizer: Any, blocks: int, batch_size: int,
                        seed: int) -> list[dict[str, Any]]:
    """`blocks` blocks of `split` drawn with `seed` (all if fewer), batched."""
    if len(split) == 0:
        raise BaselineError("the training split is empty; no calibration blocks")
    chosen = split.shuffle(seed=seed).select(range(min(blocks, len(split))))
    return list(data_lib.make_loader(chosen, tokenizer, batch_size))


def validation_scores(model: Any, task: data_lib.TaskData, tokenizer: Any,
                      batch_size: int) -> tuple[dict[str, float], float]:
    """(nas_prune.evaluate.evaluate of `model` on the whole validation split: perplexity as
    metric and error, seconds it took)."""
    from nas_prune.evaluate import evaluate

    started = time.perf_counter()
    scores = evaluate(model, data_lib.make_loader(task.valid, tokenizer, batch_size), task.spec)
    return scores, time.perf_counter() - started


def recover(model: Any, task: data_lib.TaskData, tokenizer: Any, work_dir: Path,
            train_opts: Any, kind: str) -> tuple[int, int, float]:
    """Fine-tune all weights of the extracted decoder `model` in place on the next-token loss
    of `task`'s training blocks (nas_prune.train.train, `standard` strategy, FinetuneOptions
    `train_opts`); its DeepSpeed checkpoint in `work_dir` is removed afterwards. Returns (steps,
    blocks processed forward + backward, seconds)."""
    import dataclasses
    import shutil

    from nas_prune.train import train

    shutil.rmtree(work_dir, ignore_errors=True)
    # train()'s own end-of-training validation runs on one batch; the row's perplexity comes
    # from the whole validation split
    quick = dataclasses.replace(task, valid=task.valid.select(range(min(
        train_opts.batch_size, len(task.valid)))))
    result = train(model.train(), quick, tokenizer, work_dir, train_opts,
                   meta={"kind": kind, "task": task.spec.name})
    shutil.rmtree(work_dir, ignore_errors=True)
    model.eval()
    blocks = result.steps * train_opts.batch_size * train_opts.gradient_accumulation
    return result.steps, blocks, result.seconds


# ------------------------------------------------------------------------------ importance
@dataclass(frozen=True)
class TaylorScores:
    """First-order group importances of a full decoder, higher is more important."""

    queries: list[Any]
    """Per layer: (KV groups, query heads per group), each query head's Q rows and O columns."""
    groups: list[Any]
    """Per layer: (KV groups,), the group's query heads plus its K and V rows."""
    units: list[Any]
    """Per layer: (MLP neurons,), gate and up rows and the down column."""


def taylor_scores(model: Any, batches: Sequence[dict[str, Any]]) -> TaylorScores:
    """``sum |w * dL/dw|`` over each coupled group of the full decoder `model`, L the mean
    next-token loss over all blocks of `batches` (one accumulated backward pass)."""
    import torch

    c, d = model.config, model.config.head_dim
    model.reset_super_network()
    was_training = model.training
    model.eval()
    layers = model.model.layers
    layer_params = {id(p) for p in layers.parameters()}
    trainable = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():  # gradients of the layers only (no embeddings / LM head)
        p.requires_grad_(id(p) in layer_params)
    model.zero_grad(set_to_none=True)
    total = sum(len(b["input_ids"]) for b in batches)
    try:
        device = next(model.parameters()).device
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            (model(**batch).loss * (len(batch["input_ids"]) / total)).backward()

        def salience(linear: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
            def one(p):
                if p is None:
                    return None
                if p.grad is None:
                    return torch.zeros(p.shape)
                return (p.detach().float() * p.grad.float()).abs().cpu()
            return one(linear.weight), one(linear.bias)

        queries, groups, units = [], [], []
        heads, kv, h = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
        for layer in layers:
            att, mlp = layer.self_attn, layer.mlp
            q_w, q_b = salience(att.q_proj)
            o_w, _ = salience(att.o_proj)  # the o bias writes the stream: no head's own
            query = q_w.view(heads, d, h).sum((1, 2)) + o_w.view(h, heads, d).sum((0, 2))
            if q_b is not None:
                query += q_b.view(heads, d).sum(1)
            group = torch.zeros(kv)
            for proj in (att.k_proj, att.v_proj):
                w, b = salience(proj)
                group += w.view(kv, d, h).sum((1, 2))
                if b is not None:
                    group += b.view(kv, d).sum(1)
            query = query.view(kv, heads // kv)
            queries.append(query)
            groups.append(group + query.sum(1))
            unit = torch.zeros(c.intermediate_size)
            for proj in (mlp.gate_proj, mlp.up_proj):
                w, b = salience(proj)
                unit += w.sum(1) + (b if b is not None else 0)
            unit += salience(mlp.down_proj)[0].sum(0)
            units.append(unit)
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return TaylorScores(queries, groups, units)


def rewire_by_scores(model: Any, scores: TaylorScores) -> None:
    """Permute `model`'s KV groups, the query heads inside each group and the MLP neurons by
    decreasing score (in place), so the prefixes a sub-network keeps are the best groups."""
    import torch

    from nas_prune.decoder_importance import reorder

    reorder(model,
            [torch.argsort(g, descending=True, stable=True) for g in scores.groups],
            [torch.argsort(q, dim=1, descending=True, stable=True) for q in scores.queries],
            [torch.argsort(u, descending=True, stable=True) for u in scores.units],
            torch.arange(model.config.hidden_size))


# --------------------------------------------------------------------------------- budgets
def layer_range(num_layers: int, first: int | None, last: int | None) -> range:
    """The layers pruned: `first` .. `last` - 1, by default the paper's proportions."""
    first = round(num_layers / 8) if first is None else first
    last = num_layers - round(num_layers / 16) if last is None else last
    if not 0 <= first < last <= num_layers:
        raise BaselineError(f"first_layer {first} and last_layer {last} must satisfy 0 <= first "
                            f"< last <= {num_layers} (the decoder's layers)")
    return range(first, last)


def pruned_sub_network(config: Any, ratio: Fraction, layers: range, attention_unit: str):
    """The prefix sub-network that removes `ratio` of the groups of each layer in `layers`."""
    from nas_prune.decoder import DecoderSubNetwork

    def keep(n: int) -> int:
        return max(1, n - math.floor(ratio * n))

    kv, g, n = config.num_key_value_heads, config.queries_per_group, config.intermediate_size
    by_query = attention_unit == "query" and g > 1
    shape = [((kv, keep(g)) if by_query else (keep(kv), g), keep(n)) if i in layers
             else ((kv, g), n) for i in range(config.num_hidden_layers)]
    return DecoderSubNetwork(tuple(a[0] for a, _ in shape), tuple(a[1] for a, _ in shape),
                             tuple(u for _, u in shape))


def fit_ratio(model: Any, target: float, layers: range, attention_unit: str):
    """(ratio, sub-network) with the fewest groups removed whose parameters are at most
    `target` of the dense model's."""
    c = model.config
    attention = (c.queries_per_group if attention_unit == "query" and c.queries_per_group > 1
                 else c.num_key_value_heads)
    ratios = sorted({Fraction(a, attention) for a in range(attention)}
                    | {Fraction(m, c.intermediate_size) for m in range(c.intermediate_size)})
    limit = target * model.num_params()

    def params(i: int) -> int:
        return model.num_params(pruned_sub_network(c, ratios[i], layers, attention_unit))

    if params(len(ratios) - 1) > limit:
        smallest = params(len(ratios) - 1) / model.num_params()
        raise BaselineError(
            f"params ratio {target} is out of reach: pruning layers {layers.start}.."
            f"{layers.stop - 1} down to one group each leaves {smallest:.3f} of the parameters; "
            "raise the target or widen first_layer / last_layer")
    lo, hi = 0, len(ratios) - 1  # params(i) does not increase with i: the first i <= limit
    while lo < hi:
        mid = (lo + hi) // 2
        if params(mid) <= limit:
            hi = mid
        else:
            lo = mid + 1
    return ratios[lo], pruned_sub_network(c, ratios[lo], layers, attention_unit)


def sub_network_config(sub: Any) -> dict[str, int]:
    """A sub-network as a flat config (the keys of the decoder_medium space)."""
    config = {}
    for name in ("kv_heads", "queries_per_kv", "units"):
        config.update({f"{name}_{i}": v for i, v in enumerate(getattr(sub, name))})
    return config


# ------------------------------------------------------------------------------------- run
def trial_id(target: float) -> str:
    """The name of the model pruned to `target` of the dense parameters, e.g. "params-0.5"."""
    return f"params-{target:g}"


def pruned_model_row(teacher: Any, sub: Any, trial_id: str, task: data_lib.TaskData,
                     tokenizer: Any, out_dir: Path, opts: Any, *, method: str, recovery: bool,
                     meta: dict[str, Any], teacher_dir: str | os.PathLike, started: float,
                     calibration: tuple[int, float], config: dict[str, int],
                     metadata: dict[str, Any], steps_key: str,
                     message: Any) -> dict[str, Any]:
    """What both decoder baselines do with one pruned shape: extract `sub` from the teacher,
    fine-tune it (`recover`) when `recovery`, score it on validation, save it to
    ``out_dir/trial_id`` (export_decoder, with `metadata`, the recovery steps under
    `steps_key`) and return its results row. `calibration` is (blocks, seconds) of the
    importance measurement, charged to every row; `message(steps)` is the row's message."""
    from nas_prune.export import export_decoder

    small = teacher.extract_sub_network(sub)
    steps, trained, train_s = 0, 0, 0.0
    if recovery:
        steps, trained, train_s = recover(small, task, tokenizer, out_dir / f".{trial_id}.train",
                                          opts.train_options(), method)
    scores, eval_time = validation_scores(small, task, tokenizer, opts.batch_size)
    params, dense = teacher.num_params(sub), teacher.num_params()
    export_decoder(small.eval(), small.full_sub_network, out_dir / trial_id, tokenizer,
                   metadata={"method": method, **metadata, "params_ratio": params / dense,
                             steps_key: steps, "task": task.spec.name,
                             "teacher": str(teacher_dir), "valid": scores},
                   seq_len=opts.max_length)
    blocks, calibration_s = calibration
    examples = blocks + trained
    return {
        "method": method, "task": task.spec.name,
        "model": str(meta.get("base_model", "")), "seed": opts.seed, "trial_id": trial_id,
        "config": config, "fidelity": float(examples * opts.max_length),
        "fidelity_unit": "tokens", "error": scores["error"], "metric_name": task.spec.metric,
        "metric_value": scores["metric"], "params": params, "params_ratio": params / dense,
        "flops": teacher.flops(sub, opts.max_length),
        "wall_time_s": time.perf_counter() - started, "train_examples": examples,
        "train_time_s": calibration_s + train_s, "eval_time_s": eval_time, "status": "ok",
        "message": message(steps),
    }


def run(teacher_dir: str | os.PathLike, task: data_lib.TaskData, tokenizer: Any,
        out_dir: str | os.PathLike, opts: Options, *, done: Collection[str] = (),
        on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Prune the dense decoder at `teacher_dir` to each of `opts.params_ratios`, optionally
    recover, save each model to ``out_dir/params-<target>/`` and return one row per model
    trained now (validation perplexity). Models whose trial id is in `done` (already stored)
    are not trained again (nor is the importance computed when none is left); `on_row` gets
    each new row as soon as its model is saved."""
    started = time.perf_counter()
    if not task.spec.is_lm:
        raise BaselineError(f"llm_pruner prunes decoder language models; task "
                            f"{task.spec.name!r} is not a language-modelling task")
    teacher, meta = load_decoder_teacher(teacher_dir, task)
    c = teacher.config
    layers = layer_range(c.num_hidden_layers, opts.first_layer, opts.last_layer)
    todo = [t for t in opts.params_ratios if trial_id(t) not in done]
    if not todo:
        return []
    calibration = calibration_batches(task.train, tokenizer, opts.calibration_blocks,
                                      opts.batch_size, opts.seed)
    blocks = sum(len(b["input_ids"]) for b in calibration)
    rewire_by_scores(teacher, taylor_scores(teacher, calibration))
    calibration_s = time.perf_counter() - started
    log.info("LLM-Pruner: Taylor importance on %d blocks in %.1f s; pruning layers %d..%d",
             blocks, calibration_s, layers.start, layers.stop - 1)
    out, rows = Path(out_dir), []
    for target in todo:
        ratio, sub = fit_ratio(teacher, target, layers, opts.attention_unit)
        name = trial_id(target)
        rows.append(pruned_model_row(
            teacher, sub, name, task, tokenizer, out, opts, method="llm_pruner",
            recovery=bool(opts.recovery_steps), meta=meta, teacher_dir=teacher_dir,
            started=started, calibration=(blocks, calibration_s),
            config={"params_pct": round(100 * target), **sub_network_config(sub)},
            metadata={"params_ratio_target": target, "pruning_ratio": float(ratio),
                      "first_layer": layers.start, "last_layer": layers.stop,
                      "attention_unit": opts.attention_unit},
            steps_key="recovery_steps",
            message=lambda steps, ratio=ratio: (
                f"LLM-Pruner pruning ratio {float(ratio):.3f} of the "
                f"{opts.attention_unit.replace('_', ' ')}s and MLP neurons of layers "
                f"{layers.start}..{layers.stop - 1}, Taylor importance on {blocks} blocks, "
                f"{steps} recovery steps")))
        if on_row is not None:
            on_row(rows[-1])
        log.info("%s: perplexity %.3f, %.3f of the dense parameters (target %.3f)", name,
                 rows[-1]["metric_value"], rows[-1]["params_ratio"], target)
    return rows
