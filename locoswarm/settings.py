"""Config dataclasses as settings: values from TOML, the environment and flags, and the flags.

Every config section is a frozen dataclass whose fields carry their name, type, default and an
attribute docstring. This module turns loose values (TOML, ``LOCOSWARM_*`` variables, ``--set``,
flags) into those dataclasses, naming the key of any bad value, and generates command-line flags
from the fields, so a flag's type, choices, default and help are never written a second time.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from locoswarm.errors import ConfigError

__all__ = [
    "Flag",
    "add_flags",
    "build",
    "coerce",
    "field_docs",
    "flag_values",
    "merge",
    "nest",
    "to_dict",
]


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Turn a TOML, environment or flag value into the field's type, or name the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", ""))
        if is_none and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:  # Optional[X]: X's own message says best what was wrong
            return coerce(value, others[0], key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: cannot use {value!r} as {_type_name(hint)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else str
        return tuple(
            coerce(v.strip() if isinstance(v, str) else v, inner, key) for v in items if v != ""
        )
    if dataclasses.is_dataclass(hint):
        if isinstance(value, typing.cast(type, hint)):
            return value  # already built (a section made by code, not read from text)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table of settings, got {value!r}")
        return build(hint, value, key)  # type: ignore[arg-type]
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if not isinstance(value, str | int | float):
                raise ValueError
            return str(value)
        if hint is Path:
            return Path(str(value))
        if hint is bytes:
            return value.encode() if isinstance(value, str) else bytes(value)
        if hint is frozenset or typing.get_origin(hint) is frozenset:
            items = value.split(",") if isinstance(value, str) else value
            return frozenset(str(v).strip() for v in items)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: cannot use {value!r} as {_type_name(hint)}") from None
    return value


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return str(getattr(hint, "__name__", hint))


def build(cls: type[Any], data: Mapping[str, Any], prefix: str = "") -> Any:
    """Construct dataclass ``cls`` from nested ``data``; unknown keys are a ``ConfigError``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"unknown config key {dotted!r}")
        kwargs[key] = coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{prefix or 'config'}: {exc}") from None


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Nested ``extra`` over nested ``base`` (tables merge, values replace)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def nest(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """``{"sync.mode": "ef"}`` -> ``{"sync": {"mode": "ef"}}``."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {key!r} conflicts with a value set for {part!r}")
        node[parts[-1]] = value
    return out


def to_dict(config: Any) -> Any:
    """A JSON-friendly view of a config (for logs and checkpoint metadata)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, frozenset):
        return sorted(to_dict(v) for v in config)
    if isinstance(config, tuple | list):
        return [to_dict(v) for v in config]
    if isinstance(config, Path):
        return str(config)
    if isinstance(config, bytes):
        return "<secret>"
    return config


# -- flags from fields -------------------------------------------------------------------------


@functools.cache
def field_docs(cls: type[Any]) -> dict[str, str]:
    """The attribute docstrings of a dataclass's fields (the string literal under each field),
    read from the class's source; empty when the source is not available."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for stmt, nxt in itertools.pairwise(body):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


_NO_CONST = object()


@dataclass(frozen=True, slots=True)
class Flag:
    """A command-line flag that sets one field of a config dataclass.

    The field gives the type (and so the parsing and the choices of a ``Literal``), the default
    and the help text (its attribute docstring); the flag only says how it is spelled and how the
    value reaches the field.
    """

    key: str
    """Dotted path of the field from the root config, e.g. ``sync.inner_steps``."""
    name: str = ""
    """The flag, e.g. ``--inner-steps``; empty: the field's name with dashes."""
    const: Any = _NO_CONST
    """A switch: the flag takes no value and sets the field to this."""
    repeat: bool = False
    """Repeatable: each use adds one item to the field's tuple."""
    scale: float = 1.0
    """The flag is given in units of ``scale`` field units (e.g. Mbit/s for bytes/s)."""
    unit: str = ""
    """The flag's unit, said in the help when it differs from the field's."""
    help: str = ""
    """Overrides the field's docstring (for switches, whose meaning is the const)."""
    default: Callable[[], str] | None = None
    """Says the default when the field's own default is a placeholder (None: per mode)."""
    metavar: str | None = None
    choices: tuple[Any, ...] | None = None
    """Allowed values of a ``str`` field whose registry lives elsewhere (a ``Literal`` field
    gives its own)."""
    group: str = ""
    """Flags of one non-empty group exclude each other."""
    none_word: str = ""
    """A word that sets an optional field to None (e.g. ``off``)."""

    def given(self, ns: argparse.Namespace) -> bool:
        """Whether this flag was used (a switch: whether its const is the field's value)."""
        if not hasattr(ns, self.key):
            return False
        return self.const is _NO_CONST or getattr(ns, self.key) == self.const

    @property
    def flag(self) -> str:
        return self.name or "--" + self.key.rsplit(".", 1)[-1].replace("_", "-")


