"""Verb configurations: one frozen dataclass per verb, filled from YAML and then from CLI flags.

A field's metadata carries its help text and choices, so `--help`, YAML validation and the defaults
come from one place. Nothing here imports torch.
"""

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from edgetune.errors import EdgetuneError


def option(default: Any, help: str, *, choices: tuple | None = None, positional: bool = False,
           metavar: str | None = None, flag: str | None = None) -> Any:
    """A config field with its help text (and choices), read by `add_arguments`; `flag` names the
    command-line flag when it is not the field's own name (the YAML key stays the field's name)."""
    meta = {"help": help, "choices": choices, "positional": positional, "metavar": metavar,
            "flag": flag}
    return dataclasses.field(default=default, metadata=meta)


def given_field() -> Any:
    """A field that `build` fills with the names of the settings the user gave (YAML keys, flags).

    It is neither a flag nor a YAML key, and is not saved. A config made in code leaves it None;
    readers then take the settings that differ from the defaults as the given ones (`given_names`).
    """
    return dataclasses.field(default=None, compare=False, metadata={"given": True})


def _settings(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("given")]


def given_names(config: Any) -> frozenset[str]:
    """The settings the user chose: recorded by `build`, else those that differ from the defaults."""
    for f in dataclasses.fields(config):
        if f.metadata.get("given") and getattr(config, f.name) is not None:
            return frozenset(getattr(config, f.name))
    return frozenset(f.name for f in _settings(type(config))
                     if f.default is dataclasses.MISSING or getattr(config, f.name) != f.default)


def _base_type(annotation: Any) -> type:
    """`int | None` -> int; `tuple[str, ...]` -> tuple; plain types pass through."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    return typing.get_origin(annotation) or annotation


def _coerce(cls: type, name: str, value: Any) -> Any:
    """Convert a YAML value to the field's type, naming the key when it cannot be done."""
    field_type = _base_type(typing.get_type_hints(cls)[name])
    if value is None:
        return None
    if field_type is tuple:  # a repeatable flag, or a YAML list (one bare value counts as a list)
        return tuple(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    try:
        if field_type is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in {"true", "yes", "1", "on"}:
                return True
            if str(value).lower() in {"false", "no", "0", "off"}:
                return False
            raise ValueError(value)
        return field_type(value)
    except (TypeError, ValueError):
        raise EdgetuneError(f"{name}: {value!r} is not a valid {field_type.__name__}") from None


def build(cls: type, yaml_path: str | None = None, overrides: dict | None = None) -> Any:
    """Instantiate `cls` from its defaults, then a YAML file, then explicit overrides (CLI flags)."""
    values: dict[str, Any] = {}
    known = {f.name for f in _settings(cls)}
    if yaml_path is not None:
        values.update(_read_yaml(yaml_path, known))
    values.update(overrides or {})
    for name, value in values.items():
        values[name] = _coerce(cls, name, value)
    given = frozenset(values) - {"config"}
    values.update({f.name: given for f in dataclasses.fields(cls) if f.metadata.get("given")})
    return cls(**values)


def _read_yaml(path: str, known: set[str]) -> dict:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise EdgetuneError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise EdgetuneError(f"{path}: not UTF-8 text; a settings file is YAML text") from None
    except yaml.YAMLError as exc:
        raise EdgetuneError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise EdgetuneError(f"{path}: expected a mapping of option names to values")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise EdgetuneError(f"{path}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
    return data


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of `cls`; flags not given stay out of the namespace (SUPPRESS)."""
    hints = typing.get_type_hints(cls)
    for f in _settings(cls):
        meta = f.metadata
        field_type = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = meta.get("help", "")
        if default not in (None, "", False, ()) and field_type is not bool:
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS}
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if field_type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif field_type is tuple:  # several values: a positional takes them all, a flag repeats
            kwargs["type"] = str
            if meta.get("positional"):
                kwargs["nargs"] = "*"
            else:
                kwargs["action"] = "append"
        else:
            kwargs["type"] = field_type
        if meta.get("positional"):
            kwargs.setdefault("nargs", "?")
            parser.add_argument(f.name, **kwargs)
        else:
            name = meta.get("flag") or f.name
            parser.add_argument("--" + name.replace("_", "-"), dest=f.name, **kwargs)


def overrides_from(namespace: argparse.Namespace, cls: type) -> dict:
    """The fields of `cls` that the user set on the command line."""
    names = {f.name for f in _settings(cls)}
    return {k: v for k, v in vars(namespace).items() if k in names}


def as_dict(config: Any) -> dict:
    """A plain dict of a config's settings, for saving beside a run."""
    return {f.name: getattr(config, f.name) for f in _settings(type(config))}
