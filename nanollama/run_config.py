"""The training run's config: one dataclass per component, composed into TrainConfig.

Loaded by `nanollama.config.load(TrainConfig, yaml_path, overrides)`; saved to run_dir/config.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from nanollama.config import ConfigError, check
from nanollama.data.gssm import GSSMConfig
from nanollama.model import TransformerConfig


@dataclass
class DataConfig:
    source: Literal["onfly", "files"] = "onfly"
    path: str | None = None  # source=files: a directory written by `python -m nanollama.data.gssm`
    num_workers: int = 0  # DataLoader workers for the training stream (0: load in the training process)
    batch_size: int = 32  # sequences per micro-step
    seq_len: int = 64  # tokens the model reads per sequence (seq_len + 1 are sampled for the targets)
    graph_seed: int = 0  # draws the GSSM's kernels: one graph shared by runs that differ in `seed`
    gssm: GSSMConfig = field(default_factory=GSSMConfig)
    mask: Literal["causal", "prefix_lm", "document"] = "causal"  # see nanollama/data/layout.py
    prefix_max: float = 0.5  # prefix_lm: prompt lengths are uniform in [1, prefix_max * seq_len]
    doc_min: int = 8  # document: packed documents have at least doc_min tokens (then an end token)

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary: the GSSM's tokens, plus the end token when documents are packed."""
        return self.gssm.vocab_size + (self.mask == "document")

    def __post_init__(self):
        check(0 < self.prefix_max <= 1, "prefix_max", f"must be in (0, 1], got {self.prefix_max}")
        check(self.doc_min >= 1, "doc_min", f"must be >= 1, got {self.doc_min}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.graph_seed >= 0, "graph_seed", f"must be >= 0, got {self.graph_seed}")
        check(self.seq_len >= 1, "seq_len", f"must be >= 1, got {self.seq_len}")
        check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        check(
            self.source != "files" or bool(self.path),
            "path",
            "data.source=files needs data.path, a directory written by python -m nanollama.data.gssm",
        )


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup: int = 100  # steps of linear warm-up from 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # the decayed schedules end at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping (the norm is still logged)
    accum_steps: int = 1

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
    eval_every: int = 0  # checkpoints at multiples of this are kept until `python -m nanollama.evaluate` reads them
    async_save: bool = False  # write in the background; committed before the next save

    def __post_init__(self):
        check(self.every >= 1, "every", f"must be >= 1, got {self.every}")
        check(self.keep >= 1, "keep", f"must be >= 1, got {self.keep}")
        check(self.eval_every >= 0, "eval_every", f"must be >= 0 (0: none), got {self.eval_every}")


@dataclass
class ParallelConfig:
    """How the model runs under torchrun (FSDP2) and what trades memory for compute."""

    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    compile: bool = False  # torch.compile each block
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"  # gradient reduction dtype under bf16 FSDP
    defer_grad_sync: bool = True  # with accumulation, reduce gradients on the last micro-step only (more memory)
    timeout_s: float = 300.0  # collectives fail after this long, e.g. when another rank died

    def __post_init__(self):
        check(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")


@dataclass
class LogConfig:
    every: int = 10

    def __post_init__(self):
        check(self.every >= 1, "every", f"must be >= 1, got {self.every}")


@dataclass
class EvalConfig:
    every: int = 100  # steps between evaluations (0: only at the end)
    batches: int = 4  # held-out batches per evaluation, the same ones every time

    def __post_init__(self):
        check(self.every >= 0, "every", f"must be >= 0, got {self.every}")
        check(self.batches >= 1, "batches", f"must be >= 1, got {self.batches}")


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    steps: int = 1000
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: TransformerConfig = field(default_factory=TransformerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        check(self.steps >= 0, "steps", f"must be >= 0, got {self.steps}")
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        check(bool(self.run_dir), "run_dir", "must not be empty")
        vocab = self.data.vocab_size
        if self.model.vocab_size is None:
            self.model.vocab_size = vocab
        elif self.model.vocab_size != vocab:
            end = " + 1 end token (data.mask=document)" if self.data.mask == "document" else ""
            raise ConfigError(
                "model.vocab_size",
                f"is {self.model.vocab_size} but data.gssm's observed node has state_dim "
                f"{self.data.gssm.vocab_size}{end}; leave model.vocab_size unset to take it from the data",
            )
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError("data.seq_len", f"{self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
