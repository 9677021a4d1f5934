"""``llava-mole serve`` as a real process on 127.0.0.1, driven by the official ``openai`` client
and by plain HTTP: answers equal ``predict``'s, streaming, routing, batching, bad input, limits."""

from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from openai import OpenAI
from PIL import Image

from llava_mole.cli import main
from llava_mole.eval.generate import predict

from .conftest import API_KEY, FAULT_MARKER, data_url, http, png_bytes

QUESTION = "What colour is the shape?"
TOKENS = 12


def client(server, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def model_id(server) -> str:
    return http(server.url + "/v1/models")[1]["data"][0]["id"]


def image_message(url: str, question: str = QUESTION) -> list[dict[str, Any]]:
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    return [{"role": "user", "content": parts}]


def chat(server, **fields: Any) -> tuple[int, Any]:
    body = {"model": model_id(server), "max_tokens": 4, "temperature": 0, **fields}
    body.setdefault("messages", [{"role": "user", "content": "Name a colour."}])
    return http(server.url + "/v1/chat/completions", body)


def test_openai_client_gets_predicts_greedy_answer(server, serve_world):
    expected = predict(
        serve_world["model"],
        image=serve_world["image"],
        question=QUESTION,
        adapter_dir=serve_world["adapter"],
        max_new_tokens=TOKENS,
    )
    api = client(server)
    assert [m.id for m in api.models.list().data] == [model_id(server)]
    url = data_url(serve_world["image"].read_bytes())
    request = {"model": model_id(server), "max_tokens": TOKENS, "temperature": 0}
    answer = api.chat.completions.create(messages=image_message(url), **request)
    assert answer.choices[0].message.content == expected and expected
    assert answer.choices[0].finish_reason in ("stop", "length")
    usage = answer.usage
    assert usage.completion_tokens <= TOKENS and usage.prompt_tokens > 16  # image tokens counted
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    # The same image as a file inside the allowed folder.
    by_path = api.chat.completions.create(
        messages=image_message("file://" + str(serve_world["image"])), **request
    )
    assert by_path.choices[0].message.content == expected

    # Streaming: several chunks that add up to the same answer, then usage.
    stream = api.chat.completions.create(
        messages=image_message(url), stream=True, stream_options={"include_usage": True}, **request
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == expected, pieces
    assert sum(1 for p in pieces if p) > 1  # token by token, not one block
    assert chunks[0].choices[0].delta.role == "assistant"
    finished = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finished == [answer.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens


def test_routing_extra_field(server, serve_world):
    api = client(server)
    url = data_url(serve_world["image"].read_bytes())
    request = {"model": model_id(server), "max_tokens": 8, "temperature": 0}
    plain = api.chat.completions.create(messages=image_message(url), **request)
    assert "routing" not in (plain.choices[0].model_extra or {})
    extra = {"return_routing": True, "return_prompt_routing": True}
    answer = api.chat.completions.create(messages=image_message(url), extra_body=extra, **request)
    routing = answer.choices[0].model_extra["routing"]
    assert answer.choices[0].message.content == plain.choices[0].message.content
    assert routing["layers"] == [0, 1, 2, 3] and routing["num_experts"] == 3
    tokens = routing["tokens"]
    assert len(tokens) in (answer.usage.completion_tokens, answer.usage.completion_tokens - 1)
    assert "".join(t["text"] for t in tokens).strip() == answer.choices[0].message.content
    for token in tokens + routing["prompt"]:
        assert len(token["experts"]) == 4 and all(0 <= e < 3 for e in token["experts"])
    for share in routing["share"]:
        assert abs(sum(share) - 1.0) < 1e-9
    kinds = [t["kind"] for t in routing["prompt"]]
    assert kinds.count("image") == 16 and len(kinds) == answer.usage.prompt_tokens

    # Streamed routing: the same tokens and experts, chunk by chunk.
    stream = api.chat.completions.create(
        messages=image_message(url), stream=True, extra_body=extra, **request
    )
    chunks = [c.choices[0].model_extra.get("routing") for c in stream if c.choices]
    streamed = [t for r in chunks[1:] if r for t in r["tokens"]]
    assert streamed == tokens
    assert chunks[0]["prompt"] == routing["prompt"]


def test_stop_strings_and_seeded_sampling(server):
    messages = [{"role": "user", "content": "Name a colour."}]
    status, greedy = chat(server, messages=messages, max_tokens=12)
    text = greedy["choices"][0]["message"]["content"]
    words = [w for w in text.split() if "\ufffd" not in w]
    assert status == 200 and len(words) >= 2, text
    stop = " " + words[1]
    status, cut = chat(server, messages=messages, max_tokens=12, stop=[stop, "never seen"])
    assert status == 200 and cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)].strip()
    hot = {"messages": messages, "max_tokens": 12, "temperature": 1.5, "seed": 3}
    first, again = chat(server, **hot)[1], chat(server, **hot)[1]
    sampled = first["choices"][0]["message"]["content"]
    assert sampled == again["choices"][0]["message"]["content"] and sampled != text


def test_concurrent_requests_share_batched_generate_calls(server, serve_world):
    api = client(server)
    url = data_url(serve_world["image"].read_bytes())
    questions = [f"Is shape {k} red or blue?" for k in range(16)]

    def ask(question: str) -> str:
        answer = api.chat.completions.create(
            model=model_id(server),
            messages=image_message(url, question),
            max_tokens=8,
            temperature=0,
        )
        return answer.choices[0].message.content

    before = server.health()["generate_calls"]
    start = time.perf_counter()
    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(ask, questions))
    batched_s = time.perf_counter() - start
    calls = server.health()["generate_calls"] - before
    assert len(together) == 16 and all(isinstance(a, str) for a in together)
    assert 1 <= calls < len(questions), calls
    assert server.health()["largest_batch"] > 1

    start = time.perf_counter()
    alone = [ask(q) for q in questions]
    sequential_s = time.perf_counter() - start
    assert server.health()["generate_calls"] - before - calls == len(questions)
    assert together == alone  # batching does not change greedy answers
    print(
        f"16 requests: batched {batched_s:.2f} s in {calls} calls, sequential {sequential_s:.2f} s"
    )


