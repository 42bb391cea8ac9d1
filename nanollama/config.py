"""Typed configs: dataclasses filled from YAML, then overridden by dotted `key=value` arguments.

One chain: dataclass defaults -> YAML file -> command-line overrides. Every value is converted to
its field's declared type; unknown keys, wrong types and invalid values raise a ConfigError that
names the dotted field (and suggests the closest key for a typo).

A component config validates itself in `__post_init__` by raising ConfigError(field, reason) with
its own field name; `build` prefixes the path of the section it sits in.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from nanollama.utils.checks import ConfigError, check

__all__ = ["ConfigError", "build", "check", "dump", "load", "to_dict"]

T = TypeVar("T")
FLOAT32_MAX = 3.4028234663852886e38


# ----------------------------------------------------------------------------- YAML


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one, silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: construct_mapping reports it
                break
            line = key_node.start_mark.line + 1
            if first is not None:
                raise DuplicateKey(key, first, line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key, first: int, second: int):
        self.key, self.first, self.second = key, first, second
        super().__init__(f"key {key!r} is given twice, on lines {first} and {second}")


def parse_yaml(text: str) -> Any:
    """YAML text as plain data (safe types only); a duplicate key is a yaml.YAMLError."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def yaml_error(e: yaml.YAMLError) -> str:
    """One line for a YAML error, with the line and column where the parser stopped."""
    if isinstance(e, DuplicateKey):
        return str(e)
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


# ----------------------------------------------------------------------------- building


