"""Argument checks shared by the library's public functions: one wording for every integer check."""

from __future__ import annotations

import numbers
from typing import Any


def is_int(value: Any) -> bool:
    """A Python or numpy integer (numbers.Integral), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int when it is an integer (not a bool) in [low, high], else a ValueError naming it."""
    if not is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            bound = f" in [{low}, {high}]"
        elif low is not None:
            bound = f" >= {low}"
        elif high is not None:
            bound = f" <= {high}"
        else:
            bound = ""
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")
    return int(value)


class ConfigError(ValueError):
    """A bad config value: `field` is the dotted path, `reason` what is wrong and what is allowed.

    Defined here, not in nanollama.config, so that the kernels (which import nothing above utils)
    can name the field of a config they validate, e.g. rope_scaling.factor.
    """

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}" if field else reason)

    def under(self, prefix: str) -> ConfigError:
        return ConfigError(f"{prefix}.{self.field}" if self.field else prefix, self.reason)


def check(condition: bool, field: str, reason: str) -> None:
    """Raise ConfigError(field, reason) unless condition holds (for __post_init__ validation)."""
    if not condition:
        raise ConfigError(field, reason)
