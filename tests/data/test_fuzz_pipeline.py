"""Fuzz: malformed samples and odd images through loader -> dataset -> collator -> model.

Every generated sample either trains (finite loss on a tiny LLaVA) or is rejected with a counted
reason at load time; nothing raises anywhere in between.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_collate import _tiny_llava
from torch.utils.data import DataLoader

from llava_mole.data.collate import DataCollator, InstructDataset
from llava_mole.data.formats import LoadReport
from llava_mole.data.records import load_llava_file

IMAGE_KINDS = {
    "rgb": ((32, 32), "RGB"),
    "tiny": ((1, 1), "RGB"),
    "wide": ((10000, 10), "RGB"),
    "tall": ((7, 300), "L"),
    "rgba": ((20, 30), "RGBA"),
    "gray": ((16, 16), "L"),
    "bits16": ((24, 24), "I;16"),
    "binary": ((12, 12), "1"),
    "palette": ((12, 12), "P"),
}

texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["", " ", "<image>", "<image>\n<image> two", "\u202e\u0000é漢字🙂", "x" * 3000]
    ),
)
turn = st.fixed_dictionaries(
    {
        "from": st.sampled_from(["human", "gpt", "user", "assistant", "system", "bot"]),
        "value": texts,
    }
)
image_field = st.one_of(
    st.none(),
    st.sampled_from(
        sorted(IMAGE_KINDS) + ["truncated", "not_an_image", "missing", "../escape.png"]
    ),
    st.integers(),
)
sample = st.one_of(
    st.fixed_dictionaries(
        {
            "id": st.one_of(st.text(max_size=5), st.integers()),
            "conversations": st.lists(turn, max_size=5),
        },
        optional={"image": image_field, "extra": st.integers()},
    ),
    st.builds(
        lambda q, a, img: {
            "id": "ok",
            "image": img,
            "conversations": [
                {"from": "human", "value": ("<image>\n" if img else "") + q},
                {"from": "gpt", "value": a},
            ],
        },
        st.text(min_size=1, max_size=20),
        st.text(min_size=1, max_size=20),
        st.one_of(st.none(), st.sampled_from(sorted(IMAGE_KINDS))),
    ),
    st.sampled_from([None, 3, "text", [], {"conversations": "no"}, {"conversations": [1, 2]}]),
)


def _write_images(folder: Path) -> None:
    folder.mkdir()
    for name, (size, mode) in IMAGE_KINDS.items():
        Image.new(mode, size).save(folder / name, format="PNG")
    good = folder / "rgb"
    (folder / "truncated").write_bytes(good.read_bytes()[:40])
    (folder / "not_an_image").write_text("hello")


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(records=st.lists(sample, min_size=1, max_size=6))
def test_bad_samples_train_or_are_counted(processor, records):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write_images(root / "images")
        data = root / "data.json"
        data.write_text(json.dumps(records))
        report = LoadReport()
        samples = load_llava_file(data, root / "images", report=report)
        assert len(samples) + sum(report.skipped.values()) == len(records)
        if not samples:
            return
        dataset = InstructDataset(samples, processor, "vicuna_v1", max_length=256)
        assert len(dataset) + sum(dataset.report.skipped.values()) == len(samples)
        if len(dataset) == 0:
            return
        loader = DataLoader(
            dataset, batch_size=3, collate_fn=DataCollator.from_processor(processor)
        )
        torch.manual_seed(0)
        model = _tiny_llava(processor)
        for batch in loader:
            batch.pop("domain_ids", None)
            loss = model(**batch).loss
            assert torch.isfinite(loss) or (batch["labels"] != -100).sum() == 0
