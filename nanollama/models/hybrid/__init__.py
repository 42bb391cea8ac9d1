"""Hybrids of recurrent and attention blocks (model.py) on the shared recurrent skeleton."""

from nanollama.models.hybrid.model import HybridConfig, build
from nanollama.models.recurrent import make_spec

SPEC = make_spec("hybrid", HybridConfig, build)

__all__ = ["SPEC", "HybridConfig"]
