"""Dataset items, collator, image-failure fallback, sampler and a tiny LLaVA forward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import record, save_image, write_json
from torch.utils.data import DataLoader
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Trainer,
    TrainingArguments,
)

from llava_mole.data import (
    IGNORE_INDEX,
    DataCollator,
    InstructDataset,
    ModalityLengthGroupedSampler,
    Sample,
    load_llava_file,
    modality_length_grouped_indices,
)
from llava_mole.data import collate as collate_module


@pytest.fixture
def samples(tmp_path, make_dataset) -> list[Sample]:
    """Six samples alternating image / text-only."""
    path = make_dataset("a", 6)
    return load_llava_file(path, tmp_path / "images", domain="a")


def _feature(n: int, image: bool, domain: int = 0) -> dict:
    item = {
        "input_ids": torch.arange(1, n + 1),
        "labels": torch.cat([torch.full((n - 2,), IGNORE_INDEX), torch.tensor([7, 8])]),
        "domain_id": domain,
    }
    if image:
        item["pixel_values"] = torch.full((3, 32, 32), float(n))
    return item


def test_collator_pads_masks_and_stacks_images():
    features = [_feature(3, False, 1), _feature(5, True, 0), _feature(4, True, 2)]
    batch = DataCollator(pad_token_id=0)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "domain_ids"}
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0, 0], [1, 2, 3, 4, 5], [1, 2, 3, 4, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 1, 1, 1, 0]]
    assert batch["labels"].tolist() == [
        [-100, 7, 8, -100, -100],
        [-100, -100, -100, 7, 8],
        [-100, -100, 7, 8, -100],
    ]
    # only the samples with images, in batch order
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [5.0, 4.0]
    assert batch["domain_ids"].tolist() == [1, 0, 2] and batch["domain_ids"].dtype == torch.long
    # positions t with a label at t + 1 in some row: rows' labels sit at 1-2, 3-4 and 2-3
    positions = DataCollator(pad_token_id=0, loss_positions=True)(features)["loss_positions"]
    assert positions.tolist() == [0, 1, 2, 3] and positions.dtype == torch.long
    only_first = DataCollator(0, loss_positions=True)([_feature(3, False)])["loss_positions"]
    assert only_first.tolist() == [0, 1]


def test_collator_text_only_batch_and_options():
    batch = DataCollator(pad_token_id=9, label_pad=-1, pad_to_multiple_of=8)(
        [_feature(3, False), _feature(2, False)]
    )
    assert "pixel_values" not in batch and batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][1].tolist() == [1, 2] + [9] * 6
    assert batch["labels"][1].tolist() == [7, 8] + [-1] * 6
    # transformers.Trainer drops unknown keys unless remove_unused_columns=False
    features = [{k: v for k, v in _feature(3, False).items() if k != "domain_id"}]
    assert "domain_ids" not in DataCollator(0)(features)
    with pytest.raises(ValueError, match="pad_token_id"):
        DataCollator(None)  # type: ignore[arg-type]


def test_dataset_items_and_metadata(samples, processor, monkeypatch):
    dataset = InstructDataset(samples, processor, "vicuna_v1", 256, "pad")
    assert len(dataset) == 6 and dataset.domains == ["a"]

    def fail(*args, **kwargs):
        raise AssertionError("metadata must not load images")

    monkeypatch.setattr(collate_module, "load_image", fail)
    assert dataset.has_image == [True, False] * 3
    assert all(n > 0 for n in dataset.lengths)
    monkeypatch.undo()

    item = dataset[0]
    assert set(item) == {"input_ids", "labels", "pixel_values", "domain_id"}
    assert item["pixel_values"].shape == (3, 32, 32) and item["domain_id"] == 0
    assert item["input_ids"].dtype == torch.long and item["labels"].shape == item["input_ids"].shape
    assert (item["input_ids"] == processor.image_token_id).sum() == 16
    assert "pixel_values" not in dataset[1]
    assert dataset.lengths[0] == len(item["input_ids"])
    with pytest.raises(IndexError):
        dataset[6]


@pytest.mark.parametrize("budget", [0, 64 * 2**20, 3 * 32 * 32 * 4])
def test_pixel_cache_reuses_processed_images_within_its_budget(
    samples, processor, monkeypatch, budget
):
    dataset = InstructDataset(samples, processor, pixel_cache_bytes=budget)
    calls = []
    real = collate_module.load_image
    monkeypatch.setattr(
        collate_module, "load_image", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    first = [dataset[i]["pixel_values"] for i in (0, 2, 4)]  # the items with images
    second = [dataset[i]["pixel_values"] for i in (0, 2, 4)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # budget 0: every read decodes; one image's worth: only the first image stays cached.
    expected = {0: 6, 64 * 2**20: 3, 3 * 32 * 32 * 4: 5}[budget]
    assert len(calls) == expected


def test_dataset_drops_malformed_in_memory_samples(processor):
    good = Sample("g", None, [("user", "hello"), ("assistant", "a cat")], "x")
    bad = Sample("b", None, [("user", "hello")], "y", source="mem", index=4)
    dataset = InstructDataset([good, bad, good], processor)
    assert len(dataset) == 2 and dataset.domains == ["x", "y"]
    assert dataset.report.per_domain == {"x": 2, "y": 0}
    assert dataset.report.skipped == {"bad_turn_order": 1}
    with pytest.raises(ValueError, match="missing from `domains`"):
        InstructDataset([good], processor, domains=["z"])


def test_image_failure_at_getitem_uses_a_counted_replacement(samples, processor):
    dataset = InstructDataset(samples, processor)
    samples[0].image.write_bytes(b"changed on disk")  # breaks item 0 after loading
    item = dataset[0]
    assert torch.equal(item["input_ids"], dataset[1]["input_ids"])  # the next item
    assert dataset.image_failures == {"unreadable_image": 1}
    samples[2].image.unlink()
    assert "pixel_values" in dataset[4] and dataset.image_failures["missing_image"] == 0
    dataset[2]
    assert dataset.image_failures["missing_image"] == 1


def test_blank_fallback_when_no_replacement_works(tmp_path, processor):
    save_image(tmp_path / "x.png")
    write_json(tmp_path / "a.json", [record(i, "x.png") for i in range(3)])
    dataset = InstructDataset(load_llava_file(tmp_path / "a.json"), processor)
    (tmp_path / "x.png").write_bytes(b"broken")
    item = dataset[1]
    assert item["pixel_values"].shape == (3, 32, 32)
    assert (item["labels"] == IGNORE_INDEX).all()  # nothing is learnt from it
    assert dataset.image_failures == {"unreadable_image": 3, "blank_fallback": 1}


def test_sampler_groups_modalities_and_is_deterministic():
    lengths = [(i * 37) % 50 + 1 for i in range(40)]
    has_image = [i % 3 != 0 for i in range(40)]
    sampler = ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(40)) and order == list(sampler)
    batches = [order[k : k + 4] for k in range(0, 40, 4)]
    full = [b for b in batches if len({has_image[i] for i in b}) == 1]
    assert len(full) >= len(batches) - 1  # only the merged leftover batch may mix modalities
    for b in batches[:-1]:
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    sampler.set_epoch(1)
    assert list(sampler) != order and len(sampler) == 40
    other = modality_length_grouped_indices(
        lengths, has_image, 4, 2, torch.Generator().manual_seed(0)
    )
    assert sorted(other) == list(range(40))


def _tiny_llava(processor) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    text = LlamaConfig(
        vocab_size=len(processor.tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=processor.image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(config)


@pytest.mark.parametrize("template", ["vicuna_v1", "chat_template"])
def test_tiny_llava_forward_on_mixed_batch(samples, processor, template):
    dataset = InstructDataset(samples, processor, template)
    loader = DataLoader(dataset, batch_size=4, collate_fn=DataCollator.from_processor(processor))
    batch = next(iter(loader))
    assert batch["pixel_values"].shape[0] == 2 and batch["input_ids"].shape[0] == 4
    model = _tiny_llava(processor)
    domain_ids = batch.pop("domain_ids")
    assert domain_ids.tolist() == [0, 0, 0, 0]
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()


def test_works_with_transformers_trainer(samples, processor, tmp_path):
    dataset = InstructDataset(samples, processor)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=3,
        max_steps=1,
        report_to=[],
        remove_unused_columns=False,  # keeps domain_id for the collator
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=_tiny_llava(processor),
        args=args,
        train_dataset=dataset,
        data_collator=DataCollator.from_processor(processor),
    )
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
