"""Probing a model, and a run directory's checkpoints, for the GSSM hidden state.

`probe_model` scores every requested layer of one model; `probe_run` does it for a run's checkpoints
(plus the control of the run's own initial weights, once) and appends one record per checkpoint x
layer x target to RUN_DIR/probes.jsonl. It works on an unsharded model on one device (a checkpoint
is loaded whole by nanollama.train.checkpoint.load_model, whatever world size wrote it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from nanollama import data, models
from nanollama.data import seeds
from nanollama.observe.metrics import MetricsFile
from nanollama.probe.activations import collect, resolve_layers
from nanollama.probe.scores import ceilings, score_layer
from nanollama.probe.targets import ProbeError, Targets, probe_targets
from nanollama.runs import load_config, resolve_device
from nanollama.train import checkpoint

log = logging.getLogger(__name__)

# Copied from the random-initialised model's records into each trained one, with this prefix.
RANDOM_INIT_KEYS = ("acc", "acc_frac", "ce", "belief_r2", "belief_kl")


def probe_model(
    model: nn.Module,
    targets: Targets,
    vocab_size: int,
    layers: Iterable[int | str] | None = None,
    sites: Sequence[str] = ("resid",),
    controls: bool = True,
    batch_size: int = 64,
) -> dict[str, dict[str, dict]]:
    """layer key -> target name -> record (see nanollama.probe.scores), on the model's device."""
    ceiling = ceilings(targets)
    acts = collect(model, targets.tokens, layers, sites, batch_size)
    return {key: score_layer(x, targets, ceiling, vocab_size, controls) for key, x in acts.items()}


def select_steps(run_dir: Path, which: str) -> list[int]:
    """--checkpoint: 'latest', 'all' or a step number, among the run's complete checkpoints."""
    steps = checkpoint.complete_steps(run_dir / "checkpoints")
    if not steps:
        raise ProbeError(f"no complete checkpoint under {run_dir / 'checkpoints'}")
    if which == "latest":
        return steps[-1:]
    if which == "all":
        return steps
    if not which.isdigit() or int(which) not in steps:
        raise ProbeError(f"--checkpoint {which!r}: choose latest, all or one of the steps {steps}")
    return [int(which)]


def probe_run(
    run_dir: str | Path,
    which: str = "latest",
    layers: Iterable[int | str] | None = None,
    sites: Sequence[str] = ("resid",),
    sequences: int = 512,
    device: str | torch.device | None = None,
    out: str | Path | None = None,
    controls: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Probe the run's checkpoints `which`; returns the records, also appended to `out` (RUN_DIR/probes.jsonl)."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    source = data.build(cfg.data)
    g = getattr(source, "gssm", None)
    if g is None:
        raise ProbeError(f"the run's data (data.source={cfg.data.source}) is not GSSM data: no hidden state to probe")
    if not g.hidden:
        raise ProbeError("the run's GSSM graph has no hidden node: there is no hidden state to probe")
    steps = select_steps(run_dir, which)
    device = resolve_device(device)
    model = models.build(cfg.model)
    try:
        keys = resolve_layers(model, layers, sites)
    except ValueError as e:
        raise ProbeError(str(e)) from None
    seed = seeds.derive_seed(cfg.data.graph_seed, seeds.PROBE, 0)
    targets = probe_targets(g, sequences, cfg.data.seq_len, seed, device)
    model = model.to(device).eval()
    base = {"sequences": sequences, "seq_len": cfg.data.seq_len, "seed": seed, "arch": cfg.model.arch}
    random_init = {}
    if controls:  # the run's own initial weights: what the architecture alone makes decodable
        models.reset_parameters(model, cfg.seed)
        random_init = probe_model(model, targets, g.vocab_size, keys, sites, controls=False)
    sink = MetricsFile(Path(out) if out is not None else run_dir / "probes.jsonl")
    records = []
    for step in steps:
        path = checkpoint.step_dir(run_dir / "checkpoints", step)
        checkpoint.load_model(path, model)
        model.to(device).eval()
        scores = probe_model(model, targets, g.vocab_size, keys, sites, controls)
        for key, per_target in scores.items():
            for name, rec in per_target.items():
                if controls:
                    rec.update({f"random_init_{k}": random_init[key][name][k] for k in RANDOM_INIT_KEYS})
                record = {"step": step, "layer": key, "node": name, **base, **rec}
                sink.write(record)
                records.append(record)
        if on_step is not None:
            on_step(step, scores)
    return records


def format_table(step: int, scores: dict[str, dict[str, dict]]) -> str:
    """One step's scores: a row per (target, layer), the targets' rows grouped in stream order."""
    cols = ["acc", "ceiling_acc", "acc_frac", "ce", "ceiling_ce", "belief_r2", "belief_kl"]
    cols += ["control_acc", "selectivity", "random_init_acc", "chance_acc"]
    heads = ["acc", "ceil", "frac", "ce", "ceil_ce", "r2", "kl", "ctrl", "select", "rand", "chance"]
    width = max(len(k) for k in scores) + 2
    lines = [f"step {step}", f"{'node':<8}{'layer':<{width}}" + "".join(f"{h:>8}" for h in heads)]
    names = next(iter(scores.values())).keys()
    for name in names:
        for key, per_target in scores.items():
            rec = per_target[name]
            cells = "".join(f"{rec[c]:>8.3f}" if c in rec else f"{'-':>8}" for c in cols)
            lines.append(f"{name:<8}{key:<{width}}{cells}")
    return "\n".join(lines)


def format_over_steps(records: list[dict], field: str = "acc_frac") -> str:
    """`field` by checkpoint (rows) and layer (columns), one block per target: when the state becomes decodable."""
    layers = list(dict.fromkeys(r["layer"] for r in records))
    names = list(dict.fromkeys(r["node"] for r in records))
    value = {(r["step"], r["layer"], r["node"]): r[field] for r in records}
    steps = sorted({r["step"] for r in records})
    width = max(len(k) for k in layers) + 2
    lines = []
    for name in names:
        lines.append(f"{field} of {name} by step and layer")
        lines.append(f"{'step':>8}" + "".join(f"{k:>{width}}" for k in layers))
        for step in steps:
            cells = "".join(f"{value[(step, k, name)]:>{width}.3f}" for k in layers)
            lines.append(f"{step:>8}{cells}")
    return "\n".join(lines)