# ---------------------------------------------------------------------------
# Bad input: the right status and OpenAI's error body, and the server keeps serving
# ---------------------------------------------------------------------------


def _big_image() -> str:
    return data_url(png_bytes(Image.new("1", (8000, 6250))))  # 50 megapixels, a 6 kB PNG


BAD = {
    "malformed JSON": (dict(raw=b'{"model": "x", "messages": ['), 400, None),
    "missing field": (dict(body={"model": "x", "max_tokens": 3}), 400, "messages"),
    "bad base64": (dict(image="data:image/png;base64,@@not base64@@"), 400, "invalid_base64"),
    "not an image": (dict(image=data_url(b"just some text", "text/plain")), 400, "invalid_image"),
    "50 megapixels": (dict(image="BIG"), 400, "image_too_large"),
    "longer than the context": (dict(question="red " * 600), 400, "context_length_exceeded"),
    "unknown model": (dict(fields={"model": "gpt-9"}), 404, "model_not_found"),
    "outside the allowed folder": (dict(image="OUTSIDE"), 403, "image_path_not_allowed"),
    "escaping the allowed folder": (dict(image="DOTDOT"), 403, "image_path_not_allowed"),
    "remote URL": (dict(image="http://example.com/cat.png"), 400, "invalid_image_url"),
    "n = 2": (dict(fields={"n": 2}), 400, "n"),
    "max_tokens over the limit": (dict(fields={"max_tokens": 65}), 400, "max_tokens"),
    "temperature out of range": (dict(fields={"temperature": 7}), 400, "temperature"),
    "assistant last": (
        dict(fields={"messages": [{"role": "assistant", "content": "hi"}]}),
        400,
        "messages",
    ),
    "wrong content type": (
        dict(fields={"messages": [{"role": "user", "content": 5}]}),
        400,
        "messages",
    ),
}


