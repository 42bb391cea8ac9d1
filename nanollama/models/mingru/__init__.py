"""minGRU (model.py) on the shared recurrent skeleton (models/recurrent/)."""

from nanollama.models.mingru.model import MinGRU, MinGRUConfig, build
from nanollama.models.recurrent import make_spec

SPEC = make_spec("mingru", MinGRUConfig, build)

__all__ = ["SPEC", "MinGRU", "MinGRUConfig"]
