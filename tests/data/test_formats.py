"""Validation of LLaVA records: every kind of bad input is a counted skip (or a strict error)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import record, save_image, write_json
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llava_mole.data import DataError, LoadReport, Sample, Skip, load_llava_file, validate_record
from llava_mole.data.images import image_checker


def _validate(rec, root: Path, **kw):
    return validate_record(rec, index=0, source="x.json", image_root=root, **kw)


def test_valid_records_roles_and_meta(tmp_path):
    save_image(tmp_path / "a.png")
    rec = record(7, "a.png", answers=["cat", "a cat"], answer_type="other")
    sample = _validate(rec, tmp_path)
    assert isinstance(sample, Sample)
    assert sample.id == "7" and sample.image == tmp_path / "a.png" and sample.has_image
    assert sample.turns == [("user", "<image>\nwhat is this ?"), ("assistant", "a red cat")]
    assert sample.meta == {"answers": ["cat", "a cat"], "answer_type": "other"}
    text_only = _validate(record("t", turns=[("user", "hi"), ("assistant", "yes")]), tmp_path)
    assert isinstance(text_only, Sample) and text_only.image is None and not text_only.has_image
    # id defaults to the index
    assert (
        _validate({"conversations": rec["conversations"][:0] or text_only_convs()}, tmp_path).id
        == "0"
    )


def text_only_convs():
    return [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]


BAD = [
    ("not_a_dict", ["a", "list"]),
    ("bad_id", {"id": 1.5, "conversations": text_only_convs()}),
    ("bad_id", {"id": True, "conversations": text_only_convs()}),
    ("bad_image_field", {"id": "x", "image": 3, "conversations": text_only_convs()}),
    ("bad_image_field", {"id": "x", "image": ["a.png"], "conversations": text_only_convs()}),
    ("bad_conversations", {"id": "x", "conversations": "hi"}),
    ("bad_conversations", {"id": "x", "conversations": []}),
    ("bad_turn", {"id": "x", "conversations": ["hi", "yes"]}),
    ("bad_turn", {"id": "x", "conversations": [{"from": "human", "value": 3}]}),
    ("bad_turn", {"id": "x", "conversations": [{"from": "human"}]}),
    ("unknown_role", record("x", turns=[("human", "hi"), ("system", "yes")])),
    ("unknown_role", {"id": "x", "conversations": [{"from": None, "value": "hi"}]}),
    ("empty_text", record("x", turns=[("human", "hi"), ("gpt", "  ")])),
    ("bad_turn_order", record("x", turns=[("gpt", "hi"), ("human", "yes")])),
    ("bad_turn_order", record("x", turns=[("human", "hi"), ("human", "yes"), ("gpt", "a")])),
    ("bad_turn_order", record("x", turns=[("human", "hi"), ("gpt", "yes"), ("human", "a")])),
    ("bad_turn_order", record("x", turns=[("human", "hi")])),
    # image placeholder count must match the presence of an image
    ("image_placeholder_mismatch", record("x", "a.png", turns=[("human", "hi"), ("gpt", "a")])),
    (
        "image_placeholder_mismatch",
        record("x", "a.png", turns=[("human", "<image> <image> hi"), ("gpt", "a")]),
    ),
    (
        "image_placeholder_mismatch",
        record(
            "x", "a.png", turns=[("human", "hi"), ("gpt", "a"), ("human", "<image>"), ("gpt", "b")]
        ),
    ),
    ("image_placeholder_mismatch", record("x", turns=[("human", "<image>\nhi"), ("gpt", "a")])),
    ("image_placeholder_mismatch", record("x", turns=[("human", "hi"), ("gpt", "<image>")])),
    # paths escaping the image folder
    ("image_path_outside_root", record("x", "../outside.png")),
    ("image_path_outside_root", record("x", "sub/../../outside.png")),
    ("image_path_outside_root", record("x", "/etc/passwd")),
    ("missing_image", record("x", "nope.png")),
    ("unreadable_image", record("x", "corrupt.png")),
    ("unreadable_image", record("x", "text.jpg")),
]


@pytest.mark.parametrize(("reason", "rec"), BAD, ids=[f"{r}-{i}" for i, (r, _) in enumerate(BAD)])
def test_bad_records_are_counted_skips_and_strict_errors(tmp_path, reason, rec):
    root = tmp_path / "images"
    save_image(root / "a.png")
    save_image(tmp_path / "outside.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (root / "text.jpg").write_text("not an image")
    result = validate_record(
        rec, index=0, source="d.json", image_root=root, check_image=image_checker()
    )
    assert isinstance(result, Skip), result
    assert result.reason == reason

    # lenient loading counts it; strict loading raises naming the file, index and reason
    path = write_json(
        tmp_path / "d.json", [record("ok", turns=[("human", "hi"), ("gpt", "a")]), rec]
    )
    report = LoadReport()
    samples = load_llava_file(path, root, check_image=image_checker(), report=report)
    assert [s.id for s in samples] == ["ok"]
    assert report.skipped == {reason: 1}
    assert len(report.problems) == 1 and "d.json: sample 1" in report.problems[0]
    assert reason in report.summary()
    with pytest.raises(DataError, match=rf"d\.json: sample 1.*{reason}"):
        report.raise_if_problems()


def test_outside_images_allowed_on_request(tmp_path):
    save_image(tmp_path / "outside.png")
    root = tmp_path / "images"
    root.mkdir()
    for path in ("../outside.png", str(tmp_path / "outside.png")):
        sample = _validate(record("x", path), root, allow_outside_images=True)
        assert isinstance(sample, Sample) and sample.image.resolve() == tmp_path / "outside.png"


def test_jsonl_with_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps(record("a", turns=[("human", "hi"), ("gpt", "yes")]))
    path.write_text(f"{good}\n{{not json\n\n{good}\n")
    report = LoadReport()
    samples = load_llava_file(path, tmp_path, report=report)
    assert [s.index for s in samples] == [0, 2]
    assert report.skipped == {"bad_json_line": 1}
    assert "sample 1" in report.problems[0]


def test_unparsable_or_non_list_json_file(tmp_path):
    (tmp_path / "bad.json").write_text('[{"id": 1,')
    with pytest.raises(DataError, match=r"bad\.json: invalid JSON at line 1"):
        load_llava_file(tmp_path / "bad.json")
    (tmp_path / "obj.json").write_text('{"id": 1}')
    with pytest.raises(DataError, match="expected a JSON list"):
        load_llava_file(tmp_path / "obj.json")
    with pytest.raises(DataError, match="dataset file not found"):
        load_llava_file(tmp_path / "missing.json")


def test_strict_error_lists_first_ten_problems(tmp_path):
    path = write_json(tmp_path / "d.json", [["bad"]] * 12)
    report = LoadReport()
    load_llava_file(path, report=report)
    with pytest.raises(DataError) as info:
        report.raise_if_problems()
    message = str(info.value)
    assert message.count("not_a_dict") == 10 and "and 2 more" in message


# ------------------------------------------------------------------ property test
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
roles = st.sampled_from(["human", "gpt", "user", "assistant", "system", "GPT", ""]) | json_values
texts = st.sampled_from(["<image>\nwhat", "hi", "", "<image>", "a <image> b <image>"]) | json_values
turns = st.fixed_dictionaries({"from": roles, "value": texts}) | json_values
images = (
    st.sampled_from(["a.png", "../a.png", "/a.png", "missing.png", "a\x00.png", ""]) | json_values
)
records = (
    st.fixed_dictionaries(
        {},
        optional={
            "id": st.text(max_size=5) | st.integers() | json_values,
            "image": images,
            "conversations": st.lists(turns, max_size=5) | json_values,
            "answers": json_values,
        },
    )
    | json_values
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rec=records)
def test_validator_never_raises(tmp_path, rec):
    save_image(tmp_path / "a.png")
    result = validate_record(
        rec, index=3, source="p.json", image_root=tmp_path, check_image=image_checker()
    )
    if isinstance(result, Skip):
        assert result.reason and isinstance(result.detail, str)
        return
    assert isinstance(result, Sample)
    assert result.turns and len(result.turns) % 2 == 0
    assert all(r == ("user", "assistant")[i % 2] for i, (r, _) in enumerate(result.turns))
    n_placeholders = sum(t.count("<image>") for _, t in result.turns)
    assert n_placeholders == (1 if result.has_image else 0)
    if result.has_image:
        assert result.image == tmp_path / "a.png"
