"""Typed configs as nested dataclasses: validation helpers and the plain-dict round trip (no YAML, no CLI).

Every component describes its settings as a dataclass whose ``__post_init__`` checks values with ``check``;
``from_dict`` builds one from plain data, checking every key and type on the way, and ``to_dict`` goes back.
Errors name the offending key and say what would be accepted; nothing is corrected silently. The YAML and
``--set`` front end that every entry point uses is ``pipelines/settings.py``.

    cfg = from_dict(UNetConfig, {"model_channels": 64})
    data = merge(to_dict(cfg), nested({"unet.model_channels": 32}))
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is wrong; the message says which key and what is accepted."""


def check(condition: bool, message: str) -> None:
    """For ``__post_init__`` validation: raise ConfigError(message) unless condition holds."""
    if not condition:
        raise ConfigError(message)


def check_choice(name: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = list(choices)
    check(value in choices, f"{name}={value!r} is not one of {choices}")


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Instantiate dataclass ``cls`` from a plain dict, checking keys and types recursively."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping of settings, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    moved = getattr(cls, "MOVED_SETTINGS", {})  # old key -> where it went (for a class that renamed settings)
    for key in unknown:
        if key in moved:
            raise ConfigError(f"{_join(where, key)} has moved: {moved[key]}")
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(_join(where, u) for u in unknown)}; "
            f"valid keys{' under ' + where if where else ''}: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        default = _section_default(fields[name])
        if default is not None and isinstance(value, Mapping):
            value = merge(to_dict(default), value)  # a section's own defaults stay unless given
        kwargs[name] = _coerce(hints[name], value, _join(where, name))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass instance as plain YAML/JSON-able data."""
    return _plain(dataclasses.asdict(obj))


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, nested mappings merged key by key (a new dict; neither input changes)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def nested(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys as nested dicts: ``{"unet.model_channels": 8} -> {"unet": {"model_channels": 8}}``."""
    if not isinstance(settings, Mapping):
        raise ConfigError(f"expected a mapping of settings such as {{'unet.model_channels': 64}}, got {settings!r}")
    out: dict[str, Any] = {}
    for key, value in settings.items():
        *parents, leaf = str(key).split(".")
        path: dict[str, Any] = {leaf: value}
        for part in reversed(parents):
            path = {part: path}
        out = merge(out, path)
    return out


# ----------------------------------------------------------------------------------------------------------------


def _section_default(f: dataclasses.Field) -> Any:
    """The default of a nested-dataclass field (None for other fields): what settings given for it go over."""
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    elif f.default is not dataclasses.MISSING:
        value = f.default
    else:
        return None
    return value if dataclasses.is_dataclass(value) else None


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}={value!r}: does not fit {tp}")
    if origin is Literal:
        check_choice(where, value, get_args(tp))
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r}: expected a list, e.g. [1, 2]")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            check(len(args) == len(value), f"{where}={value!r}: expected {len(args)} items")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r}: expected a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}={value!r}: expected a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}={value!r}: expected a string")
    if tp is Path:
        return Path(value)
    return value