def build(cls: type[T], data: Any, path: str = "") -> T:
    """Turn plain data (from YAML) into an instance of dataclass `cls`, recursively and type-checked."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping for {cls.__name__}, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(join_key(path, str(key)), "unknown key" + suggest(str(key), fields, path))
        tp = field_type(fields[key], hints[key], value, join_key(path, key))
        kwargs[key] = convert(value, tp, join_key(path, key))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise (e.under(path) if path else e) from None
    except TypeError as e:  # a required field left out
        raise ConfigError(path, str(e)) from None


def variant(default_factory, key: str, lookup) -> Any:
    """A section whose dataclass is chosen by one of its own keys, e.g. `model.arch` or `data.source`.

    `lookup(name) -> dataclass` (a ValueError for an unknown name); the default factory's instance
    gives the name when the key is absent.
    """
    return dataclasses.field(default_factory=default_factory, metadata={"variant": (key, lookup)})


def field_type(f: dataclasses.Field, hint: Any, value: Any, path: str) -> Any:
    """The type to convert `value` to: the hint, or for a variant section the class its key names."""
    if "variant" not in f.metadata:
        return hint
    key, lookup = f.metadata["variant"]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return type(value)
    name = value.get(key) if isinstance(value, dict) else None
    if name is None:
        name = getattr(f.default_factory(), key)
    try:
        return lookup(name)
    except ValueError as e:
        raise ConfigError(join_key(path, key), str(e)) from None


def convert(value: Any, tp: Any, path: str) -> Any:
    """Convert `value` to type `tp` (dataclass, Optional, Literal, list, tuple, dict, scalar)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return convert(value, option, path)
            except ConfigError as e:
                errors.append(e.reason)
        raise ConfigError(path, " / ".join(errors))
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ConfigError(path, f"must be one of {', '.join(map(str, args))}; got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = _parse_value(value, path)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(path, f"expected {len(args)} values, got {len(value)}")
            return tuple(convert(v, a, f"{path}.{i}") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [convert(v, item, f"{path}.{i}") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = _parse_value(value, path)
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {value!r}")
        return dict(value)
    return _scalar(value, tp, path)


def _scalar(value: Any, tp: Any, path: str) -> Any:
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(path, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ConfigError(path, f"expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond any float
                raise ConfigError(path, f"{value!r} is too large for a float") from None
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(path, f"expected a number, got {value!r}")
        # Parameters, learning rates and epsilons become float32 tensors: a value beyond float32's range
        # would silently turn into inf (e.g. optim.lr=1e39), and inf or nan is never a meaningful setting.
        if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
            raise ConfigError(path, f"must be a finite number within float32's range (|x| <= 3.4e38), got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(path, f"expected a string, got {value!r}")
    raise ConfigError(path, f"unsupported field type {tp!r}")


def join_key(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def suggest(key: str, options, section: str) -> str:
    """' (did you mean 'optim.lr'?)' for the closest sibling key, else the list of valid keys."""
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return (
        f" (did you mean '{join_key(section, close[0])}'?)" if close else f"; valid keys: {', '.join(sorted(options))}"
    )


# ----------------------------------------------------------------------------- overrides


def apply_override(data: dict, dotted: str, raw: str, cls: type) -> None:
    """Set `dotted` (e.g. `optim.lr`, `data.gssm.nodes.0.state_dim`) to `raw` inside plain data.

    The path is checked against the dataclass schema `cls` as it is walked, so a typo is reported
    with the full dotted key and a suggestion. The value is parsed as YAML (lists, null, numbers)
    and converted to the field's type later, by `build`.
    """
    keys = dotted.split(".")
    node: Any = data
    schema: Any = cls
    if not all(keys):
        raise ConfigError(dotted, "empty key in the dotted path")
    for depth, key in enumerate(keys):
        here = ".".join(keys[: depth + 1])
        last = depth == len(keys) - 1
        schema = unwrap_optional(schema)
        if dataclasses.is_dataclass(schema):
            fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
            if key not in fields:
                raise ConfigError(here, "unknown key" + suggest(key, fields, ".".join(keys[:depth])))
            hint = typing.get_type_hints(schema)[key]
            if last:
                node[key] = _parse_value(raw, dotted) if raw.strip() else raw
                return
            if node.get(key) is None:
                # A variant section starts empty: its key (model.arch, data.source) may still change its
                # class, and `build` fills in the chosen class's defaults.
                node[key] = {} if "variant" in fields[key].metadata else _default_as_data(fields[key])
            if dataclasses.is_dataclass(unwrap_optional(hint)) or "variant" in fields[key].metadata:
                if not isinstance(node[key], dict):  # e.g. `model: 5` in the file, then model.dim=...
                    raise ConfigError(here, f"expected a mapping (a section), got {node[key]!r}")
            node, schema = node[key], field_type(fields[key], hint, node[key], here)
        elif typing.get_origin(schema) in (list, tuple):
            if not key.isdigit() or not isinstance(node, list) or int(key) >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise ConfigError(here, f"no list item {key} (the list has {size} items)")
            if last:
                node[int(key)] = _parse_value(raw, dotted)
                return
            node, schema = node[int(key)], typing.get_args(schema)[0]
        elif typing.get_origin(schema) is dict or schema is dict:
            if last:
                node[key] = _parse_value(raw, dotted)
                return
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(here, f"expected a mapping, got {node!r}")
            schema = Any
        else:
            raise ConfigError(".".join(keys[:depth]), f"is a value, not a section (cannot set {dotted})")


def _parse_value(raw: str, dotted: str) -> Any:
    """An override's value as YAML; a one-line ConfigError naming the key when it does not parse."""
    try:
        return parse_yaml(raw)
    except yaml.YAMLError as e:
        hint = ""
        if raw.lstrip()[:1] in "[{" or raw.rstrip()[-1:] in ":,":
            hint = " (quote the whole key=value for the shell, e.g. 'model.rope_scaling={type: linear, factor: 2}')"
        raise ConfigError(dotted, f"cannot parse {raw!r} as a YAML value: {yaml_error(e)}{hint}") from None


def unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def _default_as_data(field: dataclasses.Field) -> Any:
    """A field's default as plain data, so an override can descend into a section the YAML omitted."""
    if field.default_factory is not dataclasses.MISSING:
        return to_dict(field.default_factory())
    if field.default is not dataclasses.MISSING and field.default is not None:
        return to_dict(field.default)
    return {}


# ----------------------------------------------------------------------------- entry points


def read_yaml(path: Path) -> dict:
    """A YAML file's top-level mapping; ConfigError when missing, unparsable or not a mapping."""
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise ConfigError("", f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} on line {line})") from None
    except OSError as e:
        raise ConfigError("", f"cannot read {path}: {e.strerror}") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError("", f"{path} is not valid YAML: {yaml_error(e)}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must hold a mapping at the top level")
    return data


def load(
    cls: type[T], path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), only: tuple[str, ...] = ()
) -> T:
    """Defaults -> YAML file at `path` -> `key=value` overrides, validated into a `cls` instance.

    `only`: keep just these top-level sections of the file and the overrides (a tool that reads part
    of a training config, and ignores the rest of it).
    """
    data = read_yaml(Path(path)) if path is not None else {}
    if only:
        data = {k: v for k, v in data.items() if k in only}
        overrides = [o for o in overrides if o.partition("=")[0].split(".")[0].strip() in only]
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("", f"expected key=value on the command line, got {item!r}")
        apply_override(data, key.strip(), value, cls)
    return build(cls, data)


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) of a config, suitable for YAML."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)
