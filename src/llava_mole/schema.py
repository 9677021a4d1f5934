"""One schema for every YAML file of the project (train, study, mixture, adapter).

Every config is a pydantic v2 type: a :class:`Schema` model, a :func:`section` (a pydantic
dataclass, for configs that are also used as plain dataclasses) or a stdlib dataclass whose
fields are annotated with the types below (``MoLEConfig``). Unknown keys are refused
(``extra="forbid"``) and every problem is reported the same way, as one line::

    train.max_stepz: unknown key (did you mean 'max_steps'?)
    train.max_steps: expected an integer (got 'ten')
    train.collapse_threshold: must be in [0, 1) (got 1.5)

Typical use::

    from llava_mole import schema

    class Eval(schema.Schema):
        max_new_tokens: schema.Int = 16
        temperature: Annotated[schema.Float, schema.at_least(0)] = 0.0

    config = schema.load(Eval, "eval.yaml", ["max_new_tokens=32"], root="eval")

The value types are strict where YAML is unambiguous and lenient where it is not:

* :data:`Int`, :data:`Bool`, :data:`Str`: exactly that YAML type (``true`` is not ``1``,
  ``"5"`` is not ``5``).
* :data:`Float`: any number, or a string that is one. YAML 1.1 (PyYAML) reads ``5e-4``
  and ``2e-3`` (no dot) as *strings*; every float field accepts them, everywhere.
* :data:`StrList`: a list of strings; a single string is a one-item list.
* Plain ``tuple[...]`` fields accept YAML lists.

Ranges are field metadata: :func:`at_least`, :func:`above`, :func:`between`; their
message is the rule (``must be >= 1``).

API (stable; other modules build on it): :class:`SchemaError`, :class:`Schema`,
:data:`SCHEMA_CONFIG`, :func:`section`, :data:`Int`, :data:`Float`, :data:`Bool`,
:data:`Str`, :data:`StrList`, :data:`StrTuple`, :func:`at_least`, :func:`above`, :func:`between`,
:func:`read_yaml`, :func:`apply_overrides`, :func:`validate`, :func:`load`,
:func:`error_line`, :func:`did_you_mean`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import pydantic.dataclasses
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Strict,
    TypeAdapter,
    ValidationError,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

T = TypeVar("T")

__all__ = [
    "SCHEMA_CONFIG",
    "Bool",
    "Float",
    "Int",
    "Schema",
    "SchemaError",
    "Str",
    "StrList",
    "StrTuple",
    "above",
    "apply_overrides",
    "at_least",
    "between",
    "did_you_mean",
    "error_line",
    "load",
    "read_yaml",
    "section",
    "validate",
]


class SchemaError(ValueError):
    """A config problem, as one line naming the dotted key, the bad value and what is expected."""


# ---- value types ---------------------------------------------------------------------------

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.IGNORECASE)


def _number(value: Any) -> Any:
    """Numeric strings (``"2e-3"``) and ints become floats; anything else is left to pydantic."""
    if isinstance(value, bool):
        raise PydanticCustomError("float_type", "expected a number")
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, int):
        return float(value)
    return value


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Int = Annotated[int, Strict()]
"""An integer (not a bool, not a float, not a string)."""
Bool = Annotated[bool, Strict()]
"""``true`` / ``false`` only."""
Str = Annotated[str, Strict()]
"""A string (a YAML number is not a string)."""
Float = Annotated[float, BeforeValidator(_number), Strict()]
"""A number: ints, floats and numeric strings (``2e-3``); not a bool."""
StrList = Annotated[list[Str], BeforeValidator(_one_or_many)]
"""A list of strings; one string is a one-item list."""
StrTuple = Annotated[tuple[Str, ...], BeforeValidator(_one_or_many)]
""":data:`StrList` as a tuple (for frozen-looking dataclass fields)."""


def _rule(text: str, ok: Any, hint: str = "") -> AfterValidator:
    def check(value: Any) -> Any:
        if value is not None and not ok(value):
            raise PydanticCustomError("out_of_range", text + (f" ({hint})" if hint else ""))
        return value

    return AfterValidator(check)


def at_least(bound: float, hint: str = "") -> AfterValidator:
    """Range metadata: ``value >= bound`` (``None`` passes: it means 'off')."""
    return _rule(f"must be >= {bound}", lambda v: v >= bound, hint)


def above(bound: float, hint: str = "") -> AfterValidator:
    """Range metadata: ``value > bound`` (``None`` passes)."""
    return _rule(f"must be > {bound}", lambda v: v > bound, hint)


def between(
    low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> AfterValidator:
    """Range metadata: ``low <= value <= high`` (``<`` at an end marked open)."""
    shown = f"must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def inside(value: float) -> bool:
        above_low = value > low if low_open else value >= low
        return above_low and (value < high if high_open else value <= high)

    return _rule(shown, inside)


# ---- config classes ------------------------------------------------------------------------

SCHEMA_CONFIG = ConfigDict(extra="forbid", validate_assignment=True, validate_default=False)
"""The pydantic settings every config class uses (unknown keys refused, assignments checked)."""


class Schema(BaseModel):
    """Base class of config models: unknown keys are an error, assignments are validated."""

    model_config = SCHEMA_CONFIG


def section(cls: type[T] | None = None, *, error: type[SchemaError] | None = None) -> Any:
    """Class decorator: a pydantic dataclass with :data:`SCHEMA_CONFIG`.

    For config sections that other code also uses as dataclasses (``dataclasses.fields``,
    ``dataclasses.asdict``). Keyword construction is validated too and raises ``error``
    (default :class:`SchemaError`) with the one-line message. Use as ``@section`` or
    ``@section(error=MyConfigError)``.
    """
    if cls is None:
        return functools.partial(section, error=error)
    built = pydantic.dataclasses.dataclass(cls, config=SCHEMA_CONFIG)
    validated_init = built.__init__
    kind = error or SchemaError

    @functools.wraps(validated_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            validated_init(self, *args, **kwargs)
        except ValidationError as err:
            raise kind(error_line(err, built)) from None

    built.__init__ = __init__
    return built


# ---- errors --------------------------------------------------------------------------------

_EXPECTED = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true/false",
    "bool_parsing": "expected true/false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "dataclass_type": "expected a mapping",
}
_UNKNOWN = ("extra_forbidden", "unexpected_keyword_argument")
# Union members show up in error locations as type tags ('str', 'function-after[...]').
_CLASS_PREFIX = re.compile(r"^[A-Z]\w*\.(?=\w)")
_TAG = re.compile(r"^(str|int|float|bool|none|list|tuple|dict|.*[\[\-].*)$")


def _one_of(expected: str, value: Any) -> str:
    """``must be one of 'a' or 'b'``; a long list shortened to the closest choice."""
    choices = re.findall(r"'([^']*)'", expected)
    if len(choices) <= 8:
        return f"must be one of {expected}"
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"not one of the {len(choices)} choices ({', '.join(choices[:4])}, ...{hint})"


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, or ``(known: a, b, ...)``."""
    known = sorted(set(known))
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known: {', '.join(known)})" if 0 < len(known) <= 40 else ""


