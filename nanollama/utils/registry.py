"""A name -> entry table with a default and a closest-name suggestion: the model and data plug points."""

from __future__ import annotations

import difflib
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name; `what` names them in errors ("architecture", "data source")."""

    def __init__(self, what: str, default: str):
        self.what, self.default = what, default
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register `entry` under `name`; registering a name again replaces it."""
        self._entries[name] = entry
        return entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> T:
        """The entry of `name`; a ValueError naming the known ones (and the closest) otherwise."""
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown {self.what} {name!r}{hint}; known: {', '.join(self.names())}")
        return self._entries[name]
