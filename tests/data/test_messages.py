"""The chat ``messages`` schema in JSON and JSONL: same samples, same validation, same skips."""

from __future__ import annotations

import pytest
from conftest import record, save_image, write_json
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llava_mole.data import LoadReport, Sample, Skip, load_llava_file, validate_record
from llava_mole.data.images import image_checker


def msg(role: str, *parts: object) -> dict[str, object]:
    """A message whose content is a list of parts: str -> text part, None -> image part."""
    content = [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]
    return {"role": role, "content": content}


def chat(sid: object, messages: list, images: object = None, **extra: object) -> dict:
    out: dict = {"id": sid, "messages": messages, **extra}
    if images is not None:
        out["images"] = images
    return out


GOOD_IMAGE = chat(
    "q1", [msg("user", None, "what is this ?"), msg("assistant", "a red cat")], ["a.png"]
)


def _validate(rec, root):
    return validate_record(
        rec, index=0, source="m.json", image_root=root, check_image=image_checker()
    )


def test_messages_record_becomes_the_same_sample_as_llava(tmp_path):
    save_image(tmp_path / "a.png")
    chat_sample = _validate({**GOOD_IMAGE, "answers": ["cat"]}, tmp_path)
    llava_sample = _validate(record("q1", "a.png", answers=["cat"]), tmp_path)
    assert isinstance(chat_sample, Sample)
    assert (
        chat_sample.turns
        == llava_sample.turns
        == [
            ("user", "<image>\nwhat is this ?"),
            ("assistant", "a red cat"),
        ]
    )
    assert chat_sample.image == llava_sample.image == tmp_path / "a.png"
    assert chat_sample.meta == llava_sample.meta == {"answers": ["cat"]}


def test_string_content_multi_turn_and_text_only(tmp_path):
    rec = chat(
        7,
        [
            {"role": "user", "content": "<image>\nwhat is this ?"},
            {"role": "assistant", "content": "a cat"},
            {"role": "user", "content": [{"type": "text", "text": "and the colour ?"}]},
            {"role": "assistant", "content": "red"},
        ],
        ["a.png"],
    )
    save_image(tmp_path / "a.png")
    sample = _validate(rec, tmp_path)
    assert sample.id == "7" and sample.has_image
    assert [t for _, t in sample.turns] == [
        "<image>\nwhat is this ?",
        "a cat",
        "and the colour ?",
        "red",
    ]
    text_only = _validate(chat("t", [msg("user", "hi"), msg("assistant", "yes")], []), tmp_path)
    assert isinstance(text_only, Sample) and not text_only.has_image
    # parts are joined with a newline, the image part where it stands
    late = _validate(
        chat("l", [msg("user", "look", None), msg("assistant", "ok")], ["a.png"]), tmp_path
    )
    assert late.turns[0] == ("user", "look\n<image>")


def test_conversations_win_over_messages(tmp_path):
    rec = record("x", turns=[("human", "hi"), ("gpt", "yes")], messages="kept as meta")
    sample = _validate(rec, tmp_path)
    assert sample.turns == [("user", "hi"), ("assistant", "yes")]
    assert sample.meta == {"messages": "kept as meta"}


def _ok():
    return [msg("user", "hi"), msg("assistant", "yes")]