def _dotted(root: str, loc: Sequence[Any]) -> str:
    out = root
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TAG.match(str(part)):
            out = f"{out}.{part}" if out else str(part)
    return out or "config"


def _known_at(tp: Any, loc: Sequence[Any]) -> list[str]:
    """Field names of the mapping type reached by following ``loc`` from ``tp``.

    An index (``datasets[0]``) steps into a list's or tuple's item type, a key of a
    ``dict[str, X]`` into ``X``.
    """
    tp = _bare(tp)
    for part in loc:
        if _TAG.match(str(part)):
            continue
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (list, tuple, set, frozenset) and isinstance(part, int) and args:
            tp = _bare(args[0])
            continue
        if origin is dict and len(args) == 2:
            tp = _bare(args[1])
            continue
        fields = _field_types(tp)
        if part not in fields:
            return []
        tp = _bare(fields[part])
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp, include_extras=True)
        return [_alias(hints.get(f.name)) or f.name for f in dataclasses.fields(tp) if f.init]
    return []


def _bare(tp: Any) -> Any:
    """``tp`` without ``Annotated`` metadata and ``| None`` (the first other union member)."""
    while typing.get_origin(tp) in (Annotated, typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
    return tp


def _alias(hint: Any) -> str | None:
    """The pydantic alias in an ``Annotated[..., Field(alias=...)]`` hint."""
    for meta in getattr(hint, "__metadata__", ()):
        if isinstance(meta, FieldInfo) and meta.alias:
            return meta.alias
    return None


def _field_types(tp: Any) -> dict[str, Any]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return {k: f.annotation for k, f in tp.model_fields.items()}
    if dataclasses.is_dataclass(tp):
        return typing.get_type_hints(tp, include_extras=True)
    return {}


def error_line(err: ValidationError, tp: Any = None, root: str = "") -> str:
    """The first problem of ``err`` as one line: ``dotted.key: what is wrong (got value)``.

    Args:
        err: what pydantic raised.
        tp: the validated type (for "did you mean" on unknown keys).
        root: prefix of every location (e.g. ``"adapter"``).
    """
    first = err.errors(include_url=False)[0]
    kind, loc, value = first["type"], first["loc"], first.get("input")
    where = _dotted(root, loc)
    if kind in _UNKNOWN:
        parent = [p for p in loc[:-1]]
        return f"{where}: unknown key{did_you_mean(str(loc[-1]), _known_at(tp, parent))}"
    if kind == "missing":
        return f"{where}: required"
    if kind == "value_error":
        # A class's own rules name the field as ``ClassName.field``: say where it is instead.
        message = str(first["ctx"]["error"])
        return _CLASS_PREFIX.sub(f"{where}.", message, count=1) if loc or root else message
    if kind in ("literal_error", "enum"):
        return f"{where}: {_one_of(first['ctx']['expected'], value)} (got {value!r})"
    if value is None and kind in _EXPECTED:
        return f"{where}: must not be null"
    return f"{where}: {_EXPECTED.get(kind, first['msg'])} (got {value!r})"


def validate(tp: type[T], data: Any, *, root: str = "") -> T:
    """Validate ``data`` (e.g. parsed YAML) as ``tp``; raise :class:`SchemaError` (one line).

    Args:
        tp: a :class:`Schema`, a :func:`section`, or a dataclass annotated with this module's
            types.
        data: the mapping to validate.
        root: dotted prefix of the locations in messages.
    """
    try:
        return TypeAdapter(tp).validate_python(data)
    except ValidationError as err:
        raise SchemaError(error_line(err, tp, root)) from None


# ---- files and overrides -------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping (an empty file is ``{}``).

    Raises:
        SchemaError: the file is missing, not valid YAML or not a mapping (one line).
    """
    path = Path(path)
    if not path.is_file():
        why = "is a folder, not a file" if path.is_dir() else "not found"
        raise SchemaError(f"{path}: {why}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SchemaError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SchemaError(f"{path}: expected a mapping at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``--set``-style ``dotted.key=value`` overrides to ``data`` (in place).

    Values are parsed as YAML (``3``, ``2.0e-3``, ``true``, ``null``, ``[a, b]``); text that is
    not valid YAML stays a string. Types are checked when the result is validated.
    """
    for item in overrides:
        if "=" not in item:
            raise SchemaError(f"--set {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise SchemaError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


def load(
    tp: type[T],
    path: str | Path | None,
    overrides: Iterable[str] = (),
    *,
    root: str = "",
) -> T:
    """Read a YAML file (``None``: start from ``{}``), apply overrides, validate as ``tp``."""
    data = read_yaml(path) if path is not None else {}
    return validate(tp, apply_overrides(data, overrides), root=root)
