"""Hawk, the RG-LRU model of Griffin (model.py), on the shared recurrent skeleton (models/recurrent/)."""

from nanollama.models.hawk.model import RGLRU, HawkConfig, build
from nanollama.models.recurrent import make_spec

SPEC = make_spec("hawk", HawkConfig, build)

__all__ = ["RGLRU", "SPEC", "HawkConfig"]
