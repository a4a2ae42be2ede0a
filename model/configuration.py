"""Typed configs for every entry point: YAML file + ``--set key=value`` overrides -> validated dataclass.

Every component (curation, model, training, flows) describes its settings as a dataclass. This module
turns a YAML file and command-line overrides into an instance of that dataclass, checking every key and
type on the way. Errors name the offending key and say what would be accepted; nothing is corrected
silently. It lives in ``model/`` because it is the lowest layer (plain Python + PyYAML) that every other
package may import.

    parser = argparse.ArgumentParser()
    configuration.add_arguments(parser)          # --config, --set, --dry-run
    args = parser.parse_args(argv)
    cfg = configuration.resolve(parser, CurateConfig, args, flags={"output": args.output})
    if cfg is None:                              # --dry-run: the resolved config was printed
        return 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")

# Keys whose values are never logged or stored as parameters (MLflow params, saved configs shown to users).
SECRET_MARKERS = ("password", "passwd", "secret", "token", "api_key", "apikey", "access_key", "credential", "private_key")
REDACTED = "***redacted***"


class ConfigError(ValueError):
    """A config value is wrong; the message says which key and what is accepted."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--config/--set/--dry-run`` conventions shared by every entry point."""
    parser.add_argument("--config", default=None, help="YAML file with settings (optional; defaults are embedded)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override one setting, dotted for nested ones, value parsed as YAML (repeatable): --set train.steps=100",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def resolve(parser: argparse.ArgumentParser, cls: type[T], args: argparse.Namespace,
            flags: dict[str, Any] | None = None, base: dict | None = None) -> T | None:
    """The config step of every command line: ``--config`` YAML, then the command's own ``flags`` (those given, as
    shorthands for ``--set``), then ``--set``. A bad value exits through ``parser.error`` (usage, the message
    naming the key, exit status 2). With ``--dry-run`` it prints the resolved config and returns None."""
    sets = [f"{key}={json.dumps(value)}" for key, value in (flags or {}).items() if value is not None]
    try:
        cfg = load(cls, args.config, sets + list(args.set), base=base)
    except ConfigError as e:
        parser.error(str(e))
    if args.dry_run:
        print(dump(cfg), end="")
        return None
    return cfg


def load(cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = (), base: dict | None = None) -> T:
    """Build ``cls`` from (optional) ``base`` dict, then a YAML file, then ``KEY=VALUE`` overrides, in that order."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass an existing YAML file or omit --config")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of settings, got {type(loaded).__name__}")
        _merge(data, loaded)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set num_frames=16")
        value = _parse_value(raw)
        _set_dotted(data, key.strip(), value)
    return from_dict(cls, data)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Instantiate dataclass ``cls`` from a plain dict, checking keys and types recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping of settings, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(_join(where, u) for u in unknown)}; "
            f"valid keys{' under ' + where if where else ''}: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, _join(where, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass instance as plain YAML/JSON-able data."""
    return _plain(dataclasses.asdict(obj))


def dump(obj: Any) -> str:
    """The resolved config as YAML, secrets redacted (what ``--dry-run`` prints and runs save)."""
    return yaml.safe_dump(redact(to_dict(obj)), sort_keys=False)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; secrets redacted, so the result is safe to log as parameters."""
    out: dict[str, Any] = {}
    for key, value in redact(data).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def is_secret_key(key: str) -> bool:
    k = key.lower().replace("-", "_")
    return any(m in k for m in SECRET_MARKERS)


def redact(data: Any) -> Any:
    """Copy of ``data`` with every value under a secret-looking key replaced, and credentials in URIs removed."""
    if isinstance(data, dict):
        return {k: (REDACTED if is_secret_key(str(k)) and v not in (None, "") else redact(v)) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(redact(v) for v in data)
    if isinstance(data, str):
        return redact_uri(data)
    return data


def redact_uri(text: str) -> str:
    """``scheme://user:pass@host`` -> ``scheme://***redacted***@host`` (tracking URIs can carry passwords)."""
    import re

    return re.sub(r"(\w+://)[^/@\s:]+:[^/@\s]+@", r"\1" + REDACTED + "@", text)


def check(condition: bool, message: str) -> None:
    """For ``__post_init__`` validation: raise ConfigError(message) unless condition holds."""
    if not condition:
        raise ConfigError(message)


def check_choice(name: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = list(choices)
    check(value in choices, f"{name}={value!r} is not one of {choices}")


# ----------------------------------------------------------------------------------------------------------------


# YAML 1.1 reads these as booleans; on the command line they are far more often option values (e.g. a mode).
_YAML11_BOOLEAN_WORDS = {"on", "off", "yes", "no", "y", "n"}


def _parse_value(raw: str) -> Any:
    """A ``--set`` value as YAML (numbers, lists, null, true/false), except that on/off/yes/no stay strings."""
    if not raw.strip():
        return ""
    if raw.strip().lower() in _YAML11_BOOLEAN_WORDS:
        return raw.strip()
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = node[part] = {}
        node = nxt
    node[parts[-1]] = value


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
