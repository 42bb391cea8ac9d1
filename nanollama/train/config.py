"""The training run's config: one dataclass per component, composed into TrainConfig.

Loaded by `nanollama.config.load(TrainConfig, yaml_path, overrides)`; saved to run_dir/config.yaml.
The `model` section's class is chosen by `model.arch` (nanollama.models), the `data` section's by
`data.source` (nanollama.data): each model and each data source owns its section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from nanollama import data, models
from nanollama.config import ConfigError, check, variant
from nanollama.observe.profile_config import ProfileConfig


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate (AdamW), reached after `warmup` steps
    weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices only)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW moment decay rates
    eps: float = 1e-8  # AdamW denominator epsilon
    warmup: int = 100  # steps of linear warm-up from 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warm-up, down to lr * min_lr_ratio
    min_lr_ratio: float = 0.1  # the decayed schedules end at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping (the norm is still logged)
    accum_steps: int = 1  # micro-batches per optimizer step (gradient accumulation)

    def __post_init__(self):
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(all(0 <= b < 1 for b in self.betas), "betas", f"each must be in [0, 1), got {self.betas}")
        check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        check(self.warmup >= 0, "warmup", f"must be >= 0, got {self.warmup}")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 disables), got {self.grad_clip}")
        check(self.accum_steps >= 1, "accum_steps", f"must be >= 1, got {self.accum_steps}")


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (one is always written at the end)
    keep: int = 2  # the last `keep` checkpoints survive (besides those pending evaluation)
    eval_every: int = 0  # every N-th checkpoint (step N*every, 2N*every, ...) is kept until nanollama.evaluate reads it
    async_save: bool = False  # write in the background; committed before the next save

    def __post_init__(self):
        check(self.every >= 1, "every", f"must be >= 1, got {self.every}")
        check(self.keep >= 1, "keep", f"must be >= 1, got {self.keep}")
        check(self.eval_every >= 0, "eval_every", f"must be >= 0 (0: none), got {self.eval_every}")


@dataclass
class ParallelConfig:
    """How the model runs under torchrun (FSDP2) and what trades memory for compute."""

    activation_checkpointing: Literal["none", "full", "selective"] = "none"  # recompute block activations in backward
    compile: bool = False  # torch.compile each block
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"  # gradient reduction dtype under bf16 FSDP
    defer_grad_sync: bool = True  # with accumulation, reduce gradients on the last micro-step only (more memory)
    timeout_s: float = 300.0  # collectives fail after this long, e.g. when another rank died
    tp: int = 1  # tensor-parallel degree under torchrun: a ("dp", "tp") mesh, world = dp x tp (docs/parallel.md)
    sequence_parallel: bool = False  # with tp > 1: norms (and the residual stream) sharded over the sequence

    def __post_init__(self):
        check(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")
        check(self.tp >= 1, "tp", f"must be >= 1, got {self.tp}")


TRACKERS = ("jsonl", "wandb", "tensorboard")


@dataclass
class WandbConfig:
    """log.trackers=[wandb]: Weights & Biases (offline by default: `wandb sync` later; training never waits on it)."""

    mode: Literal["offline", "online", "disabled"] = "offline"  # offline: RUN_DIR/wandb/ for a later `wandb sync`
    project: str = "nanollama"  # the wandb project
    entity: str | None = None  # null: the account's default entity
    name: str | None = None  # null: the run directory's name (in a sweep: the task's)
    group: str | None = None  # null: the launcher's sweep name when the run directory is a sweep task's
    tags: list[str] = field(default_factory=list)  # wandb tags, e.g. [baseline, lr_sweep]
    resume: Literal["rewind", "fork"] = "rewind"  # resumed before the last logged step: rewind this run or fork one
    init_timeout_s: float = 30.0  # past it (online mode) training goes on without wandb
    finish_timeout_s: float = 60.0  # at the end, stop waiting for the upload (the rest stays for wandb sync); 0: wait

    def __post_init__(self):
        check(bool(self.project), "project", "must not be empty")
        check(self.init_timeout_s > 0, "init_timeout_s", f"must be > 0, got {self.init_timeout_s}")
        check(self.finish_timeout_s >= 0, "finish_timeout_s", f"must be >= 0 (0: wait), got {self.finish_timeout_s}")


@dataclass
class LogConfig:
    every: int = 10  # steps between log lines (and metrics.jsonl records)
    trackers: list[str] = field(default_factory=lambda: ["jsonl"])  # jsonl (always on), wandb, tensorboard
    wandb: WandbConfig = field(default_factory=WandbConfig)  # used when "wandb" is in trackers

    def __post_init__(self):
        check(self.every >= 1, "every", f"must be >= 1, got {self.every}")
        for i, name in enumerate(self.trackers):
            check(name in TRACKERS, f"trackers.{i}", f"must be one of {', '.join(TRACKERS)}; got {name!r}")


@dataclass
class EvalConfig:
    every: int = 100  # steps between evaluations (0: only at the end)
    batches: int = 4  # held-out batches per evaluation, the same ones every time

    def __post_init__(self):
        check(self.every >= 0, "every", f"must be >= 0, got {self.every}")
        check(self.batches >= 1, "batches", f"must be >= 1, got {self.batches}")


@dataclass
class ProbeConfig:
    """Probing at checkpoints (`python -m nanollama.probe`, run on the checkpoint just written)."""

    every: int = 0  # probe the checkpoint of every N-th step (a multiple of checkpoint.every); 0: never
    sequences: int = 512  # sequences sampled for the probes (split by sequence into fit, validation, scored)
    layers: str | None = None  # as probe's --layers, e.g. "embed,0,1,final_norm"; null: all
    controls: bool = True  # also the random-init model and the shuffled-label control (slower)

    def __post_init__(self):
        check(self.every >= 0, "every", f"must be >= 0 (0: never), got {self.every}")
        check(self.sequences >= 8, "sequences", f"must be >= 8 for a split by sequence, got {self.sequences}")


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"  # checkpoints, metrics, logs; relaunching with the same run_dir resumes
    seed: int = 0  # model init, data order and layouts (the graph has its own: data.graph_seed)
    steps: int = 1000  # optimizer steps in all (raise it at a relaunch to train on)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # compute dtype; parameters stay fp32
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    threads: int | None = None  # torch CPU threads per process; null: OMP_NUM_THREADS, else cores / local ranks
    model: Any = variant(models.default_config, "arch", models.config_class)  # chosen by model.arch
    data: Any = variant(data.default_config, "source", data.config_class)  # chosen by data.source
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW and the learning-rate schedule
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # saving, keeping, marking for eval
    log: LogConfig = field(default_factory=LogConfig)  # log lines
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out evaluation during training
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # FSDP2, activation checkpointing, compile
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # probing the hidden state at checkpoints
    profile: ProfileConfig = field(default_factory=ProfileConfig)  # light per-step profiler, torch.profiler traces

    def __post_init__(self):
        check(self.steps >= 0, "steps", f"must be >= 0, got {self.steps}")
        # torch.manual_seed takes a 64-bit signed integer; the numpy and layout seeds derive from it
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        check(self.seed < 2**63, "seed", f"must be < 2**63 (a 64-bit seed), got {self.seed}")
        check(self.threads is None or self.threads >= 1, "threads", f"must be >= 1 (or null), got {self.threads}")
        check(bool(self.run_dir), "run_dir", "must not be empty")
        check(
            not self.probe.every or self.probe.every % self.checkpoint.every == 0,
            "probe.every",
            f"must be a multiple of checkpoint.every={self.checkpoint.every} (it probes checkpoints), "
            f"got {self.probe.every}",
        )
        models.check_tensor_parallel(self.model, self.parallel.tp)  # heads divisible by tp, an arch with a plan
        if self.parallel.tp > 1 and self.parallel.sequence_parallel and self.data.seq_len % self.parallel.tp:
            raise ConfigError(  # the residual stream is split evenly over the sequence
                "data.seq_len",
                f"{self.data.seq_len} must be divisible by parallel.tp={self.parallel.tp} "
                "with parallel.sequence_parallel=true",
            )
        if self.data.vocab_size is not None:  # known from the config alone; else once the source is built
            set_vocab_size(self, self.data.token_vocab_size)
        check_data = getattr(self.model, "check_data", None)  # a model refusing a layout it cannot honour
        if check_data is not None:
            check_data(self.data)
        max_len = getattr(self.model, "max_seq_len", None)  # a recurrent model has no context limit
        if max_len is not None and self.data.seq_len > max_len:
            raise ConfigError("data.seq_len", f"{self.data.seq_len} exceeds model.max_seq_len={max_len}")


def set_vocab_size(cfg: TrainConfig, token_vocab_size: int) -> None:
    """Take model.vocab_size from the data (its tokens, plus the end token for documents), or check it agrees."""
    vocab = token_vocab_size + (cfg.data.mask == "document")
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = vocab
    elif cfg.model.vocab_size != vocab:
        end = " + 1 end token (data.mask=document)" if cfg.data.mask == "document" else ""
        raise ConfigError(
            "model.vocab_size",
            f"is {cfg.model.vocab_size} but data.source={cfg.data.source} has {token_vocab_size} tokens{end}; "
            "leave model.vocab_size unset to take it from the data",
        )
