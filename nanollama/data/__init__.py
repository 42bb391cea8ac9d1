"""Data sources behind one interface (source.py), selected by `data.source` (registry.py).

Built in: the GSSM sources `onfly` and `files` (data/gssm/) and `text` (data/text/). batch.py lays
token rows out for the training mask, heldout.py holds the evaluation batches and their optimum where an oracle exists.
"""

from nanollama.data import gssm, text
from nanollama.data.config import DataConfig
from nanollama.data.registry import build, config_class, default_config, get, names, register
from nanollama.data.source import DataError, DataSource, TokenStream

register("onfly", gssm.GSSMDataConfig, gssm.GSSMSource)
register("files", gssm.GSSMDataConfig, gssm.GSSMSource)
register("text", text.TextDataConfig, text.TextSource)

__all__ = [
    "DataConfig",
    "DataError",
    "DataSource",
    "TokenStream",
    "build",
    "config_class",
    "default_config",
    "get",
    "names",
    "register",
]
