"""The training loop: data -> model -> AdamW, on one process or sharded with FSDP2 under torchrun.

Everything a resumed run needs is in the checkpoint: model, optimizer, grad scaler, the step, the
data stream's position and every RNG state. So a relaunch of the same command continues with
exactly the losses an uninterrupted run would have (on the same world size; on another one the
model and optimizer reshard and the data stream restarts deterministically).

The loop names no model and no data source: `model.arch` and `data.source` pick them from their
registries (nanollama.models, nanollama.data).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from pathlib import Path

import torch

from nanollama import config, data, distributed, models
from nanollama.data import seeds
from nanollama.data.batch import Batch, rows_needed
from nanollama.data.heldout import HeldOut
from nanollama.distributed import tensor_parallel
from nanollama.observe import flops, trackers
from nanollama.observe.metrics import MetricsFile
from nanollama.observe.profile import Profiler
from nanollama.observe.system import hostname, memory_record, rss_bytes
from nanollama.train import checkpoint, rng
from nanollama.train.checkpoint import step_dir
from nanollama.train.config import TrainConfig, set_vocab_size
from nanollama.train.lock import RunLock
from nanollama.train.logs import format_eval, format_train, log, setup_logging, warmup_warning
from nanollama.train.loss import lm_loss
from nanollama.train.optim import build_optimizer, lr_at
from nanollama.train.probe_hook import run_probe
from nanollama.train.progress import Progress
from nanollama.train.relaunch import check_relaunch, save_config
from nanollama.train.resources import check_memory, set_threads
from nanollama.train.signals import StopRequest
from nanollama.utils import exit_codes
from nanollama.utils.devices import gpu_name


class NonFiniteLoss(RuntimeError):
    pass


class StoppedAtStartup(Exception):
    """A stop signal arrived before the first step: nothing new to save, exit with `code`."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class Trainer:
    def __init__(self, cfg: TrainConfig, stop: StopRequest | None = None):
        self.stop = StopRequest() if stop is None else stop
        self.lock, self.dist, self._notes = RunLock(cfg.run_dir), None, []
        try:
            self._init(cfg)
        except BaseException:  # a bad config, a held lock, a stop signal: leave nothing behind
            if hasattr(self, "stream"):
                self.stream.close()
            self.lock.release()
            if self.dist is not None:
                self.dist.close()
            raise

    def _init(self, cfg: TrainConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.threads_line = set_threads(cfg.threads)  # before any torch work spawns its thread pool
        self.progress: Progress | None = None
        self._params_logged = False  # params / params_no_embed go into the first metrics record
        self.dist = distributed.init(cfg.device, cfg.parallel.timeout_s, cfg.parallel.tp)
        self._take_run_dir()
        self.device = self.dist.device
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]

        rng.seed_everything(cfg.seed + self.dist.rank)
        d = cfg.data
        self.source = data.build(d)  # the same source (e.g. the same graph) on every rank
        set_vocab_size(cfg, self.source.token_vocab_size)
        check_relaunch(cfg, self.run_dir)  # a relaunch that changes the model or data: refused before building
        self.stream = self.source.train_stream(
            d.batch_size * rows_needed(d.mask, d.seq_len, d.doc_min),  # document packing takes more rows
            seed=cfg.seed,
            rank=self.dist.dp_rank,  # the ranks of one tensor-parallel group read the same data
            world_size=self.dist.dp_size,
            pin_memory=self.device.type == "cuda",
        )
        self.spec = models.get(cfg.model.arch)
        sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if self.device.type == "cpu" else 1
        check_memory(self.spec, cfg.model, self.device, self.dist.world_size, sharing)  # before allocating
        self.model = self.build_model()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        use_scaler = cfg.precision == "fp16" and not self.dist.distributed
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.checkpointer = checkpoint.Checkpointer(
            self.run_dir / "checkpoints",
            self.dist,
            keep=cfg.checkpoint.keep,
            # eval_every counts checkpoints (README): the N-th scheduled one is at step N * checkpoint.every
            eval_every=cfg.checkpoint.eval_every * cfg.checkpoint.every,
            async_save=cfg.checkpoint.async_save,
        )
        self.step = 0
        self.metrics = MetricsFile(self.run_dir / "metrics.jsonl")
        self.held_out = HeldOut(self.source, cfg.eval.batches)
        self.peak_flops = flops.peak_flops(gpu_name(self.device), cfg.precision)
        self.flops_per_token, self.hardware_flops_per_token = flops.per_token(
            self.model_shape, d.seq_len, cfg.parallel.activation_checkpointing
        )
        fl = (self.flops_per_token, self.hardware_flops_per_token, self.peak_flops)
        metrics = self.metrics if self.dist.is_main else None
        self.profiler = Profiler(cfg.profile, self.run_dir, self.dist.rank, self.device, cfg.log.every, fl, metrics)
        self.check_stop("building the model and data")

    def _take_run_dir(self) -> None:
        """Lock the run directory (rank 0; every rank learns the outcome) and clean leftovers, first thing."""
        busy = None
        if self.dist.is_main:
            try:
                self.lock.acquire()
            except config.ConfigError as e:
                busy = (e.field, e.reason)
        busy = self.dist.broadcast(busy)
        if busy is not None:
            raise config.ConfigError(*busy)
        if self.lock.took_over:
            self._notes.append(f"took over the lock of {self.run_dir} from a dead trainer ({self.lock.took_over})")
        self.check_stop("starting")
        # Before anything is written (config.yaml): on a full disk the leftovers are what frees space.
        if self.dist.is_main:
            checkpoint.clean_leftovers(self.run_dir / "checkpoints", self._notes.append)
        self.dist.barrier()

    def _flush_notes(self) -> None:
        """Start-up notes (lock takeover, leftovers removed, a stop), to the log once it exists, else stdout."""
        for note in self._notes:
            if getattr(self, "_logging", False):
                self.info(note)
            elif self.dist.is_main:
                print(note, flush=True)
        self._notes = []

    def check_stop(self, phase: str) -> None:
        """Between start-up phases: a stop signal (on any rank) ends the run now, without a checkpoint."""
        if self.dist.any(self.stop.requested):
            why = signal.Signals(self.stop.signum).name if self.stop.signum else "another rank's signal"
            self._notes.append(f"stopped by {why} while {phase}, before the first step: nothing new to save")
            self._flush_notes()
            raise StoppedAtStartup(self.stop.exit_code)

    def build_model(self) -> torch.nn.Module:
        """fp32 parameters, initialised identically whatever the world size; sharded under torchrun."""
        p = self.cfg.parallel
        if not self.dist.distributed:
            model = self.spec.build(self.cfg.model)
            models.reset_parameters(model, self.cfg.seed)
            model.to(self.device)
        else:
            with torch.device("meta"):
                model = self.spec.build(self.cfg.model)
        self.model_shape = model  # FLOP counts only read its config and parameter counts
        self.params = (self.spec.num_params(model, True), self.spec.num_params(model, False))  # (all, no embeddings)
        distributed.activation_checkpointing(model, p.activation_checkpointing)
        if p.compile:
            distributed.compile_blocks(model)
        if self.dist.distributed:
            distributed.shard(model, self.dist.mesh, self.cfg.precision, p.reduce_dtype, p.sequence_parallel)
            model.to_empty(device=self.device)
            self.spec.reset_buffers(model)
            distributed.init_weights(model, self.cfg.seed)
        return model

    # ------------------------------------------------------------------ data

    def train_batch(self, micro: int) -> Batch:
        """The next micro-batch, laid out for the run's mask (random lengths drawn from the step's seed)."""
        # Keyed by the global micro-batch index (as the data stream is), so 2 ranks with accumulation A
        # lay out exactly what 1 rank with 2A does.
        index = micro * self.dist.dp_size + self.dist.dp_rank
        seed = seeds.derive_seed(self.cfg.seed, seeds.LAYOUT, self.step, index)
        return self.source.lay_out(next(self.stream), seed)

    # ------------------------------------------------------------------ steps

    def autocast(self):
        # Under FSDP the mixed-precision policy casts parameters; autocast serves the single process.
        if self.amp_dtype is None or self.dist.distributed:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def loss_on(self, batch: Batch) -> torch.Tensor:
        with self.autocast(), tensor_parallel.loss_context(self.dist.tp > 1):
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
            self.profiler.mark("data")
            batch = self.train_batch(micro)
            self.profiler.mark("fwd_bwd")
            loss = self.loss_on(batch)
            with tensor_parallel.loss_context(self.dist.tp > 1):  # the loss-parallel backward too
                self.scaler.scale(loss / cfg.accum_steps).backward()
            total += loss.item() / cfg.accum_steps
        self.profiler.mark("optim")
        total = self.dist.mean(total)  # every rank sees the same loss, so all stop together on NaN
        if not math.isfinite(total):
            raise NonFiniteLoss(f"the loss became {total} at step {self.step + 1}")
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        if self.dist.tp > 1:  # parameters on two meshes ("dp", "tp") and ("dp",)
            grad_norm = tensor_parallel.clip_grad_norm(self.model.parameters(), max_norm)
        else:
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
            "config": config.dump(self.cfg),  # config.yaml can be restored from the checkpoint it describes
            "data": self.stream.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng.capture(),
        }
        return self.checkpointer.save(self.step, self.model, self.optimizer, state)

    def resume(self) -> bool:
        path = self.checkpointer.choose(self.info)  # the newest intact one (damaged ones are set aside)
        if path is None:
            return False
        state, saved_world = self.checkpointer.load(path, self.model, self.optimizer)
        self.step = state["step"]
        if saved_world == self.dist.dp_size:  # (data-parallel size: tp alone may differ)
            self.stream.load_state_dict(state["data"])
            self.scaler.load_state_dict(state["scaler"])
            rng.restore(state["rng"])
            self.info(f"resumed from {path} at step {self.step}")
        else:
            how = self.stream.restart_resharded(state["data"])
            self.info(
                f"resumed from {path} at step {self.step}, resharded from world size {saved_world} to "
                f"{self.dist.dp_size}{' data-parallel ranks' if self.dist.tp > 1 else ''}: "
                f"model and optimizer resharded; {how}"
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
            try:
                self.checkpointer.wait()
            finally:
                self.profiler.close()
                if getattr(self, "trackers", None) is not None:
                    self.trackers.close()
                self.stream.close()
                self.dist.close()
                self.lock.release()

    def _fit(self) -> int:
        cfg = self.cfg
        changed = []
        if self.dist.is_main:
            try:
                changed = save_config(cfg, self.run_dir)  # config.yaml, and configs/config.<n>.yaml per change
            except OSError as e:
                where = self.run_dir / "config.yaml"
                raise config.ConfigError("run_dir", f"cannot write {where}: {e.strerror}") from None
            setup_logging(self.run_dir / "train.log")
        self.dist.barrier()
        self._logging = True
        self._flush_notes()
        for line in changed:
            self.info(line)
        self.info(self.threads_line)
        world = self.dist.world_size
        self.info(
            f"host {hostname()} | pid rss {rss_bytes() / 2**20:.0f} MiB | device {self.device} | {cfg.precision} | "
            f"world size {world}{' (FSDP2)' if self.dist.distributed else ''}"
            + (f" | mesh dp={self.dist.dp_size} x tp={self.dist.tp}" if self.dist.tp > 1 else "")
        )
        self.info(
            f"model: {cfg.model.arch}, {self.params[0] / 1e6:.3f}M parameters "
            f"({self.params[1] / 1e6:.3f}M without embeddings), "
            f"{self.flops_per_token / 1e6:.2f} MFLOP/token | run_dir {self.run_dir}"
        )
        with self.stop:  # a signal while loading the checkpoint must not kill the process
            self.resume()
        self.check_stop("loading the checkpoint")
        if self.step >= cfg.steps:
            self.info(f"already at step {self.step} >= steps={cfg.steps}: nothing to do (raise steps to go on)")
            return 0
        if self.dist.is_main:  # log.trackers: every record of metrics.jsonl also goes to wandb / TensorBoard
            self.trackers = trackers.build(cfg.log, self.run_dir, config.to_dict(cfg), self.step, self.info)
            self.metrics.sinks.append(self.trackers)
        if self.held_out.bayes_loss is not None:
            self.info(f"Bayes-optimal loss on the eval batches: {self.held_out.bayes_loss:.4f}")
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.optim.accum_steps * self.dist.dp_size
        dp = "world_size" if self.dist.tp == 1 else "dp"
        self.info(f"tokens per step: {tokens_per_step} (batch_size x seq_len x accum_steps x {dp})")
        self.profiler.start(self.step, tokens_per_step, world, self.info)
        if cfg.optim.warmup >= cfg.steps:
            self.info(warmup_warning(cfg.optim, cfg.steps))
        self.model.train()
        self.progress = Progress(self.step, cfg.steps, live=None if self.dist.is_main else False)
        for handler in log.handlers:  # any log line (other modules' too) first erases the live line
            handler.addFilter(lambda record: self.progress.clear() or True)
        with self.stop as stop:
            clock, steps_timed = time.perf_counter(), 0
            while self.step < cfg.steps:
                step_clock = time.perf_counter()
                self.profiler.begin(self.step + 1)
                try:
                    record = self.train_step()
                except NonFiniteLoss as e:
                    last = checkpoint.latest(self.checkpointer.root)
                    self.info(f"{e}; stopping. Last good checkpoint: {last or 'none'} (try a lower optim.lr)")
                    return exit_codes.NONFINITE
                steps_timed += 1
                self.profiler.mark("monitor")
                self.progress.update(self.step, tokens_per_step / max(time.perf_counter() - step_clock, 1e-9))
                if self.step % cfg.log.every == 0 or self.step == cfg.steps:
                    elapsed = time.perf_counter() - clock
                    self.log_train(record, tokens_per_step * steps_timed / elapsed)
                    clock, steps_timed = time.perf_counter(), 0
                if (cfg.eval.every and self.step % cfg.eval.every == 0) or self.step == cfg.steps:
                    self.log_eval(self.evaluate())
                saved = self.step % cfg.checkpoint.every == 0 or self.step == cfg.steps
                if saved:
                    self.save()
                    if cfg.probe.every and self.step % cfg.probe.every == 0:
                        self.probe()
                self.profiler.end()
                if self.step < cfg.steps and self.dist.any(stop.signum is not None):
                    path = step_dir(self.checkpointer.root, self.step) if saved else self.save()
                    self.checkpointer.wait()
                    why = signal.Signals(stop.signum).name if stop.signum else "another rank's signal"
                    self.info(f"stopped by {why} at step {self.step}; checkpoint {path}")
                    return stop.exit_code
        self.info(f"done: step {self.step}")
        return 0

    def probe(self) -> None:
        """probe.every: probe the checkpoint just written (rank 0; the others wait within parallel.timeout_s)."""
        self.checkpointer.wait()  # an async save is committed before another process reads it
        if self.dist.is_main:
            timeout = 0.8 * self.cfg.parallel.timeout_s if self.dist.distributed else None
            problem = run_probe(self.run_dir, self.step, self.cfg.probe, timeout)
            if problem is not None:
                self.info(f"probe at step {self.step} {problem}; training goes on")
        self.dist.barrier()

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
        epochs_seen = getattr(self.stream, "epochs_seen", None)  # a stream with epochs (a data budget, files)
        epoch = epochs_seen() if epochs_seen is not None else None
        if epoch is not None:
            r["epoch"] = epoch
        if not self._params_logged:  # once per process: the record a scaling fit reads N from
            r["params"], r["params_no_embed"] = self.params
            self._params_logged = True
        if not self.dist.is_main:
            return
        r["eta_s"] = self.progress.eta() if self.progress is not None else None
        self.metrics.write(r)
        log.info(format_train(r, self.cfg.steps))

    def log_eval(self, r: dict) -> None:
        if not self.dist.is_main:
            return
        self.metrics.write({"step": self.step, **r, "host": hostname()})
        log.info(f"eval {self.step:>6}/{self.cfg.steps} | " + format_eval(r))
