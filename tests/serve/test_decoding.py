"""The shared decoding loop (`generate_batch`) and per-token routing capture (`trace_routing`),
in process, on the tiny model with a random MoLE adapter."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from llava_mole.adapters.io import load_adapter
from llava_mole.adapters.observe import trace_routing
from llava_mole.data.templates import build_prompt_for_generation
from llava_mole.eval.decoding import DecodeParams, generate_batch
from llava_mole.eval.generate import generate_answers
from llava_mole.models.loading import load_model_and_processor
from llava_mole.toy.tiny import NUM_IMAGE_TOKENS

QUESTIONS = ["<image>\nWhat colour is the shape?", "Name a colour.", "<image>\nHow many?"]


@pytest.fixture(scope="module")
def mole(serve_world):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the cores are shared; one thread is fastest for the tiny model
    model, processor = load_model_and_processor(serve_world["model"])
    load_adapter(model, serve_world["adapter"])
    model.eval()
    yield model, processor
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def batch(mole):
    _, processor = mole
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    prompts = [build_prompt_for_generation([("user", q)], processor) for q in QUESTIONS]
    images = [image if "<image>" in q else None for q in QUESTIONS]
    return prompts, images


def test_greedy_rows_match_generate_answers_whatever_else_is_in_the_batch(mole, batch):
    model, processor = mole
    prompts, images = batch
    reference = generate_batch(model, processor, prompts, images, DecodeParams(8))
    texts = [g.text for g in reference]
    assert texts == generate_answers(model, processor, prompts, images, max_new_tokens=8)
    alone = [
        generate_answers(model, processor, [p], [i], max_new_tokens=8)[0]
        for p, i in zip(prompts, images)
    ]
    assert texts == alone and any(texts)
    # Rows with other limits and a sampling row do not change a greedy row's answer.
    params = [DecodeParams(8), DecodeParams(3), DecodeParams(8, temperature=0.8)]
    mixed = generate_batch(model, processor, prompts, images, params, seed=0)
    assert mixed[0].text == texts[0]
    assert mixed[1].completion_tokens <= 3
    assert mixed[1].token_ids == reference[1].token_ids[: len(mixed[1].token_ids)]


def test_seeded_sampling_repeats_and_differs_from_greedy(mole, batch):
    model, processor = mole
    prompts, images = batch
    hot = [DecodeParams(10, temperature=1.5)] * 3
    first = [g.text for g in generate_batch(model, processor, prompts, images, hot, seed=7)]
    again = [g.text for g in generate_batch(model, processor, prompts, images, hot, seed=7)]
    greedy = generate_answers(model, processor, prompts, images, max_new_tokens=10)
    assert first == again
    assert first != greedy


def test_stop_strings_cut_the_answer_and_stream_events_add_up(mole, batch):
    model, processor = mole
    prompts, images = batch
    answers = generate_batch(model, processor, prompts, images, DecodeParams(12))
    # The row with the most whole words (a random model also emits partial characters).
    row = max(range(len(prompts)), key=lambda k: len(answers[k].text.replace("\ufffd", "").split()))
    full = answers[row]
    words = full.text.split()
    assert len(words) >= 3, full.text
    stop = " " + words[2]
    events = []
    cut = generate_batch(
        model,
        processor,
        prompts[row : row + 1],
        images[row : row + 1],
        DecodeParams(12, stop=(stop,)),
        on_event=events.append,
    )[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)].strip()
    assert "".join(e.delta for e in events) == cut.text
    assert [e.finish_reason for e in events][-1] == "stop"
    assert all(e.finish_reason is None for e in events[:-1])
    assert len(events) == cut.completion_tokens  # one event per decoding step


def test_routing_of_every_answer_and_prompt_token(mole, batch):
    model, processor = mole
    prompts, images = batch
    out = generate_batch(
        model, processor, prompts, images, DecodeParams(6), routing=True, prompt_routing=True
    )
    blocks = model.config.text_config.num_hidden_layers
    for generation, prompt, image in zip(out, prompts, images):
        assert len(generation.tokens) == len(generation.token_ids)
        assert [t.id for t in generation.tokens] == generation.token_ids
        assert "".join(t.text for t in generation.tokens).strip() == generation.text
        for token in generation.tokens + generation.prompt_tokens:
            assert len(token.experts) == blocks and all(0 <= e < 3 for e in token.experts)
        assert [t.id for t in generation.prompt_tokens] == prompt.tolist()
        kinds = [t.kind for t in generation.prompt_tokens]
        assert kinds.count("image") == (NUM_IMAGE_TOKENS if image is not None else 0)
    # Routing is read off, not changed: the answers are those without routing.
    assert [g.text for g in out] == generate_answers(
        model, processor, prompts, images, max_new_tokens=6
    )


def test_trace_routing_records_one_entry_per_forward(mole, batch):
    model, processor = mole
    prompts, _ = batch
    ids = prompts[1].unsqueeze(0)
    with trace_routing(model) as trace:
        with torch.no_grad():
            model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert len(trace.forwards) == 4  # the prompt forward, then one per new token but the last
    first = trace.top_experts(0)
    assert first.shape == (1, ids.shape[1], trace.num_blocks)
    assert trace.top_experts(-1).shape == (1, 1, trace.num_blocks)
    # Outside the block nothing is recorded any more.
    with torch.no_grad():
        model(input_ids=ids)
    assert len(trace.forwards) == 4


def test_trace_routing_needs_mole_blocks(serve_world):
    model, processor = load_model_and_processor(serve_world["model"])
    with pytest.raises(ValueError, match="no MoLE blocks"):
        with trace_routing(model):
            pass
    with pytest.raises(ValueError, match="no MoLE blocks"):
        generate_batch(model, processor, [torch.tensor([2, 5, 6])], routing=True)
