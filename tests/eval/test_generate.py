"""Tests for ``llava_mole.eval.generate`` on the tiny model and the synthetic world (offline)."""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from llava_mole import MoLEConfig, apply_mole, save_adapter  # noqa: E402
from llava_mole.adapters.state import get_state  # noqa: E402
from llava_mole.data import load_split  # noqa: E402
from llava_mole.eval import evaluation as gen  # noqa: E402
from llava_mole.eval import generation  # noqa: E402
from llava_mole.eval.generate import evaluate, generate_answers, predict  # noqa: E402
from llava_mole.models.loading import load_model_and_processor  # noqa: E402
from llava_mole.toy.synthetic import make_data  # noqa: E402
from llava_mole.toy.tiny import NUM_IMAGE_TOKENS, make_tiny  # noqa: E402

DOMAINS = {"general", "document", "biomedical"}
FIELDS = {"id", "domain", "question", "prediction", "reference"}
TEST_PER_DOMAIN = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The test machine's cores are shared: several torch threads per process make the tiny
    # model's matmuls orders of magnitude slower than one.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny model dir, synthetic data and a text-only mixture (multi-turn, VQA answers, a bad
    image record)."""
    root = tmp_path_factory.mktemp("eval")
    tiny = make_tiny(root / "tiny", pretrain=False, progress=False)
    data = make_data(root / "data", samples_per_domain=8, test_per_domain=TEST_PER_DOMAIN)
    text_dir = root / "text"
    text_dir.mkdir()
    records = [
        {
            "id": "t0",
            "conversations": [
                {"from": "human", "value": "Name a colour."},
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": "Name another one."},
                {"from": "gpt", "value": "blue"},
            ],
        },
        {
            "id": "t1",
            "conversations": [
                {"from": "human", "value": "How many shapes?"},
                {"from": "gpt", "value": "two"},
            ],
            "answers": ["2", "two", "2"],
        },
        {
            "id": "bad",
            "image": "missing.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "a cat"},
            ],
        },
    ]
    (text_dir / "test.json").write_text(json.dumps(records), encoding="utf-8")
    mixture = {
        "template": "vicuna_v1",
        "datasets": [
            {"name": "text", "domain": "text", "test": "test.json", "metric": "vqa_accuracy"}
        ],
    }
    (text_dir / "mixture.yaml").write_text(yaml.safe_dump(mixture), encoding="utf-8")
    return {
        "tiny": tiny,
        "mixture": data / "mixture.yaml",
        "text_mixture": text_dir / "mixture.yaml",
        "image": data / "scenes" / "images" / "test_00000.png",
        "root": root,
    }


@pytest.fixture(scope="module")
def base(world: dict[str, Path]) -> tuple[Any, Any]:
    """The tiny base model and processor, shared by the tests that leave them unchanged."""
    return load_model_and_processor(world["tiny"])


@pytest.fixture(scope="module")
def batched(world: dict[str, Path], base: tuple[Any, Any]) -> dict[str, Any]:
    """Evaluation of the base model with batch size 4."""
    model, processor = base
    out = world["root"] / "results" / "base.json"
    return evaluate(
        world["tiny"],
        mixture=world["mixture"],
        out=out,
        batch_size=4,
        max_new_tokens=6,
        model=model,
        processor=processor,
        progress=False,
    )


def _read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def test_evaluate_writes_predictions_and_scores(world, batched) -> None:
    result = batched
    out = world["root"] / "results" / "base.json"
    assert json.loads(out.read_text()) == result
    assert Path(result["predictions"]) == out.with_name("base.predictions.jsonl")
    records = _read_jsonl(result["predictions"])
    samples, _ = load_split(world["mixture"], "test")
    assert [r["id"] for r in records] == [s.id for s in samples]
    assert len(records) == result["n"] == 3 * TEST_PER_DOMAIN
    for record, sample in zip(records, samples, strict=True):
        assert set(record) == FIELDS
        assert isinstance(record["prediction"], str)
        assert record["reference"] == sample.turns[-1][1]
        assert record["question"] and "<image>" not in record["question"]
    assert set(result["per_domain"]) == DOMAINS
    for scores in result["per_domain"].values():
        assert scores["metric"] == "exact_match" and scores["n"] == TEST_PER_DOMAIN
        assert 0.0 <= scores["score"] <= 1.0
    assert set(result["overall"]) == {"macro", "micro", "n"}
    assert result["overall"]["n"] == 3 * TEST_PER_DOMAIN
    assert result["skipped"] == {} and result["routing"] is None
    assert result["split"] == "test" and result["adapter"] is None


def test_batched_generation_matches_single(world, base, batched) -> None:
    model, processor = base
    single = evaluate(
        world["tiny"],
        mixture=world["mixture"],
        predictions=world["root"] / "results" / "single.jsonl",
        batch_size=1,
        max_new_tokens=6,
        model=model,
        processor=processor,
        progress=False,
    )
    one = [(r["id"], r["prediction"]) for r in _read_jsonl(single["predictions"])]
    four = [(r["id"], r["prediction"]) for r in _read_jsonl(batched["predictions"])]
    assert one == four
    # Prompts of different lengths share batches (left padding is exercised), and the random
    # model says something, so the comparison is not between empty strings.
    assert len({len(r["question"]) for r in _read_jsonl(batched["predictions"])[:4]}) > 1
    assert any(prediction for _, prediction in one)


@pytest.fixture(scope="module")
def adapter_dir(world: dict[str, Path]) -> Path:
    """A MoLE adapter whose LoRA factors and routers are random, so it changes the outputs."""
    model, _ = load_model_and_processor(world["tiny"])
    apply_mole(model, MoLEConfig(rank=4, alpha=8, num_experts=3, dropout=0.0))
    gen_ = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "router" in name:
                param.copy_(torch.randn(param.shape, generator=gen_) * 0.3)
    return save_adapter(model, world["root"] / "adapter")


def test_mole_adapter_routing_picture(world, batched, adapter_dir) -> None:
    model, processor = load_model_and_processor(world["tiny"])
    result = evaluate(
        world["tiny"],
        adapter_dir=adapter_dir,
        mixture=world["mixture"],
        batch_size=4,
        max_new_tokens=6,
        model=model,
        processor=processor,
        progress=False,
    )
    assert result["adapter"] == str(adapter_dir) and result["n"] == 3 * TEST_PER_DOMAIN
    routing = result["routing"]
    assert routing["experts"] == 3 and set(routing["domains"]) == DOMAINS
    num_blocks = model.config.text_config.num_hidden_layers
    assert len(routing["blocks"]) == num_blocks * len(DOMAINS)
    for entry in routing["blocks"]:
        assert 0 <= entry["block"] < num_blocks
        assert entry["image_tokens"] == TEST_PER_DOMAIN * NUM_IMAGE_TOKENS
        assert entry["text_tokens"] > 0
        # Every sample predicts at least one answer token; answer positions are text positions.
        assert TEST_PER_DOMAIN <= entry["answer_tokens"] < entry["text_tokens"]
        for kind in ("text", "image", "answer"):
            shares = entry[kind]
            assert len(shares) == 3 and all(0.0 <= s <= 1.0 for s in shares)
            assert math.isclose(sum(shares), 1.0, abs_tol=1e-6)
    # The random adapter changes the answers; the caller's model is left without statistics.
    base_preds = [r["prediction"] for r in _read_jsonl(batched["predictions"])]
    assert result["predictions"] is None
    state = get_state(model)
    assert state is not None and not state.collect_stats and state.stats == {}
    assert not model.training
    with_adapter = evaluate(
        mixture=world["mixture"],
        predictions=world["root"] / "results" / "mole.jsonl",
        batch_size=4,
        max_new_tokens=6,
        routing=False,
        model=model,
        processor=processor,
        progress=False,
    )
    assert with_adapter["routing"] is None
    assert [r["prediction"] for r in _read_jsonl(with_adapter["predictions"])] != base_preds


def test_loaded_model_with_merged_lora_matches_unmerged(world, adapter_dir) -> None:
    # Loaded here: plain LoRA is merged and MoLE blocks are not, which must not change anything.
    merged = evaluate(
        world["tiny"],
        adapter_dir=adapter_dir,
        mixture=world["mixture"],
        predictions=world["root"] / "results" / "merged.jsonl",
        batch_size=4,
        max_new_tokens=6,
        limit=2,
        progress=False,
    )
    assert merged["n"] == 3 * 2  # limit is per domain
    model, processor = load_model_and_processor(world["tiny"])
    unmerged = evaluate(
        adapter_dir=adapter_dir,
        mixture=world["mixture"],
        predictions=world["root"] / "results" / "unmerged.jsonl",
        batch_size=4,
        max_new_tokens=6,
        limit=2,
        model=model,
        processor=processor,
        progress=False,
    )
    assert _read_jsonl(merged["predictions"]) == _read_jsonl(unmerged["predictions"])
    tokens = [(b["text_tokens"], b["image_tokens"]) for b in merged["routing"]["blocks"]]
    assert tokens == [(b["text_tokens"], b["image_tokens"]) for b in unmerged["routing"]["blocks"]]


def test_text_only_multi_turn_and_vqa_references(world, base) -> None:
    model, processor = base
    result = evaluate(
        mixture=world["text_mixture"],
        predictions=world["root"] / "results" / "text.jsonl",
        batch_size=2,
        max_new_tokens=4,
        model=model,
        processor=processor,
        progress=False,
    )
    assert result["skipped"] == {"missing_image": 1}
    records = {r["id"]: r for r in _read_jsonl(result["predictions"])}
    assert set(records) == {"t0", "t1"}
    assert records["t0"]["reference"] == "blue"  # the final answer; earlier turns are context
    assert records["t0"]["question"] == "Name another one."
    assert records["t1"]["reference"] == ["2", "two", "2"]
    assert result["per_domain"]["text"]["metric"] == "vqa_accuracy"


def test_scoring_plumbing_with_perfect_answers(world, base, monkeypatch) -> None:
    model, processor = base
    samples, _ = load_split(world["mixture"], "test")
    references = iter(s.turns[-1][1] for s in samples)
    prompts: list[str] = []

    def perfect(model, processor, batch_prompts, images, **kwargs):
        assert len(images) == len(batch_prompts)
        prompts.extend(processor.tokenizer.decode(p) for p in batch_prompts)
        return [next(references) for _ in batch_prompts]

    monkeypatch.setattr(generation, "generate_answers", perfect)
    result = evaluate(
        mixture=world["mixture"], batch_size=5, model=model, processor=processor, progress=False
    )
    assert {d: s["score"] for d, s in result["per_domain"].items()} == dict.fromkeys(DOMAINS, 1.0)
    assert result["overall"]["macro"] == result["overall"]["micro"] == 1.0
    # Prompts end with the assistant prefix and never contain the answer.
    assert all(p.rstrip().endswith("ASSISTANT:") for p in prompts)
    assert len(prompts) == len(samples)


@pytest.fixture
def seen_prompts(monkeypatch) -> list[str]:
    """Decoded prompts that reach generation (generation itself replaced by a stub answer)."""
    seen: list[str] = []

    def capture(model, processor, batch_prompts, images, **kwargs):
        seen.extend(processor.tokenizer.decode(p, skip_special_tokens=True) for p in batch_prompts)
        return ["x"] * len(batch_prompts)

    monkeypatch.setattr(generation, "generate_answers", capture)
    return seen


def test_multi_turn_prompt_keeps_earlier_turns(world, base, seen_prompts) -> None:
    model, processor = base
    evaluate(mixture=world["text_mixture"], model=model, processor=processor, progress=False)
    first = seen_prompts[0]
    assert "Name a colour." in first and "red" in first and "Name another one." in first
    assert "blue" not in first and first.rstrip().endswith("ASSISTANT:")


def test_prompts_follow_the_mixture_system_prompt(world, base, seen_prompts) -> None:
    model, processor = base
    source = world["text_mixture"]
    for i, (system, start) in enumerate(
        [(None, "A chat between a curious"), ("", "USER:"), ("Be brief.", "Be brief. USER:")]
    ):
        mixture = source.parent / f"system_{i}.yaml"  # next to the data: same relative paths
        extra = "" if system is None else f"\nsystem: '{system}'\n"
        mixture.write_text(source.read_text() + extra)
        first = len(seen_prompts)
        evaluate(mixture=mixture, model=model, processor=processor, progress=False)
        assert seen_prompts[first].startswith(start), seen_prompts[first]


def test_predict(world, base) -> None:
    answer = predict(world["tiny"], world["image"], "What colour is the shape?", max_new_tokens=4)
    assert isinstance(answer, str)
    model, processor = base
    same = predict(
        image=world["image"],
        question="What colour is the shape?",
        max_new_tokens=4,
        model=model,
        processor=processor,
    )
    assert same == answer  # loaded here or given: same greedy answer
    text = predict(
        question="Name a colour.", template="chat_template", model=model, processor=processor
    )
    assert isinstance(text, str)


def test_predict_uses_the_prompt_format_the_adapter_was_trained_with(world, seen_prompts) -> None:
    model, processor = load_model_and_processor(world["tiny"])
    apply_mole(model, MoLEConfig(rank=2, alpha=4, num_experts=2, dropout=0.0))
    trained = save_adapter(
        model,
        world["root"] / "adapter_nosys",
        extra={"prompt": {"template": "vicuna_v1", "system": ""}},
    )
    kwargs = {"question": "Name a colour.", "model": model, "processor": processor}
    predict(adapter_dir=trained, **kwargs)
    predict(adapter_dir=trained, system="Be brief.", **kwargs)  # an explicit choice wins
    predict(**kwargs)  # no adapter: LLaVA-1.5's default
    assert seen_prompts[0].startswith("USER: Name a colour.")
    assert seen_prompts[1].startswith("Be brief. USER:")
    assert seen_prompts[2].startswith("A chat between a curious")


def test_predict_and_generate_errors(world, base) -> None:
    missing = world["root"] / "nowhere" / "missing.png"
    with pytest.raises(ValueError, match=str(missing)):
        predict(world["tiny"], missing, "What is it?")
    model, processor = base
    with pytest.raises(ValueError, match="no image"):
        predict(question="<image>\nWhat is it?", model=model, processor=processor)
    with pytest.raises(ValueError, match="prompts"):
        generate_answers(model, processor, [torch.tensor([1, 2])], [None, None])


def test_prompt_is_a_prefix_of_the_teacher_forced_sequence(world) -> None:
    """The routing picture marks answer positions from the prompt length: that needs the prompt
    tokens to be exactly the start of the full (prompt + answer) encoding."""
    from collections import Counter

    from llava_mole.data.templates import ConversationEncoder

    _, processor = load_model_and_processor(world["tiny"])
    samples, _ = load_split(world["mixture"], "test")
    items = gen._prepare(samples, ConversationEncoder(processor, "vicuna_v1"), True, Counter())
    assert items and all(item.full is not None for item in items)
    for item in items:
        assert len(item.full) > len(item.prompt)
        assert torch.equal(item.full[: len(item.prompt)], item.prompt)


def test_predict_refuses_prompts_longer_than_the_context(tiny_world):
    from llava_mole.eval.generate import predict
    from llava_mole.models.loading import load_model_and_processor

    model, processor = load_model_and_processor(tiny_world["model"])
    image = next(Path(tiny_world["data"]).rglob("*.png"))
    question = "word " * 20_000  # 100,000 characters, far beyond 512 positions
    with pytest.raises(ValueError, match=r"does not fit the model's context of 512 tokens"):
        predict(model=model, processor=processor, question=question, max_new_tokens=4)
    with pytest.raises(ValueError, match="2 <image> placeholders but one image"):
        predict(model=model, processor=processor, image=image, question="<image> <image> what?")
    assert isinstance(
        predict(model=model, processor=processor, image=image, question="what?", max_new_tokens=2),
        str,
    )
