"""Every option a user can set, one dataclass per concern, validated in ``__post_init__``.

The field docstrings are the CLI help (``nas-prune <stage> --help``), the field names are the YAML
keys (``--config``), and every choice is checked against :mod:`nas_prune.registry`. This module
imports neither torch nor Ray, so bad options fail in a fraction of a second, before any model,
data or cluster is touched.

===================  =========================================  ================================
dataclass            section (CLI prefix / YAML key)            used by
===================  =========================================  ================================
`TaskOptions`        ``data``                                   ``nas_prune.data.load_task``
`FinetuneOptions`    ``finetune``                               ``nas_prune.train.finetune``
`SupernetOptions`    ``supernet``                               ``nas_prune.train.train_supernet``
`SearchOptions`      ``search``                                 ``nas_prune.search.driver``
`ProfileOptions`     ``profile``                                ``nas_prune.profile`` (and the
                                                                latency objectives, baselines)
`PipelineOptions`    all of the above + model, workers, ...     ``nas_prune.pipeline``
===================  =========================================  ================================
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from nas_prune import registry
from nas_prune.errors import OptionsError, ProfileError, SearchError, TrainingError


def _at_least(opts: Any, minimum: float, names: tuple[str, ...], error: type[Exception]) -> None:
    for name in names:
        value = getattr(opts, name)
        if value is not None and value < minimum:
            raise error(f"{name} must be >= {minimum:g}, got {value}")


# --------------------------------------------------------------------------------- data
@dataclass
class TaskOptions:
    """Which data to prune for (the keyword arguments of nas_prune.data.load_task)."""

    task: str = "rotten_tomatoes"
    """A built-in task or corpus, a GLUE task name, a datasets hub name, a CSV/JSON/Parquet
    file, or text files (a .txt file or a directory of them: language modelling)."""
    data_files: dict[str, str] | None = None
    """Explicit {"train": path, "test": path} files."""
    text_column: str = "text"
    """Text column of local files / other hub datasets."""
    text_pair_column: str | None = None
    """Second text column of pair tasks, if any."""
    label_column: str = "label"
    """Label column (strings, ints and bools: classification; fractional floats: regression)."""
    metric: str | None = None
    """accuracy, f1, matthews or spearman (default: the task's)."""
    max_examples: int | None = None
    """Cap on each split's size (quick runs)."""
    seed: int = 0
    """Seed of the train/valid/test split and of the max_examples subsets."""
    encoding: str = "utf-8"
    """Text encoding of local CSV/TSV/JSON files (e.g. latin-1)."""
    kind: str | None = None
    """classification or lm (language modelling, scored by perplexity); default: lm for a
    built-in corpus (convention_speeches) and text files, else classification."""

    def __post_init__(self) -> None:
        _at_least(self, 1, ("max_examples",), OptionsError)
        if self.kind not in (None, "classification", "lm"):
            raise OptionsError(f"--data.kind must be classification or lm, got {self.kind!r}")

    def resolved(self) -> TaskOptions:
        """These options with local data files as absolute paths, so that processes with
        another working directory (Ray Tune trials, Ray Train workers) read the same files."""

        def absolute(path: str) -> str:
            return str(Path(path).resolve()) if Path(path).exists() else path

        files = self.data_files
        if isinstance(files, dict):
            files = {split: absolute(path) for split, path in files.items()}
        return dataclasses.replace(self, task=absolute(self.task), data_files=files)


# --------------------------------------------------------------------------------- training
@dataclass
class TrainOptions:
    """How to train: what fine-tuning and supernet training share."""

    strategy: ClassVar[str] = "standard"
    """The training strategy (a nas_prune.registry.STRATEGIES name); fixed per subclass."""
    space: ClassVar[str | None] = None
    num_random: ClassVar[int | None] = None
    temperature: ClassVar[float] = 1.0
    rewire: ClassVar[bool] = False
    epochs_may_be_zero: ClassVar[bool] = False

    epochs: float = 3.0
    """Passes over the training split (fractions allowed); `max_steps` overrides."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides `epochs`)."""
    batch_size: int = 32
    """Examples per worker per micro-batch."""
    gradient_accumulation: int = 1
    """Batches per optimizer step (each with all of the strategy's passes)."""
    lr: float = 5e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Fraction of steps with linear learning-rate warm-up, then linear decay to 0."""
    max_length: int = 128
    """Tokens per example after truncation (batches are padded to their longest example)."""
    seed: int = 0
    """Seed of data order, dropout and sub-network sampling."""
    log_every: int = 10
    """Log progress every this many steps."""
    checkpoint_every: int | None = None
    """Save a resumable checkpoint every this many steps (None: only at the end)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0-3)."""
    precision: str = "auto"
    """"auto" (bf16 on GPU, fp32 on CPU), "fp32" or "bf16" (on a CPU: bf16 autocast around fp32
    weights, faster where the CPU has AVX512-BF16 or AMX)."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Overrides merged into the generated DeepSpeed config (optimizer, scheduler, ZeRO, ...)."""

    RESUME_FREE: ClassVar[frozenset[str]] = frozenset({"log_every", "checkpoint_every"})
    """Options that may change when an interrupted run resumes."""

    def __post_init__(self) -> None:
        _at_least(self, 1, ("batch_size", "gradient_accumulation", "log_every", "max_steps",
                            "checkpoint_every"), TrainingError)
        if (self.epochs < 0 or (self.epochs == 0 and not self.epochs_may_be_zero)) \
                and self.max_steps is None:
            raise TrainingError(f"epochs must be > 0, got {self.epochs}")
        if self.lr <= 0:
            raise TrainingError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise TrainingError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_length < 2:
            raise TrainingError(f"max_length must be >= 2 tokens, got {self.max_length}")
        if not 0 <= self.warmup_ratio < 1:
            raise TrainingError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise TrainingError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise TrainingError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if not isinstance(self.deepspeed, dict):
            raise TrainingError("deepspeed must be a mapping of DeepSpeed config keys, got "
                                f"{self.deepspeed!r}")


