"""`data.source` -> (config class, source class): a new data source is new files plus one `register` line."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from nanollama.data.config import DataConfig
from nanollama.data.source import DataSource


@dataclass(frozen=True)
class SourceSpec:
    name: str
    config: type  # a DataConfig subclass: the `data` section when data.source=name
    source: type  # a DataSource subclass built from that config


_SPECS: dict[str, SourceSpec] = {}


def register(name: str, config: type, source: type) -> SourceSpec:
    """Make `data.source=<name>` read `config` and build `source(config)`."""
    if not issubclass(config, DataConfig) or not issubclass(source, DataSource):
        raise TypeError("register(name, config, source): a DataConfig subclass and a DataSource subclass")
    _SPECS[name] = SourceSpec(name, config, source)
    return _SPECS[name]


def names() -> list[str]:
    return sorted(_SPECS)


def get(name: str) -> SourceSpec:
    if name not in _SPECS:
        close = difflib.get_close_matches(str(name), names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown data source {name!r}{hint}; known: {', '.join(names())}")
    return _SPECS[name]


def config_class(name: str) -> type:
    return get(name).config


def build(cfg: DataConfig) -> DataSource:
    """The source a `data` section describes."""
    return get(cfg.source).source(cfg)
