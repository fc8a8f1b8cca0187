"""One input field: its declaration (`Param`: type, default, bounds or choices, one-sentence description) and the
check of a value against it (`coerce`), with the sentence a user reads when it fails. schemas.py declares
every field of both modes with these and adds the rules between fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from errors import InputError, shorten


@dataclass(frozen=True)
class Param:
    """One input field: what it is, its default and what values are allowed."""

    type: type
    description: str
    default: Any = None
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    multiple_of: int | None = None
    remainder: int = 0  # with multiple_of: value % multiple_of == remainder (4k+1 frames)
    choices: tuple | None = None
    max_length: int | None = None
    items: dict[str, Param] | None = None  # with type list: each entry is an object with these fields
    max_items: int | None = None
    names_file: bool = False  # str: the value becomes part of a file path, which cannot hold a NUL

    def allowed(self) -> str:
        """What values are allowed, as words; used in errors and in the README tables."""
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.type is list:
            keys = [f"{key} ({sub.allowed()}" + (", required)" if sub.required else
                                                 ")" if sub.default is None else f", default {num(sub.default)})")
                    for key, sub in self.items.items()]
            return f"a list of at most {self.max_items} objects: " + "; ".join(keys)
        words = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[self.type]
        parts = [words]
        if self.minimum is not None and self.maximum is not None:
            lo = "above" if self.exclusive_minimum else "from"
            hi = "below" if self.exclusive_maximum else "to"
            parts.append(f"{lo} {num(self.minimum)} {hi} {num(self.maximum)}")
        elif self.minimum is not None:
            parts.append(f"{'above' if self.exclusive_minimum else 'of at least'} {num(self.minimum)}")
        if self.multiple_of and self.remainder:
            parts.append(f"of the form {self.multiple_of}k+{self.remainder}")
        elif self.multiple_of:
            parts.append(f"that is a multiple of {self.multiple_of}")
        if self.max_length:
            parts.append(f"of at most {self.max_length:,} characters")
        return " ".join(parts)


def num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _received(value: Any) -> str:
    """'string 'abc'', 'number 3', or 'null' (whose repr would only repeat it as None)."""
    return "null" if value is None else f"{kind(value)} {shorten(value)}"


def _check_text(name: str, param: Param, value: str) -> None:
    """Text the libraries below can take: UTF-8 encodable (JSON can carry a lone UTF-16 surrogate, "\\ud800",
    which tokenizers, file systems and HTTP refuse) and, where it becomes a path, without NUL."""
    if not value.isascii():  # the common case costs nothing, even for 28 M characters of base64
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InputError(f"Field '{name}' must be valid Unicode text, got {shorten(value)}, which holds a lone "
                             f"UTF-16 surrogate ({value[err.start]!r}) at character {err.start + 1}; send whole "
                             f"characters (a complete surrogate pair, or the text as UTF-8).") from None
    if param.names_file and "\0" in value:
        raise InputError(f"Field '{name}' must not hold a NUL character, got {shorten(value)} (NUL at character "
                         f"{value.index(chr(0)) + 1}); no file path can hold one.")


def coerce(name: str, param: Param, value: Any) -> Any:
    """Check one field's type and bounds; returns the value in its Python type."""
    def bad() -> InputError:
        return InputError(f"Field '{name}' must be {param.allowed()}, got {_received(value)}.")

    if param.type is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON clients often send 25.0
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad()
    elif param.type is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise bad()
        value = float(value)
    elif param.type is list:
        if not isinstance(value, list):
            raise bad()
        return coerce_items(name, param, value)
    elif not isinstance(value, param.type):
        raise bad()
    elif param.type is str:
        _check_text(name, param, value)

    if param.choices is not None and value not in param.choices:
        raise bad()
    if param.max_length is not None and len(value) > param.max_length:
        raise bad()
    if param.minimum is not None and (value <= param.minimum if param.exclusive_minimum else value < param.minimum):
        raise bad()
    if param.maximum is not None and (value >= param.maximum if param.exclusive_maximum else value > param.maximum):
        raise bad()
    if param.multiple_of and value % param.multiple_of != param.remainder:
        raise bad()
    return value


def coerce_items(name: str, param: Param, value: list) -> list[dict[str, Any]]:
    """A list of objects: its length, then each entry's fields, named like 'loras[1].scale' in errors."""
    if len(value) > param.max_items:
        raise InputError(f"Field '{name}' holds {len(value)} entries; at most {param.max_items} are allowed.")
    entries = []
    for i, item in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise InputError(f"Field '{where}' must be an object with {', '.join(param.items)}, got "
                             f"{_received(item)}.")
        unknown = sorted(str(k) for k in item if k not in param.items)
        if unknown:
            raise InputError(f"Field '{where}' has the unknown key {shorten(unknown[0])}; allowed keys are: "
                             f"{', '.join(param.items)}.")
        entry = {}
        for key, sub in param.items.items():
            if item.get(key) is None:
                if sub.required:
                    raise InputError(f"Field '{where}.{key}' is required and must be {sub.allowed()}.")
                entry[key] = sub.default
            else:
                entry[key] = coerce(f"{where}.{key}", sub, item[key])
        entries.append(entry)
    return entries
