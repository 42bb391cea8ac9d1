"""`data.source` -> (config class, source class): a new data source is new files plus one `register` line."""

from __future__ import annotations

from dataclasses import dataclass

from nanollama.data.config import DataConfig
from nanollama.data.source import DataSource
from nanollama.utils.registry import Registry


@dataclass(frozen=True)
class SourceSpec:
    name: str
    config: type  # a DataConfig subclass: the `data` section when data.source=name
    source: type  # a DataSource subclass built from that config


SOURCES: Registry[SourceSpec] = Registry("data source", default="onfly")


def register(name: str, config: type, source: type) -> SourceSpec:
    """Make `data.source=<name>` read `config` and build `source(config)`."""
    if not issubclass(config, DataConfig) or not issubclass(source, DataSource):
        raise TypeError("register(name, config, source): a DataConfig subclass and a DataSource subclass")
    return SOURCES.add(name, SourceSpec(name, config, source))


def names() -> list[str]:
    return SOURCES.names()


def get(name: str) -> SourceSpec:
    return SOURCES.get(name)


def config_class(name: str) -> type:
    return get(name).config


def default_config() -> DataConfig:
    """The `data` section of a config that names no source."""
    return config_class(SOURCES.default)()


def build(cfg: DataConfig) -> DataSource:
    """The source a `data` section describes."""
    return get(cfg.source).source(cfg)