def _field(root: type[Any], key: str) -> tuple[Any, Any, str]:
    """(type hint, default, docstring) of the field at dotted ``key`` below dataclass ``root``."""
    cls = root
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise KeyError(f"{root.__name__} has no field {'.'.join(parts[: i + 1])!r}")
        hint = typing.get_type_hints(cls)[part]
        fld = fields[part]
        if i == len(parts) - 1:
            if fld.default is not dataclasses.MISSING:
                default = fld.default
            elif fld.default_factory is not dataclasses.MISSING:
                default = fld.default_factory()
            else:
                default = None
            return hint, default, field_docs(cls).get(part, "")  # type: ignore[arg-type]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        cls = typing.cast(type, args[0] if args and dataclasses.is_dataclass(args[0]) else hint)
    raise KeyError(key)


def _first_sentence(doc: str) -> str:
    end = doc.find(". ")
    return (doc if end < 0 else doc[: end + 1]).rstrip(".")


def _show(value: Any, scale: float) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, float | int) and not isinstance(value, bool) and scale != 1.0:
        return f"{value / scale:g}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def add_flags(p: argparse.ArgumentParser, root: type[Any], flags: Sequence[Flag]) -> None:
    """Declares ``flags`` on ``p``; a flag that is not given leaves the namespace untouched."""
    groups: dict[str, Any] = {}
    for spec in flags:
        target: Any = p
        if spec.group:
            if spec.group not in groups:
                groups[spec.group] = p.add_mutually_exclusive_group()
            target = groups[spec.group]
        hint, default, doc = _field(root, spec.key)
        text = spec.help or _first_sentence(doc) or spec.key
        if spec.unit:
            text += f", {spec.unit}"
        said = spec.default() if spec.default else None
        if said is None and spec.const is _NO_CONST and default not in (None, (), ""):
            said = _show(default, spec.scale)
        if said:
            text += f" (default {said})"
        if spec.none_word:
            text += f"; {spec.none_word}: none"
        text = text.replace("``", "").replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": spec.key, "default": argparse.SUPPRESS, "help": text}
        if spec.const is not _NO_CONST:
            target.add_argument(spec.flag, action="store_const", const=spec.const, **kwargs)
            continue
        item = hint
        if spec.repeat:
            item = (typing.get_args(hint) or (str,))[0]
            kwargs["action"] = "extend"
            kwargs["nargs"] = "+"
        choices = spec.choices or _choices(item)
        if choices:
            kwargs["choices"] = choices
        kwargs["type"] = _parser(item, spec)
        if not choices:
            kwargs["metavar"] = spec.metavar or spec.key.rsplit(".", 1)[-1].upper()
        target.add_argument(spec.flag, **kwargs)


def _choices(hint: Any) -> tuple[Any, ...] | None:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if len(args) == 1 and typing.get_origin(args[0]) is Literal:
        return typing.get_args(args[0])
    return None


def _parser(hint: Any, spec: Flag) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if spec.none_word and text.lower() == spec.none_word:
            return None
        try:
            value = coerce(text, hint, spec.flag)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if spec.scale != 1.0 and isinstance(value, int | float) and not isinstance(value, bool):
            return value * spec.scale
        return value

    parse.__name__ = _type_name(hint)  # argparse names the type in its error message
    return parse


def flag_values(ns: argparse.Namespace, flags: Sequence[Flag]) -> dict[str, Any]:
    """Dotted config keys -> values of the flags that were given."""
    out: dict[str, Any] = {}
    for spec in flags:
        if hasattr(ns, spec.key):
            value = getattr(ns, spec.key)
            out[spec.key] = tuple(value) if spec.repeat else value
    return out
