"""Residual-stream activations of any registered architecture, captured by forward hooks.

Keys: "embed" (the input of the first block), "layer.{i}.resid" (block i's output), and for
blocks that have them "layer.{i}.attn" / "layer.{i}.mlp" (the outputs of `attention` and
`feed_forward`: what each adds to the residual stream, not the stream itself), "layer.{i}.state"
for blocks whose mixer shows its recurrent state (a `mixer.state_site` module, models/recurrent:
(B, S, F) with F the numbers carried from one step to the next, e.g. minGRU's h, Mamba-2's
flattened S_t), and "final_norm" (the model's `norm` output, where it has one). The blocks are the
spec's `blocks(model)`, so every `model.arch` the registry has works; the model's forward is not
changed (Mamba-2 builds its per-step states only while hooked), hooks sit only on the modules asked
for, and each tensor is the module's own output (detached, no copy).

Under FSDP2 a hook sees the block's full (unsharded) output for its rank's own rows: each rank gets
the activations of the tokens it was given. The probing CLI runs on an unsharded model loaded from
the checkpoint (nanollama.runs.load_run), so none of that arises there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from nanollama.models import spec_of

SITES = ("resid", "attn", "mlp", "state")
# The submodule of a block whose output is a site (the Transformer's names; "state" the recurrent mixers').
_SUBMODULE = {"attn": "attention", "mlp": "feed_forward", "state": "mixer.state_site"}


def _site_module(block: nn.Module, site: str) -> nn.Module | None:
    if site == "resid":
        return block
    try:
        return block.get_submodule(_SUBMODULE[site])
    except AttributeError:
        return None


def layer_names(model: nn.Module, sites: Sequence[str] = ("resid",)) -> list[str]:
    """Every key `activations` can return for `model` and `sites`, in stream order."""
    blocks = spec_of(model).blocks(model)
    names = ["embed"]
    for i, block in enumerate(blocks):
        for site in SITES:
            if site in sites and _site_module(block, site) is not None:
                names.append(f"layer.{i}.{site}")
    if isinstance(getattr(model, "norm", None), nn.Module):
        names.append("final_norm")
    return names


def resolve_layers(model: nn.Module, layers: Iterable[int | str] | None, sites: Sequence[str]) -> list[str]:
    """The keys for `layers`: block indices (negative from the end), "embed", "final_norm", or full
    keys like "layer.3.resid"; None means all. A ValueError names what does not exist."""
    bad = [s for s in sites if s not in SITES]
    if bad:
        raise ValueError(f"unknown site {bad[0]!r}: choose from {', '.join(SITES)}")
    blocks = spec_of(model).blocks(model)
    n_blocks = len(blocks)
    if "state" in sites and all(_site_module(b, "state") is None for b in blocks):
        arch = getattr(getattr(model, "config", None), "arch", type(model).__name__)
        raise ValueError(f"site 'state' does not exist in model.arch={arch}: no block keeps a recurrent state")
    available = layer_names(model, sites)
    if layers is None:
        return available
    out = []
    for layer in layers:
        if isinstance(layer, str) and layer.lstrip("-").isdigit():
            layer = int(layer)
        if isinstance(layer, int):
            if not -n_blocks <= layer < n_blocks:
                raise ValueError(f"layer {layer} does not exist: the model has {n_blocks} blocks (0..{n_blocks - 1})")
            i = layer % n_blocks
            keys = [k for k in available if k.startswith(f"layer.{i}.")]
            if not keys:
                raise ValueError(f"layer {i} has none of the sites {', '.join(sites)}")
            out += keys
        elif layer in available:
            out.append(layer)
        else:
            raise ValueError(f"layer {layer!r} does not exist: choose from {', '.join(available)} or block indices")
    return list(dict.fromkeys(out))  # each once, in the order asked


def _tensor(output) -> torch.Tensor:
    """A module's output as one tensor: some blocks return (hidden, state) tuples."""
    return output[0] if isinstance(output, tuple | list) else output


def activations(
    model: nn.Module,
    tokens: torch.Tensor,
    layers: Iterable[int | str] | None = None,
    sites: Sequence[str] = ("resid",),
    **forward_kwargs,
) -> dict[str, torch.Tensor]:
    """Activations (B, S, dim) of `model` on tokens (B, S) at `layers` (see resolve_layers), keyed
    "embed", "layer.{i}.{site}", "final_norm", in the model's dtype on its device (no grad); a "state"
    site's are (B, S, F) float32, F its state's numbers per step."""
    keys = resolve_layers(model, layers, sites)
    blocks = spec_of(model).blocks(model)
    out: dict[str, torch.Tensor] = {}
    handles = []

    def keep(key: str):
        def hook(module, args, output):
            out[key] = _tensor(output).detach()

        return hook

    try:
        for key in keys:
            if key == "embed":  # the stream entering the first block, whatever produces it
                handles.append(blocks[0].register_forward_pre_hook(_keep_embed(out)))
            elif key == "final_norm":
                handles.append(model.norm.register_forward_hook(keep(key)))
            else:
                _, i, site = key.split(".")
                block = blocks[int(i)]
                module = _site_module(block, site)
                handles.append(module.register_forward_hook(keep(key)))
        with torch.no_grad():
            model(tokens, **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    if "embed" in keys and "embed" not in out:
        if layers is not None and "embed" in layers:
            raise ValueError(f"layer 'embed' does not exist: the first block of {model.config.arch} takes token ids")
        keys = [k for k in keys if k != "embed"]  # asked for all layers: this architecture has no embed site
    return {k: out[k] for k in keys}


def _keep_embed(out: dict):
    def hook(module, args):
        # A model whose first block is its embedding table (e.g. a bigram) feeds it token ids: no stream yet.
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            out["embed"] = args[0].detach()

    return hook


def collect(
    model: nn.Module,
    tokens: torch.Tensor,
    layers: Iterable[int | str] | None = None,
    sites: Sequence[str] = ("resid",),
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """`activations` over many sequences in batches of `batch_size`, as float32 on `device` (default:
    the model's), so that a bf16 model's probes are fitted in float32."""
    model_device = next(model.parameters()).device
    device = torch.device(device) if device is not None else model_device
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, tokens.shape[0], batch_size):
        acts = activations(model, tokens[start : start + batch_size].to(model_device), layers, sites)
        for k, v in acts.items():
            parts.setdefault(k, []).append(v.to(device=device, dtype=torch.float32))
    return {k: torch.cat(v) for k, v in parts.items()}
