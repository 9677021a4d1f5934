"""The shared config schema: value types, ranges, one-line errors, YAML files and overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Literal

import pytest

from llava_mole import schema
from llava_mole.schema import SchemaError


class Inner(schema.Schema):
    steps: Annotated[schema.Int, schema.at_least(1)] = 1
    share: Annotated[schema.Float, schema.between(0, 1, high_open=True)] = 0.5
    lr: Annotated[schema.Float | None, schema.above(0, "null turns it off")] = None
    flag: schema.Bool = False
    kind: Literal["a", "b"] = "a"
    names: schema.StrList = ["x"]


class Outer(schema.Schema):
    inner: Inner = Inner()
    name: schema.Str = ""


@schema.section
class Sec:
    rate: schema.Float = 1.0
    count: schema.Int = 2


@dataclass
class Plain:
    __pydantic_config__ = schema.SCHEMA_CONFIG
    size: schema.Int = 3
    targets: tuple[schema.Str, ...] = ("q",)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.size > 10:
            raise ValueError("Plain.size: must be <= 10")


def test_float_fields_accept_numbers_ints_and_numeric_strings():
    # PyYAML reads 2e-3 (no dot) as a string: it is a number all the same.
    assert schema.validate(Inner, {"share": "2e-3"}).share == pytest.approx(0.002)
    assert schema.validate(Inner, {"share": 0}).share == 0.0
    assert schema.validate(Sec, {"rate": "5e-4"}).rate == pytest.approx(5e-4)
    assert schema.load(Inner, None, ["lr=2e-3"]).lr == pytest.approx(0.002)


@pytest.mark.parametrize(
    "data,message",
    [
        ({"steps": "5"}, "inner.steps: expected an integer (got '5')"),
        ({"steps": True}, "inner.steps: expected an integer (got True)"),
        ({"steps": 2.5}, "inner.steps: expected an integer (got 2.5)"),
        ({"share": True}, "inner.share: expected a number (got True)"),
        ({"share": "lots"}, "inner.share: expected a number (got 'lots')"),
        ({"flag": 1}, "inner.flag: expected true/false (got 1)"),
        ({"kind": "c"}, "inner.kind: must be one of 'a' or 'b' (got 'c')"),
        ({"names": [1]}, "inner.names[0]: expected a string (got 1)"),
        ({"steps": 0}, "inner.steps: must be >= 1 (got 0)"),
        ({"share": 1.0}, "inner.share: must be in [0, 1) (got 1.0)"),
        ({"lr": 0}, "inner.lr: must be > 0 (null turns it off) (got 0)"),
        ({"steps": None}, "inner.steps: must not be null"),
        ({"stepz": 3}, "inner.stepz: unknown key (did you mean 'steps'?)"),
    ],
)
def test_errors_are_one_line_with_location_value_and_expectation(data, message):
    with pytest.raises(SchemaError) as info:
        schema.validate(Outer, {"inner": data}, root="")
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_unknown_key_far_from_any_lists_the_known_ones():
    with pytest.raises(SchemaError, match=r"^cfg.zzz: unknown key \(known: inner, name\)$"):
        schema.validate(Outer, {"zzz": 1}, root="cfg")


class Listed(schema.Schema):
    items: list[Inner] = []
    by_name: dict[str, Inner] = {}


@pytest.mark.parametrize(
    "data,message",
    [
        ({"items": [{}, {"stepz": 1}]}, "items[1].stepz: unknown key (did you mean 'steps'?)"),
        ({"by_name": {"a": {"flg": 1}}}, "by_name.a.flg: unknown key (did you mean 'flag'?)"),
    ],
)
def test_unknown_keys_inside_lists_and_dicts_get_suggestions(data, message):
    with pytest.raises(SchemaError) as info:
        schema.validate(Listed, data)
    assert str(info.value) == message


def test_no_empty_list_of_known_keys():
    assert schema.did_you_mean("x", []) == ""


def test_none_is_allowed_where_the_type_says_so():
    assert schema.validate(Inner, {"lr": None}).lr is None


def test_one_string_is_a_one_item_list():
    assert schema.validate(Inner, {"names": "solo"}).names == ["solo"]


def test_assignment_is_validated():
    inner = Inner()
    with pytest.raises(ValueError):
        inner.steps = "many"


def test_sections_are_dataclasses_and_validate_on_construction():
    assert dataclasses.asdict(Sec(rate="1e-2")) == {"rate": 0.01, "count": 2}
    with pytest.raises(ValueError):
        Sec(count="two")
    with pytest.raises(SchemaError, match=r"^sec.counts: unknown key \(did you mean 'count'\?\)$"):
        schema.validate(Sec, {"counts": 1}, root="sec")


def test_plain_dataclasses_keep_their_own_rules():
    plain = schema.validate(Plain, {"targets": ["a", "b"]})
    assert plain.targets == ("a", "b")
    with pytest.raises(SchemaError, match=r"^Plain.size: must be <= 10$"):
        schema.validate(Plain, {"size": 11})
    with pytest.raises(SchemaError, match=r"^p.targets: expected a list \(got 'ab'\)$"):
        schema.validate(Plain, {"targets": "ab"}, root="p")


def test_overrides_are_yaml_values_and_create_sections(tmp_path):
    data = schema.apply_overrides(
        {"inner": None}, ["inner.steps=3", "inner.names=[a, b]", "inner.lr=null", "name=[not yaml"]
    )
    assert data == {"inner": {"steps": 3, "names": ["a", "b"], "lr": None}, "name": "[not yaml"}
    with pytest.raises(SchemaError, match="expected dotted.key=value"):
        schema.apply_overrides({}, ["steps"])
    with pytest.raises(SchemaError, match="'name' is not a section"):
        schema.apply_overrides({"name": "x"}, ["name.sub=1"])


def test_load_reads_yaml_and_reports_file_problems_in_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  steps: 4\n  lr: 5e-4\n")
    config = schema.load(Outer, path, ["inner.flag=true"])
    assert (config.inner.steps, config.inner.lr, config.inner.flag) == (4, 5e-4, True)
    with pytest.raises(SchemaError, match="not found"):
        schema.load(Outer, tmp_path / "missing.yaml")
    with pytest.raises(SchemaError, match="is a folder, not a file"):
        schema.load(Outer, tmp_path)
    path.write_text("- a\n- b\n")
    with pytest.raises(SchemaError, match="expected a mapping at the top level"):
        schema.load(Outer, path)
    path.write_text("inner: [\n")
    with pytest.raises(SchemaError, match="invalid YAML"):
        schema.load(Outer, path)


def test_did_you_mean():
    assert schema.did_you_mean("lerning_rate", ["learning_rate", "seed"]) == (
        " (did you mean 'learning_rate'?)"
    )
    assert schema.did_you_mean("zzz", ["a", "b"]) == " (known: a, b)"


class Holder(schema.Schema):
    plain: Plain = Plain()


def test_a_class_rule_is_named_by_its_location():
    with pytest.raises(SchemaError, match=r"^cfg.plain.size: must be <= 10$"):
        schema.validate(Holder, {"plain": {"size": 11}}, root="cfg")


class MyError(SchemaError):
    pass


@schema.section(error=MyError)
class Strict:
    count: schema.Int = 1
    sec: Sec = field(default_factory=Sec)


def test_section_construction_raises_its_error_class_in_one_line():
    with pytest.raises(MyError, match=r"^count: expected an integer \(got 'x'\)$"):
        Strict(count="x")
    with pytest.raises(MyError, match=r"^sec.count: expected an integer"):
        Strict(sec={"count": 1.5})
    assert Strict(sec={"rate": "1e-3"}).sec.rate == pytest.approx(1e-3)


def test_mixture_unknown_keys_use_the_schema_suggestion(tmp_path):
    from llava_mole.data.formats import DataConfigError
    from llava_mole.data.mixture import load_mixture

    path = tmp_path / "mix.yaml"
    path.write_text("datasets: [{domain: a, train: a.json, tkae: 3}]\n")
    with pytest.raises(
        DataConfigError, match=r"datasets\[0\].tkae: unknown key \(did you mean 'take'\?\)$"
    ):
        load_mixture(path)
