"""Probing: can a linear probe read the GSSM hidden state off a model's residual stream, and how close
does it come to the exact Bayes filter p(z_t | x_<=t) (GSSM.posterior), which no probe can beat?

activations.py  forward hooks on any registered architecture: "embed", "layer.{i}.resid|attn|mlp", "final_norm"
targets.py      probing sequences with their true hidden states and exact posterior, split by sequence
fit.py          softmax (logistic) and ridge probes in float32, L2 chosen on a validation split
scores.py       held-out scores beside the ceiling and the controls (random init, control task, chance)
probing.py      a model's layers, a run's checkpoints -> RUN_DIR/probes.jsonl
cli.py          python -m nanollama.probe RUN_DIR
"""

from nanollama.probe.activations import activations, collect, layer_names, resolve_layers
from nanollama.probe.fit import Features, Linear, fit_ridge, fit_softmax
from nanollama.probe.probing import format_table, probe_model, probe_run
from nanollama.probe.scores import ceilings, score_layer
from nanollama.probe.targets import ProbeError, Targets, probe_targets

__all__ = [
    "Features",
    "Linear",
    "ProbeError",
    "Targets",
    "activations",
    "ceilings",
    "collect",
    "fit_ridge",
    "fit_softmax",
    "format_table",
    "layer_names",
    "probe_model",
    "probe_run",
    "probe_targets",
    "resolve_layers",
    "score_layer",
]
