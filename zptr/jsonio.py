"""Reading the JSON files ZPTR consumes, with one-line errors that name the file and the key.

Every JSON file we load (checkpoint config, trainer state, HF ``config.json``, adapter and
tokenizer configs) goes through :func:`read_json`; a typed structure is then read with
:func:`load_dataclass` (by the dataclass's own annotations) or :class:`JsonObject` (key by key).
Any shape or type error — ``null`` where an object belongs, ``"forty"`` where a step count
belongs, a non-finite number — becomes a :class:`~zptr.errors.ConfigError` such as
``runs/x/zptr_config.json: zptr.schedule.warmup_steps must be an integer, got "forty"``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

from .errors import ConfigError

T = TypeVar("T")
_MISSING = object()


def read_json(path: Union[str, Path]) -> Any:
    """The parsed content of a JSON file; any I/O, encoding or syntax problem names the file."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a JSON file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid JSON (nested too deeply)") from None


def describe(value: Any) -> str:
    """A JSON value as it appears in a message: short, and with its kind."""
    text = json.dumps(value, ensure_ascii=False, default=str) if _jsonable(value) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, default=str)
        return True
    except (TypeError, ValueError):
        return False


def _name(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        names = [_name(a) for a in typing.get_args(kind) if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in typing.get_args(kind) else "")
    if origin in (list, tuple):
        (item,) = typing.get_args(kind)[:1] or (Any,)
        return f"a list of {_name(item).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "an object"
    if dataclasses.is_dataclass(kind):
        return "an object"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
            type(None): "null", Any: "any value"}.get(kind, getattr(kind, "__name__", str(kind)))


def check_value(value: Any, kind: Any, where: str, key: str) -> Any:
    """``value`` if it is of ``kind`` (an annotation), else a ConfigError naming ``key``."""
    def fail() -> ConfigError:
        return ConfigError(f"{where}: {key} must be {_name(kind)}, got {describe(value)}")

    if kind in (dict, list):  # unparametrised: any object / any list
        kind = dict[str, Any] if kind is dict else list[Any]
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if origin in (Union, types.UnionType):
        for option in typing.get_args(kind):
            try:
                return check_value(value, option, where, key)
            except ConfigError:
                continue
        raise fail()
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise fail()
        (item,) = typing.get_args(kind)[:1] or (Any,)
        items = [check_value(v, item, where, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        item = (typing.get_args(kind) + (Any, Any))[1]
        return {k: check_value(v, item, where, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(kind):
        return load_dataclass(kind, value, where, key)
    if kind is type(None):
        if value is not None:
            raise fail()
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise fail()
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise fail()
        return value
    raise TypeError(f"check_value: unsupported annotation {kind!r}")


def load_dataclass(cls: type[T], data: Any, where: str, key: str = "") -> T:
    """An instance of dataclass ``cls`` from a JSON object, every field checked against its
    annotation; unknown keys are refused; missing keys take the field's default."""
    label = key or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {label} must be an object, got {describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: {label} has unknown keys {', '.join(map(str, unknown))}")
    values = {}
    for name, spec in fields.items():
        if name in data:
            values[name] = check_value(data[name], hints[name], where, f"{key}.{name}" if key else name)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: {label} lacks the key {name!r}")
    try:
        return cls(**values)
    except ConfigError as err:  # the class's own range checks
        raise ConfigError(f"{where}: {err}") from None


def require_keys(cls: type, data: Any, where: str, key: str = "") -> None:
    """Refuse ``data`` (JSON for dataclass ``cls``) lacking any key, at any depth: for files
    ZPTR writes complete (a checkpoint's config), where a missing key means a damaged or foreign
    file, not a default. Types are :func:`load_dataclass`'s to check."""
    if not isinstance(data, dict):
        return
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        if not spec.init:
            continue
        path = f"{key}.{spec.name}" if key else spec.name
        if spec.name not in data:
            raise ConfigError(f"{where}: {key or 'the top level'} lacks the key {spec.name!r}")
        if dataclasses.is_dataclass(hints[spec.name]):
            require_keys(hints[spec.name], data[spec.name], where, path)


class JsonObject:
    """A JSON object read key by key with type checks (for files not described by a dataclass)."""

    def __init__(self, data: Any, where: str, key: str = ""):
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: {key or 'the top level'} must be an object, got {describe(data)}")
        self.data, self.where, self.key = data, where, key

    def _path(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def get(self, name: str, kind: Any, default: Any = _MISSING) -> Any:
        if name not in self.data:
            if default is _MISSING:
                raise ConfigError(f"{self.where}: key {self._path(name)!r} missing")
            return default
        return check_value(self.data[name], kind, self.where, self._path(name))

    def object(self, name: str, default: Any = _MISSING) -> Optional["JsonObject"]:
        if name not in self.data and default is not _MISSING:
            return default
        return JsonObject(self.get(name, dict), self.where, self._path(name))

    def __contains__(self, name: str) -> bool:
        return name in self.data

    def only(self, *names: str) -> None:
        """Refuse keys other than ``names`` (a misspelt or foreign key is not silently ignored)."""
        unknown = sorted(set(map(str, self.data)) - set(names))
        if unknown:
            raise ConfigError(f"{self.where}: {self.key or 'the top level'} has unknown keys {', '.join(unknown)}")


def read_object(path: Union[str, Path]) -> JsonObject:
    """A JSON file whose top level must be an object."""
    return JsonObject(read_json(path), str(path))
