"""Prompt templates: token-by-token label masks, image token expansion, truncation drops."""

from __future__ import annotations

import pytest
from conftest import NUM_IMAGE_TOKENS, build_processor
from PIL import Image

from llava_mole.data import (
    IGNORE_INDEX,
    VICUNA_V1_SYSTEM,
    ConversationEncoder,
    EncodeError,
    build_prompt_for_generation,
    encode_conversation,
    num_image_tokens,
)

TURNS = [
    ("human", "<image>\nwhat is this ?"),
    ("gpt", "a red cat"),
    ("user", "how many are there ?"),
    ("assistant", "two"),
]
IMG = ["<image>"] * NUM_IMAGE_TOKENS


def _marked(processor, ids, labels):
    """Tokens with trained positions wrapped in brackets; also checks labels == ids there."""
    tokens = processor.tokenizer.convert_ids_to_tokens(ids)
    out = []
    for token, token_id, label in zip(tokens, ids, labels, strict=True):
        if label == IGNORE_INDEX:
            out.append(token)
        else:
            assert label == token_id
            out.append(f"[{token}]")
    return out


def test_num_image_tokens_matches_llava_processor(processor):
    assert num_image_tokens(processor) == NUM_IMAGE_TOKENS
    # transformers' own expansion of "<image>" gives the same count
    out = processor(text=["<image> hello"], images=[Image.new("RGB", (50, 30))])
    assert sum(t == processor.image_token_id for t in out["input_ids"][0]) == NUM_IMAGE_TOKENS


def test_vicuna_v1_multi_turn_labels_token_by_token(processor):
    enc = encode_conversation(TURNS, processor, "vicuna_v1")
    system = processor.tokenizer.tokenize(VICUNA_V1_SYSTEM)
    expected = (
        ["<s>", *system, "USER", ":", *IMG, "what", "is", "this", "?", "ASSISTANT", ":"]
        + ["[a]", "[red]", "[cat]", "[</s>]"]
        + ["USER", ":", "how", "many", "are", "there", "?", "ASSISTANT", ":"]
        + ["[two]", "[</s>]"]
    )
    assert _marked(processor, enc.input_ids, enc.labels) == expected
    assert "<unk>" not in expected
    assert not enc.truncated


@pytest.mark.parametrize("system", ["", "Answer briefly."])
def test_vicuna_v1_system_prompt_can_be_replaced_or_dropped(processor, system):
    enc = ConversationEncoder(processor, "vicuna_v1", system=system).encode(TURNS)
    lead = processor.tokenizer.tokenize(system) if system else []
    marked = _marked(processor, enc.input_ids, enc.labels)
    assert marked[: len(lead) + 3] == ["<s>", *lead, "USER", ":"]
    prompt = build_prompt_for_generation(TURNS[:1], processor, "vicuna_v1", system=system)
    assert prompt.tolist() == enc.input_ids[: len(prompt)]
    default = build_prompt_for_generation(TURNS[:1], processor, "vicuna_v1")
    assert len(default) > len(prompt)  # LLaVA-1.5's long system prompt by default


def test_chat_template_multi_turn_labels_token_by_token(processor):
    enc = encode_conversation(TURNS, processor, "chat_template")
    expected = (
        ["<s>", "<|user|>", *IMG, "what", "is", "this", "?", "<|assistant|>"]
        + ["[a]", "[red]", "[cat]", "[</s>]"]
        + ["<|user|>", "how", "many", "are", "there", "?", "<|assistant|>"]
        + ["[two]", "[</s>]"]
    )
    assert _marked(processor, enc.input_ids, enc.labels) == expected


def test_chat_template_with_end_of_turn_token_and_trailing_text():
    # chatml-like: the template's own end token is trained, the newline after it is not
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }}<|end|>\n"
        "{% else %}<|assistant|> {{ m['content'] }}<|end|> hello\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    proc = build_processor(chat_template=template)
    enc = encode_conversation(TURNS[:2], proc, "chat_template")
    assert _marked(proc, enc.input_ids, enc.labels) == (
        ["<|user|>", *IMG, "what", "is", "this", "?", "<|end|>", "<|assistant|>"]
        + ["[a]", "[red]", "[cat]", "[<|end|>]", "hello"]
    )


