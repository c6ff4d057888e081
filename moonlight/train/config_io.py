"""A config made of dataclass sections: read from a TOML file and `--section.key=value` command-line
overrides, written back as TOML. Generic: `moonlight.train.config` names the sections and their checks.

Values are checked against the fields' type hints (an int is accepted for a float; inf and nan are
not); unknown sections/keys and wrongly typed values raise ConfigError naming the key, listing the
valid keys of its section and suggesting the closest name. A command-line value is a TOML value (a
bare word is a string; a list may drop its brackets: `--parallelism.pp_layout=14,13`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import math
import textwrap
import tomllib
import types
import typing
from typing import Any, Literal

from moonlight.errors import ConfigError

# ---------------------------------------------------------------------- values


def type_name(tp: Any) -> str:
    """A field type as error messages name it: "one of 'a', 'b'", "list[int]", "table", "float"."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        return "table"
    if origin in (typing.Union, types.UnionType):
        return type_name(next(a for a in typing.get_args(tp) if a is not type(None)))
    return getattr(tp, "__name__", str(tp))


class BadValue(Exception):  # noqa: N818 (a control-flow signal, never shown to a user)
    """A value that does not fit its field's type (raised by `coerce`)."""


def coerce(value: Any, tp: Any) -> Any:
    """Check a TOML value against a field type (an int is accepted for a float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[0]):
            return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [coerce(v, typing.get_args(tp)[0]) for v in value]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif origin in (typing.Union, types.UnionType):  # `X | None`: TOML has no null, so the value is an X
        return coerce(value, next(a for a in typing.get_args(tp) if a is not type(None)))
    elif tp is float:  # inf and nan are never meaningful settings (lr=inf trains on garbage)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise BadValue


def _parse_literal(text: str) -> Any:
    """A TOML literal; bare words (and anything else that is not TOML) stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()


_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _parse_cli(text: str, tp: Any) -> Any:
    """A command-line value for a field of type tp (then checked by `coerce`)."""
    if tp is str:
        return text
    if tp is bool:
        return _BOOL_WORDS.get(text.strip().lower(), text)
    if typing.get_origin(tp) is list and not text.strip().startswith("["):  # 14,13 means [14, 13]
        return [_parse_literal(x) for x in text.split(",") if x.strip()]
    return _parse_literal(text)


def field_types(cls: type) -> dict[str, Any]:
    """A dataclass's field names -> their resolved type hints."""
    return typing.get_type_hints(cls)


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unknown_section(sections: dict[str, type], sec: str, where: str) -> ConfigError:
    valid = list(sections)
    return ConfigError(
        f"unknown config section [{sec}]{where}; valid sections: {', '.join(valid)}{_suggest(sec, valid)}"
    )


