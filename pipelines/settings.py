"""Settings for every entry point: a YAML file and ``--set key=value`` overrides -> a validated config dataclass.

The one config mechanism of the project: typed, nested dataclasses (``model/validation.py`` builds and checks
them), resolved the same way by every command line, with secrets redacted wherever a config is shown or stored.

    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)               # --config, --set, --dry-run
    args = parser.parse_args(argv)
    cfg = settings.resolve(parser, CurateConfig, args, flags={"output": args.output})
    if cfg is None:                              # --dry-run: the resolved config was printed
        return 0
"""

from __future__ import annotations

import argparse
import json
import re
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from model.validation import ConfigError, check, check_choice, from_dict, merge, nested, to_dict

T = TypeVar("T")

# Keys whose values are never logged or stored as parameters (MLflow params, saved configs shown to users).
SECRET_MARKERS = (
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "access_key",
    "credential",
    "private_key",
    "privatekey",
    "accesskey",
    "connection_string",
    "connectionstring",
    "conn_str",
    "cookie",
)
# Whole words of a key that are secrets on their own (as substrings they would catch "author", "dsnless"...):
# dsn (database / Sentry URLs with passwords), auth (headers).
SECRET_WORDS = frozenset({"dsn", "auth", "pwd", "pass"})
# ... and in a URL's query, where signed and API-key URLs carry them (X-Amz-Signature, sig, key, sas). Not for
# settings keys: "new_key" or "eval.signature" (an evaluation-settings hash) are no secrets.
QUERY_SECRET_WORDS = SECRET_WORDS | {"sig", "signature", "key", "sas"}
REDACTED = "***redacted***"

__all__ = [
    "ConfigError",
    "check",
    "check_choice",
    "from_dict",
    "to_dict",
    "merge",
    "nested",
    "add_arguments",
    "resolve",
    "load",
    "read_yaml",
    "dump",
    "flatten",
    "redact",
    "redact_uri",
    "is_secret_key",
    "credentials_in",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--config/--set/--dry-run`` conventions shared by every entry point."""
    parser.add_argument("--config", default=None, help="YAML file with settings (optional; defaults are embedded)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, dotted for nested ones, value parsed as YAML (repeatable): --set section.key=value",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def resolve(
    parser: argparse.ArgumentParser,
    cls: type[T],
    args: argparse.Namespace,
    flags: dict[str, Any] | None = None,
    base: dict | None = None,
    prepare: typing.Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> T | None:
    """The config step of every command line: ``base`` (the command's embedded defaults), ``--config`` YAML, then
    the command's own ``flags`` (those given, as shorthands for ``--set``), then ``--set``. A bad value exits
    through ``parser.error`` (usage, the message naming the key, exit status 2). With ``--dry-run`` it prints the
    resolved config and returns None."""
    sets = [f"{key}={json.dumps(value)}" for key, value in (flags or {}).items() if value is not None]
    try:
        cfg = load(cls, args.config, sets + list(args.set), base=base, prepare=prepare)
    except ConfigError as e:
        parser.error(str(e))
    if args.dry_run:
        print(dump(cfg), end="")
        return None
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file of settings as a dict; a missing file, bad YAML or a non-mapping is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass an existing YAML file or omit --config")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of settings, got {type(loaded).__name__}")
    return loaded


def load(
    cls: type[T],
    path: str | Path | None = None,
    overrides: typing.Iterable[str] = (),
    base: dict | None = None,
    prepare: typing.Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> T:
    """Build ``cls`` from its defaults, then the (optional) ``base`` dict, then a YAML file, then ``KEY=VALUE``
    overrides, in that order. Starting from the defaults keeps a nested section's embedded defaults when a file or
    ``--set`` changes one of its keys."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = merge(data, read_yaml(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set num_frames=16")
        _set_dotted(data, key.strip(), _parse_value(raw))
    if prepare is not None:
        data = prepare(data)
    return from_dict(cls, data)


def dump(obj: Any) -> str:
    """A resolved config (dataclass or plain dict) as YAML, secrets redacted (what ``--dry-run`` prints)."""
    return yaml.safe_dump(redact(obj if isinstance(obj, dict) else to_dict(obj)), sort_keys=False)


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


def is_secret_key(key: str, words: frozenset[str] = SECRET_WORDS) -> bool:
    k = key.lower().replace("-", "_")
    return any(m in k for m in SECRET_MARKERS) or bool(words & set(re.split(r"[^a-z0-9]+", k)))


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
    """Credentials in URIs removed: user info (``scheme://user:pass@host``, ``scheme://token@host``) and the values
    of secret-looking query parameters (signed URLs: ``X-Amz-Signature``, ``X-Amz-Credential``, ``sig``,
    ``token``, ``key``...)."""
    text = re.sub(r"(\b[a-zA-Z][\w+.-]*://)[^/?#@\s]+@", r"\1" + REDACTED + "@", text)

    def param(m: re.Match) -> str:
        return f"{m[1]}{m[2]}={REDACTED}" if is_secret_key(m[2], QUERY_SECRET_WORDS) and m[3] else m[0]

    return re.sub(r"([?&;])([^=&#;\s]+)=([^&#;\s]*)", param, text) if "=" in text else text


def credentials_in(data: Any, prefix: str = "") -> list[str]:
    """Dotted keys of ``data`` whose values are credentials: a value under a secret-looking key, or a string that
    carries them (a URI with user info or a signed query). Empty when ``data`` is safe to show as it is."""
    if isinstance(data, dict):
        out = []
        for k, v in data.items():
            name = f"{prefix}{k}"
            if is_secret_key(str(k)) and v not in (None, "") and not isinstance(v, dict):
                out.append(name)
            else:
                out += credentials_in(v, name + ".")
        return out
    if isinstance(data, (list, tuple)):
        return [k for i, v in enumerate(data) for k in credentials_in(v, f"{prefix}{i}.")]
    if isinstance(data, str) and redact_uri(data) != data:
        return [prefix.rstrip(".")]
    return []


# ----------------------------------------------------------------------------------------------------------------


def _set_dotted(data: dict, key: str, value: Any) -> None:
    """``--set a.b=v`` replaces ``data["a"]["b"]`` (copying the dicts on the way, so ``base`` is never changed)."""
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        node[part] = dict(child) if isinstance(child, dict) else {}
        node = node[part]
    node[leaf] = value


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
