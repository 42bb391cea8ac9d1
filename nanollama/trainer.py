"""The training loop: data -> model -> AdamW, on one process or sharded with FSDP2 under torchrun.

Everything a resumed run needs is in the checkpoint: model, optimizer, grad scaler, the step, the
data stream's position and every RNG state. So a relaunch of the same command continues with
exactly the losses an uninterrupted run would have (on the same world size; on another one the
model and optimizer reshard and the data stream restarts deterministically).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nanollama import checkpoint, config, flops, parallel
from nanollama.checkpoint import step_dir
from nanollama.data import seeds
from nanollama.data.gssm import GSSM
from nanollama.data.layout import Batch, lay_out_for, rows_needed
from nanollama.data.stream import build_train_stream
from nanollama.evaluate import HeldOut, lm_loss
from nanollama.fileio import write_atomic
from nanollama.model import Transformer
from nanollama.monitor import MetricsFile, hostname, memory_record, rss_bytes
from nanollama.optim import build_optimizer, lr_at
from nanollama.run_config import TrainConfig

log = logging.getLogger("nanollama")

# Exit codes a launcher can act on (0 is a finished run, 2 a bad config).
EXIT_NONFINITE = 3  # the loss became NaN or infinite; the last good checkpoint is kept
EXIT_PREEMPTED = 75  # SIGTERM or SIGUSR1: checkpointed, relaunch to resume (EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # Ctrl-C: checkpointed


class NonFiniteLoss(RuntimeError):
    pass


class StopRequest:
    """Turns SIGINT / SIGTERM / SIGUSR1 into a flag the loop checks after each step."""

    CODES = {signal.SIGINT: EXIT_INTERRUPTED, signal.SIGTERM: EXIT_PREEMPTED, signal.SIGUSR1: EXIT_PREEMPTED}

    def __init__(self):
        self.signum: int | None = None
        self._since = 0.0
        self._previous = {}

    def __enter__(self):
        for signum in self.CODES:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        # A second Ctrl-C stops at once, without a checkpoint; one within a second is the same
        # keypress delivered twice (by the terminal and by torchrun).
        if self.signum == signal.SIGINT and signum == signal.SIGINT and time.monotonic() - self._since > 1.0:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum, self._since = signum, time.monotonic()

    @property
    def exit_code(self) -> int:
        # A rank stopped because another one was signalled counts as preempted.
        return self.CODES.get(self.signum, EXIT_PREEMPTED)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.dist = parallel.init(cfg.device, cfg.parallel.timeout_s)
        self.device = self.dist.device
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]

        _seed_everything(cfg.seed + self.dist.rank)
        self.gssm = GSSM(cfg.data.gssm, seed=cfg.data.graph_seed)
        d = cfg.data
        self.stream = build_train_stream(
            d.source,
            gssm=self.gssm,  # onfly samples it; files are checked to come from the same graph
            path=d.path,
            batch_size=d.batch_size * rows_needed(d.mask, d.seq_len, d.doc_min),  # document packing takes more
            seq_len=d.seq_len,
            seed=cfg.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            num_workers=d.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        self.model = self.build_model()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        use_scaler = cfg.precision == "fp16" and not self.dist.distributed
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.checkpointer = checkpoint.Checkpointer(
            self.run_dir / "checkpoints",
            self.dist,
            keep=cfg.checkpoint.keep,
            eval_every=cfg.checkpoint.eval_every,
            async_save=cfg.checkpoint.async_save,
        )
        self.step = 0
        self.metrics = MetricsFile(self.run_dir / "metrics.jsonl")
        check_relaunch(cfg, self.run_dir)
        self.held_out = HeldOut(cfg, self.gssm)
        name = flops.device_name(self.device)
        self.peak_flops = flops.peak_flops(name, cfg.precision)
        self.flops_per_token = self.model_shape.flops_per_token(d.seq_len)
        recompute = flops.recompute_flops_per_token(self.model_shape, d.seq_len, cfg.parallel.activation_checkpointing)
        self.hardware_flops_per_token = self.flops_per_token + recompute

    def build_model(self) -> torch.nn.Module:
        """fp32 parameters, initialised identically whatever the world size; sharded under torchrun."""
        p = self.cfg.parallel
        if not self.dist.distributed:
            model = Transformer(self.cfg.model)
            model.reset_parameters(self.cfg.seed)
            model.to(self.device)
        else:
            with torch.device("meta"):
                model = Transformer(self.cfg.model)
        self.model_shape = model  # FLOP counts only read its config and parameter counts
        parallel.activation_checkpointing(model, p.activation_checkpointing)
        if p.compile:
            parallel.compile_blocks(model)
        if self.dist.distributed:
            parallel.shard(model, self.dist.mesh, self.cfg.precision, p.reduce_dtype)
            model.to_empty(device=self.device)
            model.reset_buffers()
            parallel.init_weights(model, self.cfg.seed)
        return model

    # ------------------------------------------------------------------ data

    def train_batch(self, micro: int) -> Batch:
        """The next micro-batch, laid out for the run's mask (random lengths drawn from the step's seed)."""
        # Keyed by the global micro-batch index (as the data stream is), so 2 ranks with accumulation A
        # lay out exactly what 1 rank with 2A does.
        index = micro * self.dist.world_size + self.dist.rank
        seed = seeds.derive_seed(self.cfg.seed, seeds.LAYOUT, self.step, index)
        return lay_out_for(self.cfg.data, next(self.stream), seed)

    # ------------------------------------------------------------------ steps

    def autocast(self):
        # Under FSDP the mixed-precision policy casts parameters; autocast serves the single process.
        if self.amp_dtype is None or self.dist.distributed:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def loss_on(self, batch: Batch) -> torch.Tensor:
        with self.autocast():
            return lm_loss(self.model, batch.to(self.device))

    def train_step(self) -> dict:
        """One optimizer step over accum_steps micro-batches; returns the step's metrics."""
        cfg = self.cfg.optim
        lr = lr_at(self.step, self.cfg.steps, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for micro in range(cfg.accum_steps):
            if self.dist.distributed and self.cfg.parallel.defer_grad_sync:
                self.model.set_requires_gradient_sync(micro == cfg.accum_steps - 1)
            loss = self.loss_on(self.train_batch(micro))
            self.scaler.scale(loss / cfg.accum_steps).backward()
            total += loss.item() / cfg.accum_steps
        total = self.dist.mean(total)  # every rank sees the same loss, so all stop together on NaN
        if not math.isfinite(total):
            raise NonFiniteLoss(f"the loss became {total} at step {self.step + 1}")
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # global, over shards
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            # (with fp16 the scaler skips such a step and lowers its scale instead)
            raise NonFiniteLoss(f"the gradient norm became {grad_norm} at step {self.step + 1}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": total, "lr": lr, "grad_norm": grad_norm}

    def evaluate(self) -> dict:
        self.model.eval()
        record = self.held_out.evaluate(self.loss_on)
        self.model.train()
        return record

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        state = {
            "step": self.step,
            "data": self.stream.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }
        return self.checkpointer.save(self.step, self.model, self.optimizer, state)

    def resume(self) -> bool:
        path = checkpoint.latest(self.checkpointer.root)
        if path is None:
            return False
        state, saved_world = self.checkpointer.load(path, self.model, self.optimizer)
        self.step = state["step"]
        if saved_world == self.dist.world_size:
            self.stream.load_state_dict(state["data"])
            self.scaler.load_state_dict(state["scaler"])
            rng = state["rng"]
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"].cpu())
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
            self.info(f"resumed from {path} at step {self.step}")
        else:
            how = self.stream.restart_resharded(state["data"])
            self.info(
                f"resumed from {path} at step {self.step}, resharded from world size {saved_world} to "
                f"{self.dist.world_size}: model and optimizer resharded; {how}"
            )
        if self.dist.is_main:
            self.metrics.truncate_after(self.step)
        return True

    # ------------------------------------------------------------------ the loop

    def fit(self) -> int:
        """Train to cfg.steps (resuming if a checkpoint exists); returns the process exit code."""
        try:
            return self._fit()
        finally:
            self.checkpointer.wait()
            self.stream.close()
            self.dist.close()

    def _fit(self) -> int:
        cfg = self.cfg
        if self.dist.is_main:
            write_atomic(self.run_dir / "config.yaml", config.dump(cfg))
            _setup_logging(self.run_dir / "train.log")
        self.dist.barrier()
        self.checkpointer.clean_stale()
        world = self.dist.world_size
        self.info(
            f"host {hostname()} | pid rss {rss_bytes() / 2**20:.0f} MiB | device {self.device} | {cfg.precision} | "
            f"world size {world}{' (FSDP2)' if self.dist.distributed else ''}"
        )
        self.info(
            f"model: {self.model_shape.num_params() / 1e6:.3f}M parameters, "
            f"{self.flops_per_token / 1e6:.2f} MFLOP/token | run_dir {self.run_dir}"
        )
        self.resume()
        if self.step >= cfg.steps:
            self.info(f"already at step {self.step} >= steps={cfg.steps}: nothing to do (raise steps to go on)")
            return 0
        self.info(f"Bayes-optimal loss on the eval batches: {self.held_out.bayes_loss:.4f}")
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.optim.accum_steps * world
        self.info(f"tokens per step: {tokens_per_step} (batch_size x seq_len x accum_steps x world_size)")
        self.model.train()
        with StopRequest() as stop:
            clock, steps_timed = time.perf_counter(), 0
            while self.step < cfg.steps:
                try:
                    record = self.train_step()
                except NonFiniteLoss as e:
                    last = checkpoint.latest(self.checkpointer.root)
                    self.info(f"{e}; stopping. Last good checkpoint: {last or 'none'} (try a lower optim.lr)")
                    return EXIT_NONFINITE
                steps_timed += 1
                if self.step % cfg.log.every == 0 or self.step == cfg.steps:
                    elapsed = time.perf_counter() - clock
                    self.log_train(record, tokens_per_step * steps_timed / elapsed)
                    clock, steps_timed = time.perf_counter(), 0
                if (cfg.eval.every and self.step % cfg.eval.every == 0) or self.step == cfg.steps:
                    self.log_eval(self.evaluate())
                saved = self.step % cfg.checkpoint.every == 0 or self.step == cfg.steps
                if saved:
                    self.save()
                if self.step < cfg.steps and self.dist.any(stop.signum is not None):
                    path = step_dir(self.checkpointer.root, self.step) if saved else self.save()
                    self.checkpointer.wait()
                    why = signal.Signals(stop.signum).name if stop.signum else "another rank's signal"
                    self.info(f"stopped by {why} at step {self.step}; checkpoint {path}")
                    return stop.exit_code
        self.info(f"done: step {self.step}")
        return 0

    def info(self, message: str) -> None:
        if self.dist.is_main:
            log.info(message)

    def log_train(self, r: dict, tokens_per_s: float) -> None:
        per_device = tokens_per_s / self.dist.world_size
        achieved = per_device * self.flops_per_token
        r = {
            "step": self.step,
            **r,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": per_device,
            "tflops_per_device": achieved / 1e12,
            "mfu": achieved / self.peak_flops if self.peak_flops else None,
            "hfu": per_device * self.hardware_flops_per_token / self.peak_flops if self.peak_flops else None,
            "host": hostname(),
            **memory_record(self.device, self.dist.local_rank),
        }
        if not self.dist.is_main:
            return
        self.metrics.write(r)
        mfu = f" | mfu {r['mfu']:.1%}" if r["mfu"] is not None else ""
        log.info(
            f"step {r['step']:>6}/{self.cfg.steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
            f"grad_norm {r['grad_norm']:.3f} | tok/s {r['tokens_per_s']:,.0f}{mfu}"
        )

    def log_eval(self, r: dict) -> None:
        if not self.dist.is_main:
            return
        self.metrics.write({"step": self.step, **r, "host": hostname()})
        log.info(
            f"eval {self.step:>6}/{self.cfg.steps} | eval_loss {r['eval_loss']:.4f} | "
            f"bayes_loss {r['bayes_loss']:.4f} | excess_loss {r['excess_loss']:.4f}"
        )


def check_relaunch(cfg: TrainConfig, run_dir: Path) -> None:
    """Create run_dir, or check that a relaunch in it continues the same run.

    A relaunch may change steps, the optimizer, logging, evaluation, checkpointing and parallelism,
    but not the model, the data or the seed: the checkpoint would not fit (and the saved config,
    which generation and evaluation read, would no longer describe it).
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise config.ConfigError("run_dir", f"cannot create {run_dir}: {e.strerror}") from None
    saved_path = run_dir / "config.yaml"
    if checkpoint.latest(run_dir / "checkpoints") is None or not saved_path.is_file():
        return
    saved = config.to_dict(config.load(TrainConfig, saved_path))
    new = config.to_dict(cfg)
    for section in ("model", "data"):
        for key in sorted(set(saved[section]) | set(new[section])):
            if key != "num_workers" and saved[section].get(key) != new[section].get(key):
                raise config.ConfigError(
                    f"{section}.{key}",
                    f"is {new[section].get(key)!r} but the run in {run_dir} was trained with "
                    f"{saved[section].get(key)!r}; use a new run_dir to change it",
                )
    if saved["seed"] != new["seed"]:
        raise config.ConfigError("seed", f"is {new['seed']} but the run in {run_dir} used {saved['seed']}")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _setup_logging(path: Path) -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(path)):
        handler.setFormatter(fmt)
        log.addHandler(handler)
