"""Partial training-config sections in the study YAML, checked with the shared schema.

The study's ``adapter:`` and ``train:`` (and each extra setting's) hold *some* keys of the
training config's sections; the settings fill in the rest. :func:`check_keys` validates such a
partial mapping with :mod:`llava_mole.schema` (unknown keys with did-you-mean, strict types,
numeric strings accepted for floats) against a model derived from the section's fields, and
refuses the keys the study sets itself.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal

import pydantic

from .. import schema

__all__ = ["STUDY_OWNED", "check_keys"]

STUDY_OWNED = {
    "adapter.type": "set by each setting (MoLE settings use mole, the others lora)",
    "train.seed": "set per run from `seeds`",
    "train.report_to": "the study always uses [none]",
}
"""Keys the study sets itself; allowing them in the YAML would silently be overridden."""

_SCALARS: dict[Any, Any] = {
    int: schema.Int,
    float: schema.Float,
    bool: schema.Bool,
    str: schema.Str,
}


def _schema_type(tp: Any) -> Any:
    """The schema's value type for a dataclass annotation (``float`` -> ``schema.Float``)."""
    origin = typing.get_origin(tp)
    if tp in _SCALARS:
        return _SCALARS[tp]
    if origin is Literal:
        return tp
    if origin in (typing.Union, types.UnionType):
        args = tuple(_schema_type(a) for a in typing.get_args(tp))
        return functools.reduce(lambda a, b: a | b, args)
    if origin is list:
        (item,) = typing.get_args(tp)
        return list[_schema_type(item)]  # type: ignore[misc]
    if origin is dict:
        return dict[str, Any]
    if tp is type(None):
        return type(None)
    return Any


@functools.cache
def _partial_model(cls: type, section: str) -> type[pydantic.BaseModel]:
    """A pydantic model of ``cls``'s fields, each optional, without the study-owned keys."""
    hints = typing.get_type_hints(cls)
    fields = {
        f.name: (_schema_type(hints[f.name]), None)
        for f in dataclasses.fields(cls)
        if f"{section}.{f.name}" not in STUDY_OWNED
    }
    return pydantic.create_model(  # type: ignore[call-overload]
        f"Partial{cls.__name__}", __config__=schema.SCHEMA_CONFIG, **fields
    )


def check_keys(data: Any, cls: type, prefix: str) -> dict[str, Any]:
    """Validate a partial section (``None`` reads as empty).

    Args:
        data: the mapping from the YAML.
        cls: the training config's section dataclass (``AdapterSection``, ``TrainSection``).
        prefix: its dotted key (``adapter``, ``extra_settings[0].train``).

    Returns:
        The given keys only, with their values converted (numeric strings to floats).

    Raises:
        schema.SchemaError: one line naming the dotted key.
    """
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise schema.SchemaError(f"{prefix}: expected a mapping (got {data!r})")
    section = prefix.rsplit(".", 1)[-1]
    for key in data:
        if f"{section}.{key}" in STUDY_OWNED:
            raise schema.SchemaError(
                f"{prefix}.{key}: not allowed here: {STUDY_OWNED[f'{section}.{key}']}"
            )
    model = schema.validate(_partial_model(cls, section), data, root=prefix)
    return model.model_dump(exclude_unset=True)
