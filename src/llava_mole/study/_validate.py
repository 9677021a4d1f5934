"""Type and key checks of the study YAML's sections: one-line errors naming the dotted key.

Every check raises :class:`~llava_mole.study.errors.StudyConfigError` as
``<file>: <dotted key>: <message>``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal, get_args, get_origin

from .errors import StudyConfigError

__all__ = ["STUDY_OWNED", "check_dataclass", "check_mapping", "check_section", "check_type", "fail"]

# Set by the study itself; allowing them in the YAML would silently be overridden.
STUDY_OWNED = {
    "adapter.type": "set by each setting (MoLE settings use mole, the others lora)",
    "train.seed": "set per run from `seeds`",
    "train.report_to": "the study always uses [none]",
}


def fail(where: str, key: str, message: str) -> StudyConfigError:
    """The error ``<file>: <dotted key>: <message>``."""
    return StudyConfigError(f"{where}: {key}: {message}")


def check_type(where: str, key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints accepted for floats); returns it."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise fail(where, key, f"must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = [o for o in get_args(tp) if o is not type(None)]
        if value is None:
            if type(None) in get_args(tp):
                return None
            raise fail(where, key, "must not be null")
        error: StudyConfigError | None = None
        for option in options:
            try:
                return check_type(where, key, value, option)
            except StudyConfigError as err:
                error = error or err
        assert error is not None
        raise error
    if origin is list:
        (item,) = get_args(tp)
        if not isinstance(value, list):
            raise fail(where, key, f"expected a list, got {value!r}")
        return [check_type(where, f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise fail(where, key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(where, key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = ""
            if isinstance(value, str) and re.fullmatch(r"[-+]?\d+[eE][-+]?\d+", value):
                hint = " (YAML reads 2e-3 as text; write 2.0e-3)"
            raise fail(where, key, f"expected a number, got {value!r}{hint}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail(where, key, f"expected a string, got {value!r}")
        return value
    raise fail(where, key, f"unsupported type {tp}")  # pragma: no cover


def check_mapping(where: str, key: str, value: Any) -> dict[str, Any]:
    """``value`` as a mapping (null reads as empty); anything else is an error naming ``key``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise fail(where, key, f"expected a mapping, got {value!r}")
    return value


def check_section(where: str, prefix: str, data: Any, cls: type) -> dict[str, Any]:
    """Validate keys and value types of a training-config section given as a mapping.

    Args:
        where: the file name for messages.
        prefix: the dotted key of the section (e.g. ``extra_settings[0].adapter``).
        data: the mapping from the YAML.
        cls: the training config's section dataclass.

    Returns:
        The checked mapping (ints converted to floats where a float is expected).
    """
    data = check_mapping(where, prefix, data)
    hints = typing.get_type_hints(cls)
    section = prefix.rsplit(".", 1)[-1]
    names = [f.name for f in dataclasses.fields(cls)]
    allowed = [n for n in names if f"{section}.{n}" not in STUDY_OWNED]
    out = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}"
        if f"{section}.{key}" in STUDY_OWNED:
            raise fail(where, dotted, f"not allowed here: {STUDY_OWNED[f'{section}.{key}']}")
        if key not in names:
            raise fail(where, dotted, f"unknown key (known: {', '.join(allowed)})")
        out[key] = check_type(where, dotted, value, hints[key])
    return out


def check_dataclass(where: str, prefix: str, data: Any, cls: type) -> Any:
    """Build the study section ``cls`` from a mapping, checking keys and value types."""
    data = check_mapping(where, prefix, data)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise fail(where, f"{prefix}.{key}", f"unknown key (known: {', '.join(names)})")
    return cls(**{k: check_type(where, f"{prefix}.{k}", v, hints[k]) for k, v in data.items()})