def _bad_request(server, world, case: dict[str, Any]) -> tuple[int, Any]:
    url = server.url + "/v1/chat/completions"
    if "raw" in case:
        return http(url, raw=case["raw"])
    if "body" in case:
        return http(url, case["body"])
    image = {
        "BIG": _big_image,
        "OUTSIDE": lambda: "file://" + str(world["outside"]),
        "DOTDOT": lambda: str(world["allowed"] / ".." / "outside.png"),
    }.get(case.get("image"), lambda: case.get("image"))()
    question = case.get("question", QUESTION)
    messages = image_message(image, question) if image else [{"role": "user", "content": question}]
    return chat(server, **{"messages": messages, **case.get("fields", {})})


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, serve_world, name):
    case, status, code = BAD[name]
    got, body = _bad_request(server, serve_world, case)
    assert got == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert code in (error["code"], error["param"]), error
    assert chat(server)[0] == 200


def test_failure_inside_generation_is_a_500_and_the_next_request_works(server):
    failed_before = server.health()["requests_failed"]
    status, body = chat(server, messages=[{"role": "user", "content": FAULT_MARKER}])
    assert status == 500 and "injected fault" in body["error"]["message"]
    assert body["error"]["type"] == "server_error"
    # Failing in a batch with good requests: only the bad one fails.
    with ThreadPoolExecutor(3) as pool:
        bad = pool.submit(chat, server, messages=[{"role": "user", "content": FAULT_MARKER}])
        good = [pool.submit(chat, server) for _ in range(2)]
    assert bad.result()[0] == 500 and [g.result()[0] for g in good] == [200, 200]
    assert server.health()["requests_failed"] == failed_before + 2
    status, body = chat(server, stream=False)
    assert status == 200 and body["choices"][0]["message"]["content"] is not None


def test_unknown_route_is_a_json_404(server):
    status, body = http(server.url + "/v2/nothing")
    assert status == 404 and body["error"]["type"] == "not_found_error"


# ---------------------------------------------------------------------------
# Limits of the second server: API key, request size, queue length
# ---------------------------------------------------------------------------


def test_api_key_is_checked(limited_server):
    url = limited_server.url + "/v1/models"
    assert http(url)[0] == 401
    assert http(url, headers={"Authorization": "Bearer wrong"})[0] == 401
    status, body = http(url, headers={"Authorization": f"Bearer {API_KEY}"})
    assert status == 200 and body["data"][0]["id"] == "limited"
    with pytest.raises(Exception, match="401"):
        client(limited_server, "wrong").models.list()
    answer = client(limited_server, API_KEY).chat.completions.create(
        model="limited", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=3
    )
    assert answer.choices[0].message.content is not None


def test_request_size_and_queue_limits(limited_server):
    url = limited_server.url + "/v1/chat/completions"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    padding = base64.b64encode(b"\0" * 120_000).decode()
    status, body = http(
        url, {"model": "limited", "messages": [{"role": "user", "content": padding}]}, headers=auth
    )
    assert status == 413 and body["error"]["code"] == "request_too_large"

    # One request per batch and a queue of one: of 6 simultaneous long requests, some are 503.
    request = {
        "model": "limited",
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 200,
    }
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: http(url, request, headers=auth), range(6)))
    statuses = sorted(s for s, _ in results)
    assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}, statuses
    busy = next(b for s, b in results if s == 503)
    assert busy["error"]["code"] == "queue_full"
    assert http(url, {**request, "max_tokens": 2}, headers=auth)[0] == 200


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def test_serve_command_errors_are_one_line(serve_world, capsys, monkeypatch):
    argv = ["serve", "--model", str(serve_world["model"]), "--allowed-image-dir", "/nonexistent"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--allowed-image-dir: not a folder: /nonexistent" in err and "Traceback" not in err
    monkeypatch.setitem(__import__("sys").modules, "uvicorn", None)  # the extra not installed
    assert main(["serve", "--model", str(serve_world["model"])]) == 2
    assert capsys.readouterr().err.strip() == (
        "llava-mole serve: error: the server needs its extra: pip install 'llava-mole[serve]'"
    )