def _unknown_key(sections: dict[str, type], sec: str, key: str, where: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(sections[sec])]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{sec}.{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{sec}.{key}'{where}; valid keys of [{sec}]: {', '.join(valid)}{hint}")


def _bad_type(sec: str, key: str, tp: Any, value: Any, where: str) -> ConfigError:
    shown = value if isinstance(value, str) else repr(value)
    finite = " (a finite number)" if tp is float else ""
    msg = f"config key '{sec}.{key}' expects {type_name(tp)}{finite}, got {type(value).__name__} {shown!r}{where}"
    if typing.get_origin(tp) is Literal and isinstance(value, str):
        msg += _suggest(value, [str(c) for c in typing.get_args(tp)])
    return ConfigError(msg)


# ---------------------------------------------------------------------- loading


def apply_table(cfg: Any, sections: dict[str, type], data: dict[str, Any], where: str) -> None:
    """Set the values of a TOML document's [section] tables on cfg (one attribute per section);
    `where` ends every error message (which file)."""
    for sec, table in data.items():
        if sec not in sections:
            raise _unknown_section(sections, sec, where)
        if not isinstance(table, dict):
            raise ConfigError(f"config entry '{sec}'{where} must be a [{sec}] table, got {table!r}")
        obj = getattr(cfg, sec)
        hints = field_types(sections[sec])
        for key, value in table.items():
            if key not in hints:
                raise _unknown_key(sections, sec, key, where)
            try:
                setattr(obj, key, coerce(value, hints[key]))
            except BadValue:
                raise _bad_type(sec, key, hints[key], value, where) from None


def _split_overrides(overrides: list[str]) -> list[tuple[str, str | None, str]]:
    """['--a.b=1', '--c.d', '2', '--e.f'] -> [(a.b, '1', arg), (c.d, '2', arg), (e.f, None, arg)]."""
    out: list[tuple[str, str | None, str]] = []
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected command-line argument {arg!r}; overrides look like --section.key=value")
        body = arg[2:]
        if "=" in body:
            name, value = body.split("=", 1)
            out.append((name, value, arg))
            i += 1
        elif i + 1 < len(overrides) and not (
            overrides[i + 1].startswith("--") and len(overrides[i + 1]) > 2 and not _is_number(overrides[i + 1])
        ):
            out.append((body, overrides[i + 1], f"{arg} {overrides[i + 1]}"))
            i += 2
        else:
            out.append((body, None, arg))  # bare flag: true for a bool key
            i += 1
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _apply_override(cfg: Any, sections: dict[str, type], name: str, value: str | None, arg: str) -> None:
    where = f" (from command line {arg!r})"
    parts = name.split(".")
    if len(parts) < 2:
        raise ConfigError(f"bad override {arg!r}: expected --section.key=value{where}")
    sec, key, rest = parts[0], parts[1], parts[2:]
    if sec not in sections:
        raise _unknown_section(sections, sec, where)
    hints = field_types(sections[sec])
    if key not in hints:
        raise _unknown_key(sections, sec, key, where)
    tp = hints[key]
    obj = getattr(cfg, sec)
    if typing.get_origin(tp) is dict:
        if not rest:
            if value is None:
                raise _bad_type(sec, key, tp, "", where)
            try:
                table = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                table = None
            if not isinstance(table, dict):
                raise _bad_type(sec, key, tp, value, where)
            getattr(obj, key).update(table)
            return
        if value is None:
            raise ConfigError(f"override {arg!r} needs a value{where}")
        getattr(obj, key)[".".join(rest)] = _parse_literal(value)
        return
    if rest:
        raise _unknown_key(sections, sec, name.split(".", 1)[1], where)
    if value is None:
        if tp is bool:
            setattr(obj, key, True)
            return
        raise ConfigError(f"override {arg!r} needs a value: --{sec}.{key}=<{type_name(tp)}>")
    try:
        setattr(obj, key, coerce(_parse_cli(value, tp), tp))
    except BadValue:
        raise _bad_type(sec, key, tp, value, where) from None


def apply_overrides(cfg: Any, sections: dict[str, type], overrides: list[str]) -> None:
    """Set `--section.key=value` (or `--section.key value`, or a bare `--section.flag`) overrides on cfg."""
    for name, value, arg in _split_overrides(overrides):
        _apply_override(cfg, sections, name, value, arg)


def read_toml(path: str) -> dict[str, Any]:
    """A TOML file's document; a missing, unreadable or malformed file is one ConfigError naming it."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; pass a .toml file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (a TOML file must be): {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}") from None


# ---------------------------------------------------------------------- help


def field_docs(cls: type) -> dict[str, str]:
    """A dataclass's field names -> the docstring written under each field (whitespace joined), read
    from its source."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for field_node, doc in zip(body, body[1:]):
        if (
            isinstance(field_node, ast.AnnAssign)
            and isinstance(doc, ast.Expr)
            and isinstance(doc.value, ast.Constant)
            and isinstance(doc.value.value, str)
        ):
            docs[field_node.target.id] = " ".join(doc.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def describe_sections(sections: dict[str, type], width: int = 100) -> str:
    """Every key of every section: `key: type = default` and its description, for --help."""
    lines: list[str] = []
    for sec, cls in sections.items():
        lines.append(f"[{sec}]")
        hints, docs = field_types(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            default = _default(f)
            shown = "unset" if default is None else _toml_value(default)
            lines.append(f"  {f.name}: {type_name(hints[f.name])} = {shown}")
            lines += textwrap.wrap(docs.get(f.name, ""), width, initial_indent=" " * 6, subsequent_indent=" " * 6)
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------- TOML output


def to_toml(sections: dict[str, dict[str, Any]]) -> str:
    """{section: {key: value}} as a TOML document: a dict value is a [section.key] table; None is left out."""
    lines: list[str] = []
    for sec, values in sections.items():
        tables = []
        lines.append(f"[{sec}]")
        for key, value in values.items():
            if isinstance(value, dict):
                tables.append((key, value))
            elif value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        for key, table in tables:
            lines.append("")
            lines.append(f"[{sec}.{key}]")
            for k, v in table.items():
                if v is not None:
                    lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def _toml_key(k: str) -> str:
    if k and all(c.isalnum() or c in "_-" for c in k):
        return k
    return json.dumps(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"cannot write {v!r} to TOML")