def test_chat_template_without_end_token_appends_eos():
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
        "{% else %}ASSISTANT: {{ m['content'] }} {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    proc = build_processor(chat_template=template)
    enc = encode_conversation([("user", "hello"), ("assistant", "a cat")], proc, "chat_template")
    assert _marked(proc, enc.input_ids, enc.labels) == [
        "USER", ":", "hello", "ASSISTANT", ":", "[a]", "[cat]", "[</s>]",
    ]  # fmt: skip


def test_processor_chat_template_with_list_content():
    # HF processor templates iterate over typed content items
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %} <image>"
        "{% else %} {{ c['text'] }}{% endif %}{% endfor %}\n"
        "{% else %}<|assistant|> {{ m['content'][0]['text'] }}{{ eos_token }}\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    proc = build_processor(chat_template=None, processor_template=template)
    enc = encode_conversation(TURNS[:2], proc, "chat_template")
    assert _marked(proc, enc.input_ids, enc.labels) == (
        ["<|user|>", *IMG, "what", "is", "this", "?", "<|assistant|>"]
        + ["[a]", "[red]", "[cat]", "[</s>]"]
    )


@pytest.mark.parametrize("template", ["vicuna_v1", "chat_template"])
def test_generation_prompt_is_the_training_prefix(processor, template):
    enc = encode_conversation(TURNS, processor, template)
    prompt = build_prompt_for_generation(TURNS[:3], processor, template)
    n = len(prompt)
    assert prompt.tolist() == enc.input_ids[:n]
    assert enc.labels[n - 1] == IGNORE_INDEX and enc.labels[n] != IGNORE_INDEX
    assert processor.tokenizer.convert_ids_to_tokens(enc.input_ids[n : n + 2]) == ["two", "</s>"]
    single = build_prompt_for_generation("<image>\nwhat is this ?", processor, template)
    assert single.tolist() == enc.input_ids[: len(single)]
    assert (single == processor.image_token_id).sum() == NUM_IMAGE_TOKENS


def test_truncation_keeps_partial_answers(processor):
    full = encode_conversation(TURNS, processor, "vicuna_v1")
    n = len(full.input_ids) - 1  # cut the final eos
    enc = encode_conversation(TURNS, processor, "vicuna_v1", max_length=n)
    assert enc.truncated and enc.input_ids == full.input_ids[:n] and enc.labels == full.labels[:n]


def test_truncation_dropping_every_label_is_an_error(processor):
    full = encode_conversation(TURNS, processor, "vicuna_v1")
    first_label = next(i for i, x in enumerate(full.labels) if x != IGNORE_INDEX)
    with pytest.raises(EncodeError) as info:
        encode_conversation(TURNS, processor, "vicuna_v1", max_length=first_label)
    assert info.value.reason == "no_labels_after_truncation"


def test_truncation_through_image_block_is_an_error(processor):
    full = encode_conversation(TURNS, processor, "vicuna_v1")
    last_image = max(i for i, t in enumerate(full.input_ids) if t == processor.image_token_id)
    with pytest.raises(EncodeError) as info:
        encode_conversation(TURNS, processor, "vicuna_v1", max_length=last_image)
    assert info.value.reason == "image_tokens_truncated"


def test_encoder_rejects_unknown_template_and_missing_chat_template(processor):
    with pytest.raises(ValueError, match="template must be one of"):
        ConversationEncoder(processor, "llama_2")
    with pytest.raises(ValueError, match="has a chat template"):
        ConversationEncoder(build_processor(chat_template=None), "chat_template")


def test_non_incremental_chat_template_is_reported():
    # renders the number of messages first: earlier text changes when turns are added
    template = "{{ messages | length }}{% for m in messages %} {{ m['content'] }}{% endfor %}"
    proc = build_processor(chat_template=template)
    with pytest.raises(EncodeError) as info:
        encode_conversation([("user", "hello"), ("assistant", "a cat")], proc, "chat_template")
    assert info.value.reason == "chat_template_mismatch"


def test_byte_level_segments_match_whole_text_tokenization():
    """Turn-by-turn ids equal the ids of the whole prompt for a GPT-2 style BPE tokenizer: the
    space before an answer is tokenized with the answer, as in the full text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = f"{VICUNA_V1_SYSTEM} USER: hello world ASSISTANT: a red cat"
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([text] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    enc = encode_conversation([("user", "hello world"), ("assistant", "a red cat")], tokenizer)
    whole = tokenizer.encode(text, add_special_tokens=False)
    assert enc.input_ids == [tokenizer.bos_token_id, *whole, tokenizer.eos_token_id]