@dataclass
class FinetuneOptions(TrainOptions):
    """How to fine-tune the dense teacher (the `standard` strategy on the full network).
    `epochs` 0 (language modelling only) takes the pre-trained model as the teacher as is."""

    epochs_may_be_zero: ClassVar[bool] = True

    pooling: str = "auto"
    """What the new classification head reads, "cls" (first token), "mean" (mean of the
    tokens; depth-reduced sub-networks of mean-pooled sentence encoders such as MiniLM keep
    their accuracy only so) or "auto" (a new head gets the checkpoint's own pooling, mean for a
    mean-pooling sentence-transformers model; a trained classifier keeps cls)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        registry.check(("auto", *registry.POOLINGS), self.pooling, "pooling", TrainingError)


@dataclass
class SupernetOptions(TrainOptions):
    """How to train the weight-sharing supernet from the fine-tuned teacher. `epochs` 0 trains
    nothing: the supernet is the teacher with its heads and neurons sorted by importance
    (`rewire`), so the search scores importance-pruned sub-networks of the teacher itself (the
    one-shot setting of Minitron and LLM-Pruner, to be followed by `refine`)."""

    epochs_may_be_zero: ClassVar[bool] = True

    strategy: str = "full"
    """One of nas_prune.registry.STRATEGIES: standard, random, random_linear, sandwich, kd, full."""
    space: str = "small"
    """Search space random sub-networks are drawn from: small, medium, layer, large;
    small+hidden or medium+hidden also vary the hidden (embedding) size. Decoders:
    decoder_small, decoder_medium (what small and medium mean for them), decoder_middle."""
    num_random: int | None = None
    """Random sub-networks per step (None: the strategy's default, 1 or 2)."""
    temperature: float = 1.0
    """Distillation temperature T for `kd` and `full`."""
    rewire: bool = True
    """Sort heads and neurons by importance before supernet training (DynaBERT)."""
    rewire_batches: int = 8
    """Training batches used to measure importance for rewiring."""
    budgets: list[float] = field(default_factory=list)
    """Params ratios at which models are wanted (e.g. compare.budgets): each random
    sub-network of a step is drawn uniformly among those with params ratio in
    (budget - budget_band, budget] for a budget picked at random (AttentiveNAS-style
    constraint-aware sampling, Wang et al. 2021), so training goes to the sub-networks the
    user will deploy; empty: uniformly from the whole space."""
    budget_band: float = 0.03
    """With `budgets`: width of the params-ratio band below each budget."""

    def __post_init__(self) -> None:
        super().__post_init__()
        registry.check(registry.STRATEGIES, self.strategy, "strategy", TrainingError)
        if any(not 0 < b <= 1 for b in self.budgets):
            raise TrainingError(f"supernet: budgets are params ratios in (0, 1], got "
                                f"{self.budgets}")
        if not 0 < self.budget_band < 1:
            raise TrainingError(f"supernet: budget_band must be in (0, 1), got "
                                f"{self.budget_band}")
        registry.check_space(self.space, TrainingError)
        _at_least(self, 1, ("rewire_batches",), TrainingError)
        if self.num_random is not None and self.num_random < 1:
            raise TrainingError(f"{self.strategy}: num_random must be >= 1, got "
                                f"{self.num_random}")
        if self.temperature <= 0:
            raise TrainingError(f"temperature must be > 0, got {self.temperature}")
        if self.max_steps is None and self.epochs == 0 and not self.rewire:
            raise TrainingError("supernet: epochs 0 (no training) keeps the teacher as the "
                                "supernet only with rewire true (importance-sorted heads and "
                                "neurons); set rewire true or epochs > 0")


# --------------------------------------------------------------------------------- latency
@dataclass
class ProfileOptions:
    """How latency is measured: the profiler actors, the latency objectives of a search and the
    baselines' saved models all use these settings."""

    hardware: list[str] | None = None
    """Hardware types to measure on (default: every type in the Ray cluster but
    cpu-onnxruntime, which is measured only when named)."""
    batch_size: int = 1
    """Sequences per timed forward pass."""
    seq_len: int = 128
    """Tokens per sequence."""
    dtype: str = "auto"
    """"auto" (bf16 on GPU, fp32 on CPU), "fp32", "bf16" or "fp16"."""
    warmup: int = 3
    """Untimed runs before timing."""
    repeats: int = 10
    """Timed runs; the median is the latency."""
    rounds: int = 3
    """Time every model `repeats` times once per round, all the models of one measurement in
    turn and then all again, and keep each model's lowest median: a burst of load from other
    processes spoils one round of a few models instead of one model's only timing, and a slow
    drift of the machine's speed reaches every compared model alike (a shared CPU moved
    timings 10-15% between sessions). The lookup table's entries are timed the same way."""
    threads: int = 1
    """CPU threads per measurement (pinned with torch.set_num_threads)."""
    clock: str = "wall"
    """"wall", or "thread" (CPU time of the timing thread: leaves out other processes' load;
    needs threads=1 on a CPU type). Latency objectives of a search use it; the profile stage,
    whose rows are cached in the results store, always times wall-clock."""
    enabled: bool = True
    """Pipeline: measure the Pareto set's latency after the search, and the compared models'
    (every method's, by the same actors on every hardware type) in the comparison; false
    skips both."""

    def __post_init__(self) -> None:
        if self.clock not in ("wall", "thread"):
            raise ProfileError(f"clock must be wall or thread, got {self.clock!r}")
        if self.clock == "thread" and self.threads != 1:
            raise ProfileError("clock thread times one thread; set threads 1")
        _at_least(self, 1, ("batch_size", "seq_len", "repeats", "rounds", "threads"), ProfileError)
        _at_least(self, 0, ("warmup",), ProfileError)
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ProfileError(f"dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}")


# --------------------------------------------------------------------------------- search
STATIC_OBJECTIVES = {
    "error": "validation error (1 - metric)",
    "params": "parameters of the sub-network (embeddings and head included)",
    "params_ratio": "parameters relative to the full model",
    "flops": "floating-point operations for one sequence of `flops_seq_len` tokens",
}
"""Objectives every trial reports. `latency:<hardware>` objectives come from nas_prune.profile."""


def check_objectives(objectives: list[str], error: type[Exception] = SearchError) -> None:
    """Raise `error` unless every name is a static objective or ``latency:<hardware>``."""
    if not objectives:
        raise error("give at least one objective")
    for name in objectives:
        if name not in STATIC_OBJECTIVES and not (name.startswith("latency:") and name[8:]):
            raise error(f"unknown objective {name!r}; choose from "
                        f"{', '.join(STATIC_OBJECTIVES)} or latency:<hardware>")
    if len(set(objectives)) != len(objectives):
        raise error(f"objectives repeat: {objectives}")


@dataclass
class SearchOptions:
    """How to search."""

    searcher: str = "random"
    """One of nas_prune.registry.SEARCHERS: random, local, morea, nsga2."""
    scheduler: str = "fifo"
    """fifo (every trial runs to the end) or moasha (multi-objective early stopping)."""
    objectives: list[str] = field(default_factory=lambda: ["error", "params_ratio"])
    """Minimised objectives: error, params, params_ratio, flops, latency:<hardware>."""
    space: str | None = None
    """Search space (default: the one the supernet was trained with); small+hidden and
    medium+hidden also search the hidden size."""
    num_samples: int = 100
    """Trials (sub-network configs) to evaluate."""
    seed: int = 0
    """Seed of the searcher (and of the validation order unless `valid_seed` is given)."""
    valid_seed: int | None = None
    """Seed of the validation order, hence of the `valid_examples` subset and the MO-ASHA
    prefixes (default: `seed`). Fix it to compare searcher seeds on the same examples."""
    num_workers: int | None = None
    """Trials at a time (default: one per CPU of the Ray cluster)."""
    mode: str = "weight_sharing"
    """weight_sharing (score through the supernet) or standard (fine-tune each sub-network)."""
    max_t: int = 1
    """Fidelity steps of a full evaluation: validation chunks (weight sharing) or epochs."""
    grace_period: int = 1
    """MO-ASHA: fidelity steps every trial gets before it can be stopped."""
    reduction_factor: float = 3.0
    """MO-ASHA: keep the top 1/reduction_factor of the trials at each rung."""
    valid_examples: int | None = None
    """Validation examples a full evaluation scores (default: the whole validation split)."""
    batch_size: int = 64
    """Validation batch size of the scoring forward passes."""
    flops_seq_len: int = 128
    """Sequence length at which the FLOPs objective is counted."""
    time_budget_s: float | None = None
    """Stop starting trials after this many seconds."""
    budgets: list[float] = field(default_factory=list)
    """Params ratios at which models are wanted (e.g. compare.budgets): the first trials are
    `budget_samples` configs per budget drawn uniformly among those with params_ratio in
    (budget - budget_band, budget], so the front has candidates there however the searcher
    moves. Empty: the searcher alone decides."""
    budget_samples: int = 8
    """With `budgets`: configs drawn per budget."""
    budget_band: float = 0.03
    """With `budgets`: width of the params-ratio band below each budget the draws come from."""
    latency: str = "predicted"
    """For latency:<hardware> objectives: "predicted" (lookup table measured once per hardware
    type, Kwon et al.) or "measured" (each sub-network timed by the profiler actor there), with
    the profile options' batch size and sequence length."""
    train_batch_size: int = 32
    """Standard NAS: batch size of each sub-network's fine-tuning."""
    lr: float = 5e-5
    """Standard NAS: learning rate."""

    @property
    def validation_seed(self) -> int:
        """The seed of the validation order actually used."""
        return self.seed if self.valid_seed is None else self.valid_seed

    def experiment_name(self) -> str:
        """The default results experiment of this search: nas-<searcher>-<scheduler>-seed<seed>."""
        return f"nas-{self.searcher}-{self.scheduler}-seed{self.seed}"

    def __post_init__(self) -> None:
        registry.check(registry.SEARCHERS, self.searcher, "searcher", SearchError)
        registry.check(registry.SCHEDULERS, self.scheduler, "scheduler", SearchError)
        if self.scheduler == "moasha" and self.searcher not in registry.EARLY_STOPPING_OK:
            raise SearchError(
                f"searcher {self.searcher!r} cannot serve the moasha scheduler (it needs "
                f"complete evaluations); use {', '.join(sorted(registry.EARLY_STOPPING_OK))} "
                f"with moasha or scheduler fifo with {self.searcher}"
            )
        if self.space is not None:
            registry.check_space(self.space, SearchError)
        if self.mode not in ("weight_sharing", "standard"):
            raise SearchError(f"mode must be weight_sharing or standard, got {self.mode!r}")
        check_objectives(self.objectives)
        if self.latency not in ("predicted", "measured"):
            raise SearchError(f"latency must be predicted or measured, got {self.latency!r}")
        _at_least(self, 1, ("num_samples", "max_t", "grace_period", "batch_size",
                            "flops_seq_len", "num_workers", "valid_examples",
                            "train_batch_size"), SearchError)
        if self.scheduler == "moasha" and self.max_t < 2:
            raise SearchError("moasha needs max_t >= 2 fidelity steps to stop anything early")
        if self.grace_period > self.max_t:
            raise SearchError(f"grace_period {self.grace_period} exceeds max_t {self.max_t}")
        if self.reduction_factor <= 1:
            raise SearchError(f"reduction_factor must be > 1, got {self.reduction_factor}")
        if any(not 0 < b <= 1 for b in self.budgets):
            raise SearchError(f"budgets are params ratios in (0, 1], got {self.budgets}")
        _at_least(self, 1, ("budget_samples",), SearchError)
        if not 0 < self.budget_band < 1:
            raise SearchError(f"budget_band must be in (0, 1), got {self.budget_band}")


REFINE_SELECTIONS = ("pareto", "budgets")
"""RefineOptions.select: which Pareto-optimal sub-networks the pipeline refines."""


@dataclass
class RefineOptions:
    """How to refine each Pareto-optimal sub-network by distillation from the teacher (logits
    and hidden states), after the search (nas_prune.refine)."""

    enabled: bool = True
    """Pipeline: refine the Pareto set (false skips the stage; exports are then unrefined)."""

    select: str = "pareto"
    """Which Pareto-optimal sub-networks the pipeline refines: "pareto" (all of them) or
    "budgets" (for each of `compare.budgets`, the `per_budget` ones with the lowest validation
    error within the budget on `compare.axis`: what the comparison can choose, at a fraction
    of the cost; on the latency axis each evaluated sub-network is timed in the refine stage
    with the `profile` settings, as the compare stage times the models it compares)."""
    per_budget: int = 1
    """With select "budgets": candidates per budget (each refined in full, or screened with
    `screen_steps`); the comparison takes the one best on validation after refine."""
    band: float | None = None
    """With select "budgets": candidates are the search's complete evaluations within
    [budget - band, budget] on `compare.axis`, in that axis's units (a params ratio, or ms on
    the latency axis; None: anything within the budget), not only Pareto-optimal ones. Far
    below the dense model their unrefined validation errors sit within noise of each other,
    while their refined ones do not (tweets, 0.55-0.58 of MiniLM:
    0.429-0.446 unrefined, 0.276-0.377 refined; benchmarks/README.md, issue 13)."""
    screen_steps: int | None = None
    """With select "budgets" and per_budget > 1: each budget's candidates are first refined
    for this many steps (the start of their own refine, checkpointed) and scored on
    validation, and only the best is refined to the end (successive halving over one rung).
    The screened-out candidates' steps are counted in the NAS cost. None: refine all."""
    screen_z: float = 1.96
    """With screen_steps: the budget's validation-best candidate of the search stays chosen
    unless another's screened validation error is lower by more than `screen_z` standard
    errors of the difference of two error rates on the validation examples (accuracy tasks;
    other metrics take the lowest). Eight-step screens move by 1-2 points between similar
    candidates (Rotten Tomatoes, 0.63 of MiniLM: a 0.0148 lead after 8 steps ended 0.0104
    behind after the whole refine), while a candidate that refines far better leads by many
    (tweets, 0.58: 0.099, z = 7.2). 0: the lowest screened error wins."""

    examples: int | None = None
    """Training examples the student processes (forward + backward), rounded up to whole
    batches; None: one pass over the training split, what one layer-dropping baseline model
    gets by default."""
    total_examples: int | None = None
    """The stage's whole training budget instead of `examples`: the examples the screens
    discard come off it first, the rest is split evenly over the models refined to the end
    (whole batches; see `split`). For a refine of the whole Pareto set within a cost, e.g.
    what the baselines get less the supernet's training."""
    batch_size: int = 32
    """Examples per optimizer step."""
    lr: float | None = None
    """Peak learning rate (AdamW, linear warm-up then linear decay). None: 2e-4 for encoders
    (tweets, 2,528 examples, sub-networks at 0.58 / 0.63 of MiniLM: validation error 0.280 /
    0.264 against 0.306 / 0.280 at 5e-5; benchmarks/README.md, issue 13), 5e-5 for decoders."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Fraction of steps with linear learning-rate warm-up."""
    temperature: float = 2.0
    """Temperature T of the logit distillation (the KL term is scaled by T^2)."""
    alpha: float = 0.5
    """Weight of the logit-distillation term; 1 - alpha weighs the task loss on the labels."""
    hidden_weight: float | None = None
    """Weight of the hidden-state MSE (student layers mapped uniformly onto teacher layers);
    0 turns it off. None: 1.0 for encoders (TinyBERT), 0 for decoders, whose unnormalised
    residual streams make the raw MSE swamp the logit term (SmolLM2 at 0.74 of the parameters,
    320 blocks: validation perplexity 78.9 with weight 1, 63.6 logits only, as Minitron
    distils)."""
    max_length: int = 128
    """Tokens per example after truncation (the caller tokenises with it)."""
    seed: int = 0
    """Seed of data order and dropout."""
    log_every: int = 10
    """Log progress every this many steps."""
    checkpoint_every: int | None = None
    """Save a resumable DeepSpeed checkpoint every this many steps (None: never; an
    interrupted refine then starts over)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0-3)."""
    precision: str = "auto"
    """"auto" (bf16 on GPU, fp32 on CPU), "fp32" or "bf16" (on a CPU: bf16 autocast around fp32
    weights, faster where the CPU has AVX512-BF16 or AMX)."""
    flops_seq_len: int = 128
    """Sequence length at which the row's FLOPs are counted (the search's default)."""

    RESUME_FREE: ClassVar[frozenset[str]] = frozenset({"log_every", "checkpoint_every",
                                                       "select", "per_budget", "band",
                                                       "screen_steps", "screen_z"})
    """Options that may change when an interrupted or finished refine is picked up again
    (they say which models are refined, not how)."""

    def __post_init__(self) -> None:
        for name in ("examples", "total_examples", "batch_size", "log_every",
                     "checkpoint_every", "flops_seq_len", "per_budget", "screen_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TrainingError(f"refine: {name} must be >= 1, got {value}")
        if self.select not in REFINE_SELECTIONS:
            raise TrainingError(f"refine: select must be one of {', '.join(REFINE_SELECTIONS)}, "
                                f"got {self.select!r}")
        if self.band is not None and self.band <= 0:
            raise TrainingError(f"refine: band must be > 0 (None: anything within the "
                                f"budget), got {self.band}")
        if self.screen_steps is not None and (self.select != "budgets" or self.per_budget < 2):
            raise TrainingError("refine: screen_steps chooses among a budget's candidates; set "
                                "select budgets and per_budget >= 2, or leave it unset")
        if (self.screen_steps is not None and self.examples is not None
                and self.screen_steps >= self.steps(self.examples)):
            raise TrainingError(f"refine: screen_steps {self.screen_steps} must be fewer than "
                                f"the refine's {self.steps(self.examples)} steps (examples / "
                                "batch_size)")
        if self.examples is not None and self.total_examples is not None:
            raise TrainingError("refine: set examples (per model) or total_examples (the whole "
                                "stage), not both")
        if self.screen_z < 0:
            raise TrainingError(f"refine: screen_z must be >= 0, got {self.screen_z}")
        if self.lr is not None and self.lr <= 0:
            raise TrainingError(f"refine: lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise TrainingError(f"refine: weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise TrainingError(f"refine: warmup_ratio must be in [0, 1), got "
                                f"{self.warmup_ratio}")
        if self.temperature <= 0:
            raise TrainingError(f"refine: temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise TrainingError(f"refine: alpha must be in [0, 1] (1: distillation only, 0: "
                                f"labels only), got {self.alpha}")
        if self.hidden_weight is not None and self.hidden_weight < 0:
            raise TrainingError(f"refine: hidden_weight must be >= 0 (0 turns the hidden-state "
                                f"loss off), got {self.hidden_weight}")
        if self.max_length < 2:
            raise TrainingError(f"refine: max_length must be >= 2 tokens, got {self.max_length}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise TrainingError(f"refine: zero_stage must be 0, 1, 2 or 3, got "
                                f"{self.zero_stage}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise TrainingError(f"refine: precision must be auto, fp32 or bf16, got "
                                f"{self.precision!r}")

    def steps(self, train_examples: int) -> int:
        """Optimizer steps of one refine: `examples` (None: one pass over the
        `train_examples` of the training split) in batches of `batch_size`, rounded up."""
        return math.ceil((self.examples or train_examples) / self.batch_size)

    def split(self, group_sizes: Sequence[int]) -> RefineOptions:
        """These options with `examples` per model from `total_examples` (unchanged when it is
        None), for a stage whose candidates come in `group_sizes`: one group per model refined
        to the end, its other members screened for `screen_steps` (none without screening)."""
        if self.total_examples is None:
            return self
        screens = self.screen_steps or 0
        discarded = screens * self.batch_size * sum(size - 1 for size in group_sizes)
        per_model = (self.total_examples - discarded) // max(len(group_sizes), 1)
        per_model -= per_model % self.batch_size
        if per_model <= screens * self.batch_size or per_model < self.batch_size:
            raise TrainingError(
                f"refine: total_examples {self.total_examples} leaves {per_model} examples for "
                f"each of {len(group_sizes)} models after {discarded} for the screens; raise "
                "it, screen fewer candidates, or refine fewer models (select budgets)")
        return dataclasses.replace(self, examples=per_model, total_examples=None)

    def fingerprint(self) -> dict[str, Any]:
        """The options that decide the refined model (all but RESUME_FREE and `enabled`)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in self.RESUME_FREE and k != "enabled"}


# ------------------------------------------------------------------------------ losses

@dataclass
class CompareOptions:
    """How methods are compared (nas_prune.compare): budgets matched on validation, every
    figure on the test split with bootstrap intervals and paired tests, cost counted."""

    enabled: bool = True
    """Pipeline: write the comparison after the search, refine and baselines."""
    budgets: list[float] = field(default_factory=lambda: [0.58, 0.63, 0.77])
    """Budgets on `axis` (params_ratio: fraction of the dense model's parameters; latency_ms:
    milliseconds)."""
    axis: str = "params_ratio"
    """params_ratio or latency_ms (measured here for every candidate with the profile options)."""
    reference: str | None = None
    """The method every other one is tested against (default: nas+refine, else nas)."""
    n_bootstrap: int = 1000
    """Bootstrap resamples of each interval."""
    n_paired: int = 10000
    """Bootstrap resamples of each paired difference."""
    level: float = 0.95
    """Confidence level of the intervals."""
    alpha: float = 0.05
    """Significance level of the paired tests."""
    seed: int = 0
    """Seed of the bootstrap."""
    batch_size: int = 64
    """Test batch size (language models: blocks per batch; their logits span the vocabulary,
    so keep it small, e.g. 8)."""
    max_test_examples: int | None = None
    """Score a seeded subset of this many test examples (blocks, for language modelling), the
    same for every model; None: the whole test split."""
    pool: list[str] | None = None
    """Run directories of one recipe run with different seeds (the same task and test
    examples, each compared already): instead of comparing this run's models, pool their
    comparisons into OUT/compare (nas_prune.compare.pool_seeds: each figure the mean over the
    runs, intervals and paired tests over test examples, each run's figure beside it)."""

    def __post_init__(self) -> None:
        _at_least(self, 1, ("max_test_examples",), OptionsError)
        if self.pool is not None and len(self.pool) < 2:
            raise OptionsError(f"compare: pool needs at least two run directories, got "
                               f"{self.pool}")
        if not self.budgets or any(b <= 0 for b in self.budgets):
            raise OptionsError(f"compare: budgets must be positive numbers, got {self.budgets}")
        if self.axis not in ("params_ratio", "latency_ms"):
            raise OptionsError(f"compare: axis must be params_ratio or latency_ms, got "
                               f"{self.axis!r}")
        if not 0 < self.level < 1 or not 0 < self.alpha < 1:
            raise OptionsError(f"compare: level and alpha must lie in (0, 1), got "
                               f"{self.level}, {self.alpha}")
        _at_least(self, 1, ("n_bootstrap", "n_paired", "batch_size"), OptionsError)


# --------------------------------------------------------------------------------- pipeline
@dataclass
class PipelineOptions:
    """Everything `nas-prune run` does, by stage; each `nas-prune <stage>` reads its sections."""

    model: str | None = None
    """Pre-trained BERT/RoBERTa or Llama-family decoder (Llama, SmolLM2, Qwen2; hub name or
    directory; "smollm2": the offline SmolLM2-135M-Instruct); default: the offline MiniLM."""
    data: TaskOptions = field(default_factory=TaskOptions)
    """The task (see `data` options)."""
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
    """Fine-tuning of the dense teacher."""
    supernet: SupernetOptions = field(default_factory=SupernetOptions)
    """Supernet training."""
    search: SearchOptions = field(default_factory=SearchOptions)
    """The multi-objective search."""
    profile: ProfileOptions = field(default_factory=ProfileOptions)
    """Latency measurement (Pareto set, latency objectives, baselines)."""
    refine: RefineOptions = field(default_factory=RefineOptions)
    """Distillation of each Pareto-optimal sub-network from the teacher."""
    compare: CompareOptions = field(default_factory=CompareOptions)
    """The comparison of NAS, NAS + refine, the baselines and the dense model on test data."""
    workers: int = 1
    """Ray Train workers for fine-tuning and supernet training (1: in this process)."""
    experiment: str | None = None
    """Results experiment of the search (default: nas-<searcher>-<scheduler>-seed<seed>)."""
    baselines: list[str] = field(default_factory=list)
    """Baseline methods to run after the search on the same teacher and data (pins, grain,
    layer_drop); none by default."""
    baseline_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Options of each baseline by method name, e.g. {pins: {sparsities: [0.5]}} (the names
    of `nas-prune baseline <method> --help`)."""

    def __post_init__(self) -> None:
        _at_least(self, 1, ("workers",), OptionsError)
        for name in [*self.baselines, *self.baseline_options]:
            registry.check(registry.BASELINES, name, "baseline", OptionsError)

    @property
    def search_experiment(self) -> str:
        """The results experiment the search writes."""
        return self.experiment or self.search.experiment_name()


PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "data": {"max_examples": 2500},
        "finetune": {"epochs": 2, "batch_size": 32, "lr": 1e-4, "max_length": 64},
        "supernet": {"strategy": "full", "epochs": 1, "batch_size": 32, "lr": 1e-4,
                     "max_length": 64},
        "search": {"searcher": "local", "num_samples": 60, "valid_examples": 500,
                   "batch_size": 100},
        "profile": {"repeats": 5, "seq_len": 64},
        "refine": {"examples": 640, "max_length": 64},
    },
    "default": {
        "finetune": {"epochs": 3, "batch_size": 32, "lr": 5e-5},
        "supernet": {"strategy": "full", "epochs": 5, "batch_size": 32, "lr": 5e-5},
        "search": {"searcher": "local", "num_samples": 500},
    },
    "quick-lm": {
        "model": "smollm2",
        "data": {"task": "convention_speeches"},
        "finetune": {"epochs": 0, "max_length": 64},
        "supernet": {"strategy": "kd", "num_random": 1, "space": "decoder_small",
                     "max_steps": 40, "batch_size": 4, "lr": 5e-5, "max_length": 64,
                     "rewire_batches": 4, "log_every": 5},
        "search": {"searcher": "local", "scheduler": "moasha", "num_samples": 40,
                   "max_t": 2, "valid_examples": 16, "batch_size": 8},
        "profile": {"seq_len": 64, "repeats": 3, "warmup": 1},
        "refine": {"enabled": False},
        "compare": {"enabled": False},
    },
}
"""Named option sets for `nas-prune run --preset`. `quick` runs end to end in well under 15
minutes on a 2-core CPU (smaller data, 1 supernet epoch, 60 trials); `default` is the
paper-like setting (whole data, 5 supernet epochs, 500 trials); `quick-lm` prunes the decoder
SmolLM2-135M for language modelling on the built-in corpus (perplexity; the pre-trained model
is the teacher; 40 supernet steps of in-place distillation over the vocabulary, 40 trials) in
under 20 minutes on 2 CPU cores."""


def replace(opts: Any, values: dict[str, Any]) -> Any:
    """`opts` (a dataclass, e.g. PipelineOptions) with nested `values` merged in (a preset, a
    YAML mapping), re-validated; unknown keys raise OptionsError naming them."""
    known = {f.name for f in dataclasses.fields(opts)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OptionsError(f"unknown option(s) {', '.join(unknown)} in "
                           f"{type(opts).__name__}; known: {', '.join(sorted(known))}")
    updates = {}
    for key, value in values.items():
        current = getattr(opts, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = replace(current, value)
        updates[key] = value
    return dataclasses.replace(opts, **updates)
