"""RoPE frequency tables with long-context scaling (linear, NTK, YaRN, Llama 3), checked once.

The fused rotation that uses them lives in rope.py, which re-exports these names.
"""

import math

import torch

from nanollama.utils.checks import ConfigError

__all__ = ["SCALING_TYPES", "check_rope_scaling", "rope_frequencies"]


_REQUIRED = object()
# Keys per scaling type and their defaults (_REQUIRED: must be given). original_max_seq_len is the
# context length the model was trained at; linear and ntk accept it for uniformity but do not use it.
SCALING_TYPES: dict[str, dict[str, object]] = {
    "none": {},
    "linear": {"factor": _REQUIRED, "original_max_seq_len": None},
    "ntk": {"factor": _REQUIRED, "original_max_seq_len": None},
    "yarn": {
        "factor": _REQUIRED,
        "original_max_seq_len": _REQUIRED,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "attention_factor": None,  # None: 0.1 * ln(factor) + 1, YaRN's temperature
    },
    "llama3": {"factor": _REQUIRED, "original_max_seq_len": _REQUIRED, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
}


def _number(value, field: str, low: float, strict: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= low if strict else value < low):
        raise ConfigError(f"rope_scaling.{field}", f"must be a number {'>' if strict else '>='} {low}; got {value!r}")
    return float(value)


def check_rope_scaling(scaling: dict | None) -> dict | None:
    """Validate a rope scaling dict and fill in defaults; None (or type 'none') means no scaling.

    Types and keys (see SCALING_TYPES for defaults):
      linear: factor                    positions divided by factor (position interpolation)
      ntk:    factor                    base theta * factor ** (D / (D - 2)) (NTK-aware)
      yarn:   factor, original_max_seq_len, beta_fast, beta_slow, attention_factor
      llama3: factor, original_max_seq_len, low_freq_factor, high_freq_factor
    Errors name the field as rope_scaling.<key>.
    """
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError("rope_scaling", f"must be a mapping with a 'type' key or null; got {scaling!r}")
    kind = scaling.get("type")
    if kind not in SCALING_TYPES:
        raise ConfigError("rope_scaling.type", f"must be one of {', '.join(SCALING_TYPES)}; got {kind!r}")
    spec = SCALING_TYPES[kind]
    out: dict = {"type": kind}
    for key in scaling:
        if key != "type" and key not in spec:
            allowed = ", ".join(spec) or "no other keys"
            raise ConfigError(f"rope_scaling.{key}", f"unknown key for type {kind!r} (allowed: {allowed})")
    for key, default in spec.items():
        if scaling.get(key) is None and default is _REQUIRED:
            raise ConfigError(f"rope_scaling.{key}", f"required for type {kind!r}")
        out[key] = scaling[key] if scaling.get(key) is not None else default
    if kind == "none":
        return None
    out["factor"] = _number(out["factor"], "factor", 1.0, strict=False)
    ctx = out["original_max_seq_len"]
    if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx <= 0):
        raise ConfigError("rope_scaling.original_max_seq_len", f"must be a positive integer; got {ctx!r}")
    if kind == "yarn":
        out["beta_slow"] = _number(out["beta_slow"], "beta_slow", 0.0, strict=True)
        out["beta_fast"] = _number(out["beta_fast"], "beta_fast", out["beta_slow"], strict=True)
        if out["attention_factor"] is not None:
            out["attention_factor"] = _number(out["attention_factor"], "attention_factor", 0.0, strict=True)
    if kind == "llama3":
        out["low_freq_factor"] = _number(out["low_freq_factor"], "low_freq_factor", 0.0, strict=True)
        out["high_freq_factor"] = _number(out["high_freq_factor"], "high_freq_factor", out["low_freq_factor"], True)
    return out


def _scaled_inv_freq(head_dim: int, theta: float, scaling: dict | None, device) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim // 2,) in float64 and the factor that multiplies cos and sin."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim  # 2i / D
    inv_freq = theta**-exponent
    if scaling is None:
        return inv_freq, 1.0
    kind, factor = scaling["type"], scaling["factor"]
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "ntk":  # change of base so the lowest frequency is interpolated by `factor`
        return (theta * factor ** (head_dim / (head_dim - 2))) ** -exponent, 1.0
    ctx = scaling["original_max_seq_len"]
    if kind == "yarn":
        # Dimension i turns ctx * inv_freq[i] / (2 pi) times over the trained context: more than
        # beta_fast turns -> keep (extrapolate), fewer than beta_slow -> interpolate, ramp between.
        def dim_for(turns: float) -> float:
            return head_dim * math.log(ctx / (turns * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(dim_for(scaling["beta_fast"])), 0)
        high = min(math.ceil(dim_for(scaling["beta_slow"])), head_dim - 1)
        if low == high:  # a zero-width ramp; as YaRN's reference and Hugging Face, only when equal (high < low
            high += 0.001  # gives a reversed ramp, which the clamp below turns into a step)
        idx = torch.arange(head_dim // 2, dtype=torch.float64, device=device)
        ramp = ((idx - low) / (high - low)).clamp(0.0, 1.0)  # 0: keep, 1: interpolate
        inv_freq = inv_freq * (1 - ramp) + (inv_freq / factor) * ramp
        attention = scaling["attention_factor"]
        return inv_freq, attention if attention is not None else 0.1 * math.log(factor) + 1.0
    # llama3: wavelengths shorter than ctx / high_freq_factor kept, longer than ctx / low_freq_factor
    # divided by factor, smooth in between.
    low_f, high_f = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((ctx / wavelen - low_f) / (high_f - low_f)).clamp(0.0, 1.0)  # 1: keep, 0: divide
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq, 1.0


def rope_frequencies(
    seq_len: int, head_dim: int, theta: float = 10000.0, scaling: dict | None = None, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (seq_len, head_dim // 2) float32: cos[p, i] = m * cos(p * f_i), f_i = theta^(-2i/D).

    `scaling` (see check_rope_scaling) changes f_i, and yarn sets the temperature m (1 otherwise).
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even integer for RoPE; got {head_dim!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer; got {seq_len!r}")
    if not theta > 1.0:
        raise ValueError(f"theta must be > 1; got {theta!r}")
    inv_freq, mscale = _scaled_inv_freq(head_dim, float(theta), check_rope_scaling(scaling), device)
    angles = torch.arange(seq_len, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]  # (S, D/2)
    return (angles.cos() * mscale).float(), (angles.sin() * mscale).float()
