"""The server's input path for the processor-built families not in the served matrix of
``test_families.py`` (LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL, PaliGemma, SmolVLM), in process:
chat requests through `InputBuilder` and the `BatchEngine` worker (one batch of an image of each
of two sizes and a text-only request) give ``predict``'s greedy answers. No HTTP here: the
served matrix covers the app, this covers the remaining families' inputs at a fraction of the
cost of one server process each.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from llava_mole.eval.decoding import DecodeParams
from llava_mole.eval.generate import inference_prompt_format, loaded_for_inference, predict
from llava_mole.serve.engine import BatchEngine, Job
from llava_mole.serve.inputs import InputBuilder, Prepared
from llava_mole.serve.schema import parse_request

from .conftest import data_url, png_bytes
from .test_families import QUESTIONS, TOKENS, _save_family

OWN_SERVERS = True  # in process only: the LLaVA servers of conftest are not needed
FAMILIES = {
    "llava_onevision": "mole",
    "qwen2_5_vl": "lora",
    "qwen3_vl": "lora",
    "paligemma": "lora",
    "smolvlm": "mole",
}
SIZES = {"wide": (40, 24), "tall": (24, 40)}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family_inputs")
    paths = {}
    for seed, (name, (width, height)) in enumerate(SIZES.items()):
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randint(0, 256, (height, width, 3), generator=gen).to(torch.uint8)
        paths[name] = root / f"{name}.png"
        paths[name].write_bytes(png_bytes(Image.fromarray(noise.numpy())))
    return paths


def _request(question: str, image: Path | None) -> Any:
    content: list[dict[str, Any]] = [{"type": "text", "text": question}]
    if image is not None:
        url = data_url(image.read_bytes())
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "temperature": 0}
    return parse_request(body)


async def _decode_together(engine: BatchEngine, inputs: list[Prepared]) -> list[str]:
    """Submits every request at once to the running worker; their answers, in order."""
    loop = asyncio.get_running_loop()
    jobs = [Job(p, DecodeParams(max_new_tokens=TOKENS), loop) for p in inputs]
    for job in jobs:
        engine.submit(job)
    answers = []
    for job in jobs:
        kind, payload = await job.events.get()
        assert kind == "done", payload
        answers.append(payload.text)
    return answers


@pytest.mark.parametrize("key", list(FAMILIES))
def test_served_inputs_give_predicts_answers(
    key: str, images: dict[str, Path], tmp_path: Path
) -> None:
    folder, adapter = _save_family(key, FAMILIES[key], tmp_path)
    items = [(q, None if name is None else images[name]) for q, name in QUESTIONS]
    expected = [
        predict(folder, image=image, question=q, adapter_dir=adapter, max_new_tokens=TOKENS)
        for q, image in items
    ]
    assert all(expected) and expected[0] != expected[1], expected
    with loaded_for_inference(folder, adapter) as (model, processor):
        builder = InputBuilder(processor, *inference_prompt_format(adapter, None, None))
        inputs = [builder.prepare(_request(q, image)) for q, image in items]
        engine = BatchEngine(model, processor, batch_wait_s=1.0)
        engine.start()
        try:
            answers = asyncio.run(_decode_together(engine, inputs))
        finally:
            engine.stop()
    assert answers == expected
    assert engine.stats()["generate_calls"] == 1 and engine.stats()["largest_batch"] == 3
