"""Processor-built image inputs (``llava_mole.data.image_inputs``) for every zoo family.

The encoder's image block must be what the family's own processor makes of the whole text, the
labels exact, the generation prompt the training prefix, the dataset's lengths exact for
image-dependent token counts, truncation never inside an image block, and the collator must
lay out every processor input as the model wants it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_mole.data.collate import DataCollator, InstructDataset
from llava_mole.data.formats import IMAGE_TOKENS_TRUNCATED, NO_LABELS_AFTER_TRUNCATION, Sample
from llava_mole.data.image_inputs import _pad_trailing, collate_image_inputs, image_inputs_for
from llava_mole.data.templates import IGNORE_INDEX, ConversationEncoder
from tests.models import family_zoo as zoo

MULTIMODAL = [s.key for s in zoo.SPECS if s.processor is not None and s.model_type != "llava"]
TURNS = [("user", "<image>\nwhat colour is it?"), ("assistant", "red")]
SIZES = ((32, 16), (16, 32), (24, 24))


def _image(size: tuple[int, int]) -> Image.Image:
    return Image.new("RGB", size, (200, 30, 90))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("images")
    paths = []
    for k, size in enumerate(SIZES):
        paths.append(root / f"{k}.png")
        _image(size).save(paths[-1])
    return paths


@pytest.mark.parametrize("key", MULTIMODAL)
def test_block_is_what_the_processor_makes_of_the_whole_text(key: str) -> None:
    processor = zoo.make_processor(zoo.BY_KEY[key])
    encoder = ConversationEncoder(processor, "vicuna_v1", system="")
    hook = encoder.images
    assert hook is not None
    enc = encoder.encode(TURNS, (32, 16))
    # The processor on the full prompt text (placeholder in place) gives the same image tokens.
    text = f"USER: {hook.placeholder}\nwhat colour is it? ASSISTANT:"
    img = [[_image((32, 16))]] if hook.nested else [_image((32, 16))]
    theirs = processor(text=[text], images=img, return_tensors="pt")["input_ids"][0].tolist()
    image_id = processor.image_token_id if hasattr(processor, "image_token_id") else None
    image_id = (
        image_id
        if isinstance(image_id, int)
        else processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    )
    assert enc.input_ids.count(image_id) == theirs.count(image_id) > 0
    # Labels: exactly the answer and its end token.
    trained = [t for t, y in zip(enc.input_ids, enc.labels) if y != IGNORE_INDEX]
    tokenizer = processor.tokenizer
    assert tokenizer.decode(trained) == " red" + tokenizer.eos_token  # vicuna: "ASSISTANT: red"
    # The generation prompt is the training prefix.
    prompt = encoder.prompt(TURNS[:1], (32, 16))
    assert enc.input_ids[: len(prompt)] == prompt and len(prompt) < len(enc.input_ids)


@pytest.mark.parametrize("key", ["llava_next", "qwen2_vl", "idefics3", "mllama"])
def test_dataset_lengths_are_exact_for_image_dependent_token_counts(key, images) -> None:
    processor = zoo.make_processor(zoo.BY_KEY[key])
    samples = [Sample(f"s{k}", path, list(TURNS)) for k, path in enumerate(images)]
    dataset = InstructDataset(samples, processor, "vicuna_v1", max_length=None, system="")
    items = [dataset[k] for k in range(len(dataset))]
    assert list(dataset.lengths) == [len(item["input_ids"]) for item in items]
    if key in ("llava_next", "qwen2_vl"):
        assert len(set(dataset.lengths)) > 1, "token counts depend on the image size"
    batch = DataCollator.from_processor(processor)(items)
    batch.pop("domain_ids")
    model = zoo.build(zoo.BY_KEY[key])
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_truncation_inside_an_image_block_is_a_counted_skip(images) -> None:
    processor = zoo.make_processor(zoo.BY_KEY["qwen2_vl"])
    samples = [Sample("cut", images[0], list(TURNS), source="t.json")]
    block = image_inputs_for(processor).block_ids(SIZES[0])
    dataset = InstructDataset(samples, processor, "vicuna_v1", max_length=len(block), system="")
    assert len(dataset) == 0
    assert dataset.report.skipped[IMAGE_TOKENS_TRUNCATED] == 1
    assert any("cut" in str(problem) for problem in dataset.report.problems)


def test_a_sample_left_without_labels_is_a_counted_skip_naming_it(images) -> None:
    processor = zoo.make_processor(zoo.BY_KEY["llava_next"])
    encoder = ConversationEncoder(processor, "vicuna_v1", system="")
    prompt = encoder.prompt(TURNS[:1], SIZES[1])  # image kept, answer cut
    samples = [Sample("no-answer", images[1], list(TURNS), source="t.json")]
    dataset = InstructDataset(samples, processor, "vicuna_v1", max_length=len(prompt), system="")
    assert len(dataset) == 0 and dataset.report.skipped[NO_LABELS_AFTER_TRUNCATION] == 1
    assert any("no-answer" in str(problem) for problem in dataset.report.problems)


def test_text_only_sample_in_a_nested_family_batch(images) -> None:
    """Idefics3 takes images per sample: a text-only row gets an all-zero image (dropped)."""
    spec = zoo.BY_KEY["idefics3"]
    processor = zoo.make_processor(spec)
    samples = [
        Sample("img", images[0], list(TURNS)),
        Sample("txt", None, [("user", "hi"), TURNS[1]]),
    ]
    dataset = InstructDataset(samples, processor, "vicuna_v1", max_length=None, system="")
    batch = DataCollator.from_processor(processor)([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape[0] == 2 and batch["pixel_values"][1].abs().sum() == 0
    batch.pop("domain_ids")
    with torch.no_grad():
        assert torch.isfinite(zoo.build(spec)(**batch).loss)


def test_collation_layouts() -> None:
    """Per-token inputs pad along T (either side); others concatenate with trailing padding."""
    features = [
        {"token_type_ids": torch.tensor([1, 1]), "pixel_values": torch.ones(1, 2, 3)},
        {"token_type_ids": torch.tensor([1, 1, 1]), "pixel_values": torch.ones(2, 3, 3)},
    ]
    right = collate_image_inputs(features, 4, nested=False)
    assert right["token_type_ids"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]
    assert right["pixel_values"].shape == (3, 3, 3)
    assert right["pixel_values"][0, 2].abs().sum() == 0  # padded patch row
    left = collate_image_inputs(features, 4, nested=False, left=True)
    assert left["token_type_ids"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    padded = _pad_trailing([torch.ones(1, 1), torch.ones(1, 3)])
    assert [p.shape[1] for p in padded] == [3, 3]


def test_paligemma_prefix_and_gemma3_image_token_types() -> None:
    pali = ConversationEncoder(zoo.make_processor(zoo.BY_KEY["paligemma"]), system="")
    enc = pali.encode(TURNS, (32, 32))
    types = pali.images.token_inputs(enc.input_ids, enc.labels)["token_type_ids"]
    first = next(k for k, y in enumerate(enc.labels) if y != IGNORE_INDEX)
    assert types[:first].sum() == 0 and bool((types[first:] == 1).all())

    gemma = ConversationEncoder(zoo.make_processor(zoo.BY_KEY["gemma3"]), system="")
    enc = gemma.encode(TURNS, (32, 32))
    block = gemma.images.block(_image((32, 32)))
    types = gemma.images.token_inputs(enc.input_ids, enc.labels, block)["token_type_ids"]
    soft = gemma.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert types.tolist() == [int(t == soft) for t in enc.input_ids]


QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_template_with_a_processor_built_block() -> None:
    """A processor template (list content): one image block, exact labels, prompt = prefix."""
    processor = zoo.make_processor(zoo.BY_KEY["qwen2_5_vl"])
    processor.chat_template = QWEN_TEMPLATE
    processor.tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    )
    encoder = ConversationEncoder(processor, "chat_template")
    enc = encoder.encode(TURNS, (32, 16))
    block = encoder.images.block_ids((32, 16))
    assert (
        sum(1 for k in range(len(enc.input_ids)) if enc.input_ids[k : k + len(block)] == block) == 1
    )
    trained = [t for t, y in zip(enc.input_ids, enc.labels) if y != IGNORE_INDEX]
    assert encoder.tokenizer.decode(trained) == "red<|im_end|>"
    prompt = encoder.prompt(TURNS[:1], (32, 16))
    assert enc.input_ids[: len(prompt)] == prompt
