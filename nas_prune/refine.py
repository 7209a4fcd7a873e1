"""Refine: a short distillation of a chosen sub-network from the fine-tuned dense teacher.

Structural pruning papers recover accuracy after pruning by distilling the pruned model from
the dense one (METHODS.md section 4): Minitron (Muralidharan et al. 2024, arXiv 2407.14679;
Sreenivas et al. 2024) distils with logit KD (forward KL) from the teacher on a tiny fraction of
the original tokens; TinyBERT (Jiao et al. 2020) also matches hidden states, mapping student
layers uniformly onto teacher layers. `refine` does this for one sub-network of the supernet:

1. the sub-network of `config` in `space` is physically extracted from the supernet
   (``extract_sub_network``);
2. it is trained through the project's one DeepSpeed setup (``nas_prune.engine.make_engine``)
   for a budget of `RefineOptions.examples` training examples on the task's training split with

       alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)
       + hidden_weight * MSE(student layer j, teacher layer g(j)),

   g(j) = ceil((j + 1) * L_teacher / L_student) - 1 (the last student layer matches the last
   teacher layer), the MSE over real tokens, the teacher's channels in the supernet's rewired
   order; for regression MSE to the teacher's output replaces the KL term. Decoders distil
   the logits alone by default (Minitron; their unnormalised residual streams make the raw MSE
   swamp the logit term). A sub-network whose hidden size is narrowed keeps a prefix of the
   supernet's (importance-sorted) channels, and its states are matched with the same channels
   of the teacher's (`teacher_channels`);
3. it is scored on the validation split (the split every method chooses on) and saved with
   ``nas_prune.export.export_sub_network`` (a stock BERT/RoBERTa directory when its shape allows,
   else our encoder with its remote code), the result row inside its
   ``nas_prune_subnetwork.json`` under ``"refine"``.

Cost is counted as for every other method (METHODS.md section 6): the student's training
examples (forward + backward), the teacher's forward-only examples, and the wall time of the
whole refine (resumed runs add up). An interrupted refine resumes from its last DeepSpeed
checkpoint (``.<out_dir name>.refine/`` beside `out_dir`, every `checkpoint_every` steps); a
finished one in `out_dir` is not redone, its row is returned.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from nas_prune import data as data_lib
from nas_prune.compare import match_budgets
from nas_prune.errors import TrainingError
from nas_prune.options import RefineOptions
from nas_prune.train import hidden_mse, next_token_pairs

log = logging.getLogger(__name__)

METHOD = "nas+refine"
"""The results method of a refined sub-network."""

COST_KEYS = ("train_examples", "teacher_examples", "train_time_s", "model_dir")
"""Keys a refine row has beyond nas_prune.baselines.ROW_KEYS: examples the student processed
forward + backward, examples the teacher processed forward only, the refine's wall time in
seconds (everything: loading, training, scoring, saving) and the saved model's directory."""


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) *
    CE(student, y); for a regression head (one output) MSE to the teacher and to y; for
    language modelling (logits per token) the same over every predicted token."""
    if student.dim() == 3:
        student, next_tokens = next_token_pairs(student, labels)
        teacher, _ = next_token_pairs(teacher, labels)
        labels = next_tokens
    if student.shape[-1] == 1:
        soft = F.mse_loss(student, teacher)
        hard = F.mse_loss(student.squeeze(-1), labels.float())
    else:
        t = temperature
        soft = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                        reduction="batchmean", log_target=True) * t * t
        hard = F.cross_entropy(student, labels)
    return alpha * soft + (1 - alpha) * hard


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher layer each student layer matches: student layer j -> teacher layer
    ceil((j + 1) * L_teacher / L_student) - 1, so the last matches the last."""
    return [-(-(j + 1) * teacher_layers // student_layers) - 1 for j in range(student_layers)]


def forward_with_states(model: Any, module: torch.nn.Module, inputs: dict[str, torch.Tensor]
                        ) -> tuple[Any, dict[int, torch.Tensor]]:
    """`model(**inputs)` (a module or its DeepSpeed engine) and the residual stream after each
    layer of `module` (the model itself) by layer index: an encoder's recorded by
    `layer_outputs`, a decoder's from its `hidden_states` (the last one final-normed)."""
    if hasattr(module, "layers"):
        with layer_outputs(module) as states:
            out = model(**inputs)
        return out, states
    out = model(**inputs, output_hidden_states=True)
    return out, dict(enumerate(out.hidden_states[1:]))


def hidden_weight(opts: RefineOptions, module: torch.nn.Module) -> float:
    """The weight of the hidden-state term for `module`: `opts.hidden_weight`, or when None,
    1 for our encoder and 0 (logits only) for our decoder (RefineOptions.hidden_weight)."""
    if opts.hidden_weight is not None:
        return float(opts.hidden_weight)
    return 1.0 if hasattr(module, "layers") else 0.0


def learning_rate(opts: RefineOptions, module: torch.nn.Module) -> float:
    """The peak learning rate for `module`: `opts.lr`, or when None, 2e-4 for our encoder and
    5e-5 for our decoder (RefineOptions.lr)."""
    if opts.lr is not None:
        return float(opts.lr)
    return 2e-4 if hasattr(module, "layers") else 5e-5


def teacher_channels(order: Sequence[int] | None, teacher_width: int, student_width: int,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """The teacher's hidden channels a student's states are compared with, channel for
    channel: the supernet's channel order (`order`, the rewiring's; None: the teacher's own),
    cut to the student's width. A sub-network that narrows the hidden size keeps a prefix of
    the supernet's channels (the most important ones), so its states match that prefix of the
    teacher's (as Minitron prunes the embedding channels; its layer norms then normalise over
    the kept channels, so the match is close rather than exact)."""
    full = list(range(teacher_width)) if order is None else list(order)
    return torch.tensor(full[:student_width], dtype=torch.long, device=device)


def num_layers(module: torch.nn.Module) -> int:
    """Layers of our encoder or decoder."""
    return len(module.layers) if hasattr(module, "layers") else len(module.model.layers)


@contextlib.contextmanager
def layer_outputs(model: torch.nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """While open, each forward pass of our encoder `model` records the residual stream after
    each layer (the output of its last block) under the layer's index."""
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.layers):
        for block in (layer.attention, layer.ffn):  # the FFN runs last and overwrites
            if block is not None:
                handles.append(block.register_forward_hook(
                    lambda _module, _args, out, i=i: outputs.__setitem__(i, out)))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------ the stage
def near_budgets(rows: pd.DataFrame, budgets: Sequence[float], axis: str = "params_ratio",
                 per_budget: int = 1, band: float | None = None) -> pd.DataFrame:
    """The rows of `rows` (one method's candidates) a comparison at `budgets` can choose
    (RefineOptions.select "budgets"): for each budget, the `per_budget` rows
    nas_prune.compare.match_budgets ranks first within it (within [budget - band, budget]
    when `band` is given), best first, with a ``budget`` column; a row that two budgets
    choose appears once per budget. Rows without an error or an `axis` value are never
    chosen."""
    if per_budget < 1:
        raise ValueError(f"per_budget must be >= 1, got {per_budget}")
    if axis not in rows:
        return rows.iloc[:0].assign(budget=pd.Series(dtype=float))
    chosen = []
    for budget in sorted(float(b) for b in budgets):
        near = rows if band is None else rows[rows[axis] >= budget - band]
        chosen.append(match_budgets(near, [budget], axis, top=per_budget))
        if band is not None and len(chosen[-1]) < per_budget:
            # the band is in the axis's units: 0.03 of the parameters is 0.03 ms on latency
            log.warning("refine: %d of %d candidates for budget %g within refine.band %g "
                        "below it (%s units); widen refine.band or leave it unset",
                        len(chosen[-1]), per_budget, budget, band, axis)
    return pd.concat(chosen, ignore_index=True)


def screen_winner(errors: Mapping[str, float], incumbent: str, examples: int | None,
                  z: float = 1.96) -> str:
    """The candidate a screen chooses (RefineOptions.screen_z): `incumbent` (the search's
    choice) unless the candidate with the lowest screened error in `errors` (trial id ->
    validation error after the screen) beats it by more than `z` standard errors of the
    difference of two error rates on `examples` validation examples; with `examples` None
    (an error that is not a rate, e.g. perplexity) the lowest error wins."""
    best = min(errors, key=lambda trial: (errors[trial], trial != incumbent))
    if best == incumbent or examples is None:
        return best
    mine, theirs = errors[incumbent], errors[best]
    se = math.sqrt((mine * (1 - mine) + theirs * (1 - theirs)) / examples)
    return best if mine - theirs > z * se else incumbent


def work_dir(out_dir: str | os.PathLike) -> Path:
    """Where the refine into `out_dir` keeps its resumable state: ``.<name>.refine`` beside
    it."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.refine"


def finished_row(out_dir: str | os.PathLike, config: Mapping[str, int],
                 opts: RefineOptions) -> dict[str, Any] | None:
    """The row of a finished refine of `config` with `opts` in `out_dir`, None when there is
    none (an unrefined export of the same config, which the refine replaces, counts as none:
    the pipeline exports the whole Pareto set, and a later refine, e.g. at other budgets,
    refines some of those exports); TrainingError when `out_dir` holds another model or
    another refine."""
    from nas_prune.export import SUBNETWORK_FILE

    out = Path(out_dir)
    if not out.exists() or not any(out.iterdir()):
        return None
    info_file = out / SUBNETWORK_FILE
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    done = info.get("refine")
    if done is None and info.get("config") == dict(config):
        return None
    if done is None:
        raise TrainingError(f"{out} exists and holds no refined sub-network of this config; "
                            "choose another output directory")
    if done["config"] != dict(config) or done["options"] != opts.fingerprint():
        raise TrainingError(f"{out} already holds a refine of another config or with other "
                            "options; choose another output directory")
    return dict(done["row"])


def refine(
    supernet_dir: str | os.PathLike,
    teacher_dir: str | os.PathLike,
    config: Mapping[str, int],
    space: str | Any,
    task: data_lib.TaskData,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    opts: RefineOptions | None = None,
    *,
    trial_id: str | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Distil sub-network `config` of the supernet from the teacher and save it to `out_dir`.

    Args:
        supernet_dir: the trained supernet (``nas-prune supernet``).
        teacher_dir: the fine-tuned dense teacher it was trained from.
        config: the sub-network config (a search result's ``config``).
        space: the search space name (nas_prune.registry.SPACES) or a SearchSpace.
        task: the task, tokenised with `opts.max_length`.
        tokenizer: saved with the model; pads batches.
        out_dir: where the refined model is saved (a loadable Hugging Face directory).
        opts: refine options (default RefineOptions()).
        trial_id: the row's trial id (default: the name of `out_dir`).
        stop_after: stop (with a checkpoint) after this step, as if interrupted; None runs
            to the end.

    Returns:
        The results row: the keys of nas_prune.baselines.ROW_KEYS (method ``nas+refine``,
        validation metrics, params / params_ratio / flops of the sub-network, wall_time_s the
        refine's wall time) plus :data:`COST_KEYS`. Without `stop_after` reached early, the
        row of the saved model; after an early stop, the partial row has status ``rung``.
    """
    from nas_prune.checkpoint import check_supernet, check_teacher, load_checkpoint
    from nas_prune.engine import autocast, init_distributed, make_engine
    from nas_prune.evaluate import evaluate
    from nas_prune.export import export_sub_network
    from nas_prune.options import TrainOptions
    from nas_prune.space import make_space
    from nas_prune.train import batches

    started = time.perf_counter()
    opts = opts or RefineOptions()
    out = Path(out_dir)
    config = {str(k): int(v) for k, v in config.items()}
    trial_id = trial_id or out.name
    if (row := finished_row(out, config, opts)) is not None:
        log.info("refine of %s already finished in %s", trial_id, out)
        return row

    meta = check_supernet(supernet_dir)
    supernet, _ = load_checkpoint(supernet_dir)
    check_teacher(meta, supernet.config.num_labels, task, supernet_dir)
    teacher, teacher_meta = load_checkpoint(teacher_dir)
    check_teacher(teacher_meta, teacher.config.num_labels, task, teacher_dir)
    if teacher.config.hidden_size != supernet.config.hidden_size:
        raise TrainingError(f"teacher {teacher_dir} has hidden size {teacher.config.hidden_size}"
                            f" but the supernet {supernet.config.hidden_size}; give the teacher "
                            "the supernet was trained from")
    space = make_space(space, supernet.config) if isinstance(space, str) else space
    sub = space.to_sub_network(config)
    student = supernet.extract_sub_network(sub)
    params, dense_params = supernet.num_params(sub), supernet.num_params()
    flops = supernet.flops(sub, opts.flops_seq_len)
    del supernet

    init_distributed()
    if torch.distributed.get_world_size() != 1:
        raise TrainingError("refine runs on one worker; launch it without a multi-worker group")
    if len(task.train) < opts.batch_size:
        raise TrainingError(f"refine: {len(task.train)} training examples are fewer than one "
                            f"batch of {opts.batch_size}; lower batch_size")
    total = opts.steps(len(task.train))
    work = work_dir(out)
    state = {"config": config, "options": opts.fingerprint(), "total_steps": total,
             "supernet": str(supernet_dir), "teacher": str(teacher_dir)}
    resume = _resumable(work, state)
    valid_loader = data_lib.make_loader(task.valid, tokenizer, 64)
    before = evaluate(student, valid_loader, task.spec) if resume is None else resume["before"]

    train_opts = TrainOptions(
        max_steps=total, batch_size=opts.batch_size, lr=learning_rate(opts, student),
        weight_decay=opts.weight_decay, warmup_ratio=opts.warmup_ratio,
        max_length=opts.max_length, seed=opts.seed, log_every=opts.log_every,
        zero_stage=opts.zero_stage, precision=opts.precision,
    )
    torch.manual_seed(opts.seed)
    engine, _ = make_engine(student.train(), train_opts, total)
    step, done_examples, spent = 0, 0, 0.0
    if resume is not None:
        _, client = engine.load_checkpoint(str(work / "deepspeed"), load_module_strict=True)
        step, done_examples, spent = client["step"], client["examples"], client["seconds"]
        torch.set_rng_state(client["torch_rng"])
        log.info("refine of %s resumed at step %d / %d", trial_id, step, total)
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        (work / "refine.json").write_text(json.dumps({**state, "before": before}))
    module = engine.module
    teacher = teacher.to(engine.device, next(module.parameters()).dtype).eval()
    student_layers = num_layers(module)
    mapping = layer_map(student_layers, num_layers(teacher)) if student_layers else []
    # rewiring sorted the supernet's hidden channels: the teacher's states are compared in
    # the same order; a supernet saved before the order was recorded cannot be matched
    order = meta.get("hidden_order")
    rewired = meta.get("options", {}).get("rewire", False) and meta.get("strategy") != "standard"
    known = order is not None or not rewired
    weight = hidden_weight(opts, module)
    hidden = weight > 0 and bool(mapping) and known
    if weight > 0 and not known:
        log.warning("refine %s: hidden-state distillation off: the supernet %s was rewired "
                    "before its channel order was recorded (retrain it to use it): logits "
                    "only", trial_id, supernet_dir)
    channels = teacher_channels(order, teacher.config.hidden_size, module.config.hidden_size,
                                engine.device)

    def epoch_loader(epoch: int):
        return data_lib.make_loader(task.train, tokenizer, opts.batch_size, shuffle=True,
                                    seed=opts.seed * 100_003 + epoch, drop_last=True)

    def checkpoint() -> None:
        seconds = spent + time.perf_counter() - started
        engine.save_checkpoint(str(work / "deepspeed"), tag=f"step{step}", client_state={
            "step": step, "examples": done_examples, "seconds": seconds,
            "torch_rng": torch.get_rng_state()})
        for tag in (work / "deepspeed").glob("step*"):
            if tag.name != f"step{step}":
                shutil.rmtree(tag, ignore_errors=True)

    stream = batches(epoch_loader, step, 0, 1)
    t0, first = time.perf_counter(), step
    while step < total:
        _, batch = next(stream)
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad(), autocast(engine):
            teacher_out, teacher_states = forward_with_states(teacher, teacher, inputs)
        teacher_logits = teacher_out.logits.float()
        student_out, student_states = forward_with_states(engine, module, inputs)
        logits = student_out.logits.float()
        loss = distillation_loss(logits, teacher_logits, batch["labels"], opts.temperature,
                                 opts.alpha)
        if hidden:
            student_list = [student_states[j] for j in range(len(mapping))]
            teacher_list = [teacher_states[i].index_select(-1, channels) for i in mapping]
            loss = loss + weight * hidden_mse(student_list, teacher_list,
                                              batch.get("attention_mask"))
        engine.backward(loss)
        engine.step()
        step += 1
        done_examples += len(batch["labels"])
        if step % opts.log_every == 0 or step == total:
            rate = (step - first) / max(1e-9, time.perf_counter() - t0)
            log.info("refine %s step %d/%d  loss %.4f  %.1f steps/s", trial_id, step, total,
                     loss.item(), rate)
        if stop_after is not None and step >= stop_after and step < total:
            checkpoint()
            break
        if opts.checkpoint_every and step % opts.checkpoint_every == 0 and step < total:
            checkpoint()

    t_eval = time.perf_counter()
    after = evaluate(module, valid_loader, task.spec)
    eval_time = time.perf_counter() - t_eval
    finished = step >= total
    seconds = spent + time.perf_counter() - started
    row = {
        "method": METHOD, "task": task.spec.name, "model": str(meta.get("base_model") or ""),
        "seed": opts.seed, "trial_id": trial_id, "config": config,
        "fidelity": float(done_examples), "fidelity_unit": "train_examples",
        "error": after["error"], "metric_name": task.spec.metric,
        "metric_value": after["metric"], "params": params,
        "params_ratio": params / dense_params, "flops": flops, "wall_time_s": seconds,
        "eval_time_s": eval_time, "status": "ok" if finished else "rung",
        "message": (f"refined {step} steps on {done_examples} training examples (forward + "
                    f"backward; the teacher {done_examples} forward) in {seconds:.1f} s; "
                    f"validation {task.spec.metric} {before['metric']:.4f} -> "
                    f"{after['metric']:.4f}"),
        "train_examples": done_examples, "teacher_examples": done_examples,
        "train_time_s": seconds, "model_dir": str(out),
    }
    if not finished:
        return row
    export_sub_network(
        module.eval(), module.full_sub_network, out, tokenizer, seq_len=opts.flops_seq_len,
        metadata={"method": METHOD, "config": config, "space": space.name,
                  "params_ratio": params / dense_params, "flops": flops,
                  "task": task.spec.name, "supernet": str(supernet_dir),
                  "teacher": str(teacher_dir),
                  "refine": {"config": config, "options": opts.fingerprint(), "row": row,
                             "valid_before": before, "valid": after}})
    shutil.rmtree(work, ignore_errors=True)
    log.info("refined %s: validation %s %.4f -> %.4f, %d examples, %.1f s", trial_id,
             task.spec.metric, before["metric"], after["metric"], done_examples, seconds)
    return row


def _resumable(work: Path, state: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state of an interrupted refine in `work` to resume, None to start afresh;
    TrainingError when it was run with another config or other options."""
    saved_file = work / "refine.json"
    if not saved_file.exists() or not (work / "deepspeed" / "latest").exists():
        return None
    saved = json.loads(saved_file.read_text())
    changed = sorted(k for k, v in state.items() if saved.get(k) != v)
    if changed:
        raise TrainingError(f"{work} holds an interrupted refine with other "
                            f"{', '.join(changed)}; resume with the same ones or delete it")
    return saved
