"""Strict YAML -> frozen dataclasses, shared by stage manifests and training configs.

The parsing is Megatron-Energon's strict kind: `build_dataclass(cls, data)` refuses unknown
keys, missing required keys and values of the wrong type, naming the YAML path of the field
(``datasets[2].ratio``); nested dataclasses, lists, optional values, unions and Literals are
checked. String values get `${VAR}` / `${VAR:-default}` expanded (`expand_env`). Relative paths
resolve against the YAML file's own directory (`resolve_path`). Every problem is a
`lvita_data.errors.ManifestError`; `lvita_data.manifest` and `pipelines.train.config` add the
file name.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from lvita_data.errors import ManifestError, UnsetVariableError

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def expand_env(text: str) -> str:
    """Expand `${VAR}` and `${VAR:-default}`; an unset variable without default is an error."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise UnsetVariableError(
                    f"environment variable {name} is not set (and ${{{name}}} has no default)"
                )
            return default
        return value

    return _ENV_PATTERN.sub(substitute, text)


def _convert(value: Any, hint: Any, where: str, errors: tuple[type[Exception], ...]) -> Any:
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        failures = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, where, errors)
            except UnsetVariableError:
                raise  # the same for every option: say it, not "matches none of"
            except errors as error:
                failures.append(str(error))
        raise ManifestError(f"{where}: {value!r} matches none of {hint} ({'; '.join(failures)})")
    if origin is Literal:
        if value not in get_args(hint):
            raise ManifestError(f"{where}: {value!r} is not one of {get_args(hint)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ManifestError(f"{where}: expected a list, got {type(value).__name__}")
        (item_hint,) = get_args(hint)
        return [_convert(item, item_hint, f"{where}[{i}]", errors) for i, item in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where, errors=errors)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, bool, str):
        if type(value) is not hint:
            raise ManifestError(f"{where}: expected {hint.__name__}, got {value!r}")
        if hint is not str:
            return value
        try:
            return expand_env(value)
        except UnsetVariableError as error:
            raise UnsetVariableError(f"{where}: {error}") from None
    raise TypeError(f"unsupported manifest type {hint} at {where}")


def build_dataclass(
    cls: type,
    data: Any,
    where: str = "",
    *,
    errors: tuple[type[Exception], ...] = (ManifestError,),
) -> Any:
    """`cls` from a parsed YAML mapping, strictly: unknown or missing keys and wrong types raise
    `ManifestError` naming the field's path (`where` prefixes it). Nested dataclasses, lists,
    unions and Literals are checked; `${ENV}` is expanded in strings. A field named
    ``source_path`` is never read from the YAML (the loader sets it).

    `errors` are the exception classes the dataclasses' own checks (``__post_init__``) raise:
    they are re-raised as `ManifestError` with the field's path in front (a training config
    passes its `TrainConfigError` here)."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where or 'manifest'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source_path"}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ManifestError(f"{where or 'manifest'}: unknown key(s) {unknown}")
    required = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise ManifestError(f"{where or 'manifest'}: missing key(s) {missing}")
    kwargs = {
        key: _convert(value, hints[key], f"{where}.{key}" if where else key, errors)
        for key, value in data.items()
    }
    try:
        return cls(**kwargs)
    except (ManifestError, *errors) as error:
        raise ManifestError(f"{where or 'manifest'}: {error}") from None


def resolve_path(path: str, base: Path) -> str:
    """`path` with ``~`` expanded; a relative one joined to `base` (the YAML file's directory)
    and normalised."""
    expanded = os.path.expanduser(path)
    return expanded if os.path.isabs(expanded) else os.path.normpath(base / expanded)


__all__ = ["build_dataclass", "expand_env", "resolve_path"]
