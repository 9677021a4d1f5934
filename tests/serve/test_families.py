"""``llava-mole serve`` for the processor-built families and a text-only model, each a real
server process with a MoLE or LoRA adapter, driven by the official ``openai`` client.

Each family's tiny random model (``tests/models/family_zoo.py``) is saved to a folder with a
random adapter, and all servers start at once when the module's first test runs. Served greedy
answers must equal ``predict``'s for the same question and image, decoded alone (streamed) and
batched with requests of other image sizes and text-only ones (per-token inputs padded left,
per-image tensors concatenated). Bad requests are one 4xx error each, and leave no traceback.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from openai import OpenAI
from PIL import Image

from llava_mole import MoLEConfig, apply_mole, save_adapter
from llava_mole.eval.generate import predict
from tests.models import family_zoo as zoo
from tests.tiny_models import randomize_adapter

from .conftest import Server, data_url, http, png_bytes

pytestmark = pytest.mark.slow  # end to end; `-m 'not slow'` leaves it out

OWN_SERVERS = True  # the LLaVA servers of conftest are not needed here
FAMILIES = {
    "qwen2_vl": "mole",  # image_grid_thw, mm_token_type_ids (M-RoPE)
    "llava_next": "lora",  # image_sizes, any-resolution patches of different counts
    "idefics3": "mole",  # per-sample pixel_values, pixel_attention_mask
    "gemma3": "lora",  # token_type_ids
    "mllama": "mole",  # cross_attention_mask, aspect_ratio_ids/mask
    "llama": "lora",  # text only
}
SIZES = {"wide": (40, 24), "tall": (24, 40)}
TOKENS = 6
# The same question about two noise images of different sizes (answers that differ show the
# pixels reach the model) and a text-only question, all with non-empty greedy answers.
QUESTIONS: list[tuple[str, str | None]] = [
    ("Name a colour.", "wide"),
    ("Name a colour.", "tall"),
    ("What colour is it?", None),
]
TEXT_QUESTIONS: list[tuple[str, str | None]] = [
    ("Name a colour.", None),
    ("What colour is it?", None),
    ("Say a word.", None),
]


def _save_family(key: str, mode: str, root: Path) -> tuple[Path, Path]:
    """The family's model + processor folder and a random adapter of `mode` for it."""
    spec = zoo.BY_KEY[key]
    folder = root / key
    model = zoo.build(spec)
    model.save_pretrained(folder)
    zoo.make_processor(spec).save_pretrained(folder)
    apply_mole(model, MoLEConfig(mode=mode, rank=2, alpha=4, num_experts=2, dropout=0.0))
    randomize_adapter(model, scale=0.5)
    return folder, Path(save_adapter(model, root / f"{key}-{mode}"))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Images, and per family its folder, adapter and server (each started once it is saved,
    so the servers boot while the next family is built)."""
    root = tmp_path_factory.mktemp("serve_families")
    images = {}
    for seed, (name, (width, height)) in enumerate(SIZES.items()):
        noise = torch.randint(
            0, 256, (height, width, 3), generator=torch.Generator().manual_seed(seed)
        )
        images[name] = root / f"{name}.png"
        images[name].write_bytes(png_bytes(Image.fromarray(noise.to(torch.uint8).numpy())))
    families: dict[str, dict[str, Any]] = {}
    for key, mode in FAMILIES.items():
        folder, adapter = _save_family(key, mode, root)
        args = ["--model", str(folder), "--adapter", str(adapter), "--max-tokens", "16"]
        server = Server([*args, "--batch-wait-ms", "300"], root / f"{key}.log")
        families[key] = {"folder": folder, "adapter": adapter, "server": server}
    yield {"images": images, "families": families}
    for family in families.values():
        family["server"].stop()


def _served(world: Any, key: str) -> tuple[Server, OpenAI, str]:
    server = world["families"][key]["server"].ready(timeout=180)
    api = OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=120)
    return server, api, http(server.url + "/v1/models")[1]["data"][0]["id"]


def _messages(world: Any, question: str, image: str | None) -> list[dict[str, Any]]:
    if image is None:
        return [{"role": "user", "content": question}]
    url = data_url(world["images"][image].read_bytes())
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    return [{"role": "user", "content": parts}]


def _questions(key: str) -> list[tuple[str, str | None]]:
    return QUESTIONS if zoo.BY_KEY[key].processor is not None else TEXT_QUESTIONS


@pytest.mark.parametrize("key", list(FAMILIES))
def test_served_answers_equal_predicts_alone_and_batched(world: Any, key: str) -> None:
    family = world["families"][key]
    questions = _questions(key)
    expected = [
        predict(
            family["folder"],
            image=None if image is None else world["images"][image],
            question=question,
            adapter_dir=family["adapter"],
            max_new_tokens=TOKENS,
        )
        for question, image in questions
    ]
    assert all(expected), expected  # an empty answer would make the comparison weak
    if questions is QUESTIONS:
        assert expected[0] != expected[1], "the two images should give different answers"
    server, api, model = _served(world, key)

    def ask(item: tuple[str, str | None]) -> str | None:
        answer = api.chat.completions.create(
            model=model, messages=_messages(world, *item), max_tokens=TOKENS, temperature=0
        )
        return answer.choices[0].message.content

    before = server.health()["generate_calls"]
    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(ask, questions))
    calls = server.health()["generate_calls"] - before
    assert together == expected
    assert calls < len(questions), f"{len(questions)} requests took {calls} generate calls"

    # Alone, streamed: the chunks add up to the same answer.
    stream = api.chat.completions.create(
        model=model,
        messages=_messages(world, *questions[0]),
        max_tokens=TOKENS,
        temperature=0,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == expected[0]


def test_prompt_routing_marks_the_image_tokens(world: Any) -> None:
    """Qwen2-VL's expanded image block: every image pad token is an ``image`` token."""
    _, api, model = _served(world, "qwen2_vl")
    answer = api.chat.completions.create(
        model=model,
        messages=_messages(world, *QUESTIONS[0]),
        max_tokens=TOKENS,
        extra_body={"return_routing": True, "return_prompt_routing": True},
    )
    prompt = answer.choices[0].model_extra["routing"]["prompt"]
    assert len(prompt) == answer.usage.prompt_tokens
    pad = zoo.token_id("<|image_pad|>")
    assert [t["kind"] == "image" for t in prompt] == [t["id"] == pad for t in prompt]
    assert sum(t["kind"] == "image" for t in prompt) > 1


