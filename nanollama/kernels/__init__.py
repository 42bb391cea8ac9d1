"""nanollama.kernels: the fast paths under the model, importable on their own.

Each op lives in its own module with its eager reference beside it.
"""

from nanollama.kernels import masks
from nanollama.kernels.attention import PreparedMask, attention, attention_ref, prepare
from nanollama.kernels.decode import decode_attention, decode_attention_ref
from nanollama.kernels.rope import apply_rope, check_rope_scaling, rope_frequencies, rope_ref
from nanollama.kernels.scan import linear_scan, linear_scan_log, linear_scan_ref, ssd_scan, ssd_scan_ref

__all__ = [
    "PreparedMask",
    "apply_rope",
    "attention",
    "attention_ref",
    "check_rope_scaling",
    "decode_attention",
    "decode_attention_ref",
    "linear_scan",
    "linear_scan_log",
    "linear_scan_ref",
    "masks",
    "prepare",
    "rope_frequencies",
    "rope_ref",
    "ssd_scan",
    "ssd_scan_ref",
]
