"""`python -m nanollama.train --help`: every config key with its default and one-line meaning.

Generated from the config dataclasses and the trailing `# comment` of each field (read from the
source with tokenize and ast), so the help cannot drift from what the loader accepts.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from typing import Any

from nanollama.config import join_key, unwrap_optional


def field_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field of dataclass `cls` (and its bases), read from the source."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (e.g. a class made at run time)
            continue
        by_line = {}
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                by_line[tok.start[0]] = tok.string.lstrip("#").strip()
        class_node = ast.parse(source).body[0]
        for node in getattr(class_node, "body", []):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                text = by_line.get(node.end_lineno)
                if text is not None:
                    comments[node.target.id] = text
    return comments


def describe(cls: type, prefix: str = "", instance: Any = None) -> list[tuple[str, str, str]]:
    """(dotted key, default, one-line meaning) for every field of `cls`, sections expanded.

    Generated from the dataclasses themselves, so `--help` cannot drift from the code. Defaults are
    the fields' own (before `__post_init__` derives any); a `variant` section shows the class its
    default picks; a list of sections shows its default items as `key.<i>.field` (`instance`: the item).
    """
    comments = field_comments(cls)
    hints = typing.get_type_hints(cls)
    rows: list[tuple[str, str, str]] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = join_key(prefix, f.name)
        value = getattr(instance, f.name, dataclasses.MISSING) if instance is not None else _field_default(f)
        hint = unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            rows.append((key, "(section)", comments.get(f.name) or _doc_line(type(value))))
            rows += describe(type(value), key)
            continue
        item = typing.get_args(hint)[0] if typing.get_origin(hint) in (list, tuple) and typing.get_args(hint) else None
        if dataclasses.is_dataclass(item) and isinstance(value, (list, tuple)):
            rows.append((key, f"(list of {len(value)})", comments.get(f.name) or _doc_line(item)))
            for i, v in enumerate(value):
                rows += describe(item, f"{key}.{i}", v)
            continue
        default = "(required)" if value is dataclasses.MISSING else _show(value)
        rows.append((key, default, comments.get(f.name, "")))
    return rows


def _doc_line(cls: type) -> str:
    return (
        (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ and not cls.__doc__.startswith(cls.__name__) else ""
    )


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)