def _corrupt_png() -> str:
    raw = png_bytes(Image.new("RGB", (24, 24), (1, 2, 3)))
    return data_url(raw[:40] + b"\0" * 200)  # a PNG header, then garbage


def _bad_cases(world: Any, key: str) -> dict[str, tuple[list[dict[str, Any]], str]]:
    """``name: (messages, expected error code)`` of the bad requests a family is sent."""
    image = {
        "type": "image_url",
        "image_url": {"url": data_url(world["images"]["wide"].read_bytes())},
    }
    text = {"type": "text", "text": "What is it?"}
    if zoo.BY_KEY[key].processor is None:
        return {"an image for a text-only model": ([{"role": "user", "content": [image, text]}],
                                                   "images_not_supported")}  # fmt: skip
    corrupt = {"type": "image_url", "image_url": {"url": _corrupt_png()}}
    cases = {
        "two images": ([{"role": "user", "content": [image, image, text]}], "too_many_images"),
        "a corrupt image": ([{"role": "user", "content": [corrupt, text]}], "invalid_image"),
    }
    if key == "qwen2_vl":  # its processor refuses aspect ratios over 200
        thin = data_url(png_bytes(Image.new("RGB", (1, 500), (9, 9, 9))))
        thin_part = {"type": "image_url", "image_url": {"url": thin}}
        cases["a 1x500 image"] = ([{"role": "user", "content": [thin_part, text]}], "invalid_image")
    return cases


@pytest.mark.parametrize("key", list(FAMILIES))
def test_bad_requests_are_one_4xx_error_and_the_server_keeps_serving(world: Any, key: str) -> None:
    server, api, model = _served(world, key)
    for name, (messages, code) in _bad_cases(world, key).items():
        with pytest.raises(openai.BadRequestError) as caught:
            api.chat.completions.create(model=model, messages=messages, max_tokens=2)
        error = caught.value
        assert error.status_code == 400 and error.code == code, (name, error.body)
        assert error.message and "Traceback" not in error.message, name
    answer = api.chat.completions.create(
        model=model, messages=_messages(world, "Name a colour.", None), max_tokens=2
    )
    assert answer.choices[0].message.content is not None
    assert "Traceback" not in server.output() and server.health()["requests_failed"] == 0
