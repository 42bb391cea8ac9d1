"""Data sources behind one interface (source.py), selected by `data.source` (registry.py).

Built in: the GSSM sources `onfly` and `files` (data/gssm/). batch.py lays token rows out for the
training mask, heldout.py holds the evaluation batches and their optimum where an oracle exists.
"""

from nanollama.data import gssm
from nanollama.data.config import DataConfig
from nanollama.data.registry import build, config_class, get, names, register
from nanollama.data.source import DataError, DataSource, TokenStream

register("onfly", gssm.GSSMDataConfig, gssm.GSSMSource)
register("files", gssm.GSSMDataConfig, gssm.GSSMSource)
DEFAULT_SOURCE = "onfly"  # data.source when a config leaves it out


def default_config():
    """The `data` section of a config that names no source."""
    return config_class(DEFAULT_SOURCE)()


__all__ = [
    "DEFAULT_SOURCE",
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