BAD = [
    ("bad_conversations", chat("x", "hi")),
    ("bad_conversations", chat("x", [])),
    ("bad_turn", chat("x", ["hi", "yes"])),
    ("bad_turn", chat("x", [{"role": "user"}, msg("assistant", "a")])),
    ("bad_turn", chat("x", [{"role": "user", "content": []}, msg("assistant", "a")])),
    ("bad_turn", chat("x", [{"role": "user", "content": 3}, msg("assistant", "a")])),
    (
        "bad_turn",
        chat("x", [{"role": "user", "content": [{"type": "video"}]}, msg("assistant", "a")]),
    ),
    (
        "bad_turn",
        chat(
            "x", [{"role": "user", "content": [{"type": "text", "text": 5}]}, msg("assistant", "a")]
        ),
    ),
    ("bad_turn", chat("x", [{"role": "user", "content": ["hi"]}, msg("assistant", "a")])),
    ("unknown_role", chat("x", [msg("system", "be nice"), *_ok()])),
    ("unknown_role", chat("x", [msg("bot", "hi"), msg("assistant", "a")])),
    ("bad_image_field", chat("x", [msg("user", None, "hi"), msg("assistant", "a")], "a.png")),
    (
        "bad_image_field",
        chat("x", [msg("user", None, None, "hi"), msg("assistant", "a")], ["a.png", "a.png"]),
    ),
    (
        "bad_image_field",
        chat("x", [msg("user", None, "hi"), msg("assistant", "a")], ["a.png"], image="a.png"),
    ),
    ("bad_image_field", chat("x", [msg("user", None, "hi"), msg("assistant", "a")], [3])),
    ("image_placeholder_mismatch", chat("x", [msg("user", None, "hi"), msg("assistant", "a")], [])),
    ("image_placeholder_mismatch", chat("x", _ok(), ["a.png"])),
    ("bad_turn_order", chat("x", [msg("assistant", "a"), msg("user", "hi")])),
    ("bad_turn_order", chat("x", [msg("user", "hi")])),
    ("empty_text", chat("x", [msg("user", "hi"), msg("assistant", " ")])),
    (
        "image_path_outside_root",
        chat("x", [msg("user", None, "hi"), msg("assistant", "a")], ["../a.png"]),
    ),
    ("missing_image", chat("x", [msg("user", None, "hi"), msg("assistant", "a")], ["nope.png"])),
    ("bad_id", chat(1.5, _ok())),
]


@pytest.mark.parametrize(("reason", "rec"), BAD, ids=[f"{r}-{i}" for i, (r, _) in enumerate(BAD)])
@pytest.mark.parametrize("jsonl", [False, True])
def test_bad_messages_records_are_counted_skips(tmp_path, reason, rec, jsonl):
    save_image(tmp_path / "a.png")
    result = _validate(rec, tmp_path)
    assert isinstance(result, Skip) and result.reason == reason, result
    suffix = "jsonl" if jsonl else "json"
    path = write_json(tmp_path / f"m.{suffix}", [GOOD_IMAGE, rec], jsonl=jsonl)
    report = LoadReport()
    samples = load_llava_file(path, tmp_path, check_image=image_checker(), report=report)
    assert [s.id for s in samples] == ["q1"]
    assert report.skipped == {reason: 1}
    assert f"m.{suffix}: sample 1" in report.problems[0]


def test_jsonl_mixes_both_schemas(tmp_path):
    save_image(tmp_path / "a.png")
    records = [GOOD_IMAGE, record("l1", "a.png"), chat("t", _ok())]
    path = write_json(tmp_path / "mixed.jsonl", records, jsonl=True)
    report = LoadReport()
    samples = load_llava_file(path, tmp_path, report=report)
    assert [s.id for s in samples] == ["q1", "l1", "t"] and report.num_skipped == 0
    assert samples[0].turns == samples[1].turns


# ------------------------------------------------------------------ property test
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=10,
)
parts = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image", "video"]) | values},
    optional={"text": st.sampled_from(["hi", "", "<image>"]) | values},
)
messages = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system", "gpt"]) | values,
        "content": st.lists(parts, max_size=3) | st.sampled_from(["hi", "<image>\nq"]) | values,
    }
)
chat_records = st.fixed_dictionaries(
    {"messages": st.lists(messages, max_size=4) | values},
    optional={"images": st.lists(st.sampled_from(["a.png", "x.png"]), max_size=2) | values},
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rec=chat_records)
def test_messages_validator_never_raises(tmp_path, rec):
    save_image(tmp_path / "a.png")
    result = _validate(rec, tmp_path)
    assert isinstance(result, (Sample, Skip))
    if isinstance(result, Sample):
        assert sum(t.count("<image>") for _, t in result.turns) == int(result.has_image)
