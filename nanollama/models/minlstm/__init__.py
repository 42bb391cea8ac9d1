"""minLSTM (model.py) on the shared recurrent skeleton (models/recurrent/)."""

from nanollama.models.minlstm.model import MinLSTM, MinLSTMConfig, build
from nanollama.models.recurrent import make_spec

SPEC = make_spec("minlstm", MinLSTMConfig, build)

__all__ = ["SPEC", "MinLSTM", "MinLSTMConfig"]
