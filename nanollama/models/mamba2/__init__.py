"""Mamba-2's SSD layer (model.py) on the shared recurrent skeleton (models/recurrent/)."""

from nanollama.models.mamba2.model import SSD, Mamba2Config, build
from nanollama.models.recurrent import make_spec

SPEC = make_spec("mamba2", Mamba2Config, build)

__all__ = ["SPEC", "SSD", "Mamba2Config"]
