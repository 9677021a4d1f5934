"""The web page at ``/`` in headless Chromium: it asks with the sample image, the answer
streams in, and answer, prompt and image tokens carry their expert's colour in the DOM."""

from __future__ import annotations

from pathlib import Path

import pytest

from .browser import Browser, chromium_path
from .conftest import API_KEY

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "serve"  # git-ignored
DONE = "['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state"


@pytest.mark.skipif(
    chromium_path() is None, reason="chromium is not installed (apt-get install chromium)"
)
def test_page_streams_an_answer_coloured_by_expert(server, tmp_path):
    page = f"{server.url}/?q=What+colour+is+the+shape%3F&sample=1&auto=1&prompt=1&max_tokens=10"
    with Browser(chromium_path(), tmp_path / "profile") as browser:
        browser.open(page)
        assert browser.wait_for(DONE, timeout=40) == "done", browser.evaluate(
            "document.getElementById('status').textContent"
        )
        answer = browser.evaluate(
            """[...document.querySelectorAll('#answer span.tok')].map(s => ({
                text: s.textContent, expert: s.dataset.expert, cls: s.className,
                colour: getComputedStyle(s).backgroundColor}))"""
        )
        state = browser.evaluate(
            "({chunks: llavaMole.chunks, answer: llavaMole.answer, layers: llavaMole.layers})"
        )
        assert len(answer) == len(state["answer"]) >= 1
        assert "".join(t["text"] for t in answer).strip()  # an answer appeared
        assert state["chunks"] > len(answer)  # the opening chunk, then one chunk per token
        for span, token in zip(answer, state["answer"]):
            assert span["expert"] == str(token["experts"][0])  # layer 0 is chosen first
            assert f"expert-{span['expert']}" in span["cls"].split()
            assert span["colour"] not in ("", "rgba(0, 0, 0, 0)", "transparent")
        # The prompt toggle (prompt=1): every text token and image token is coloured too.
        prompt = browser.evaluate(
            """({text: document.querySelectorAll('#prompt-tokens span.tok[data-expert]').length,
                 cells: document.querySelectorAll('#image-grid .cell[data-expert]').length,
                 hidden: document.getElementById('prompt').hidden})"""
        )
        assert prompt["cells"] == 16 and prompt["text"] > 10 and not prompt["hidden"]
        bars = browser.evaluate("document.querySelectorAll('#chart .row .seg').length")
        assert bars >= len(state["layers"]) == 4
        # Choosing another layer recolours the answer with that layer's experts.
        browser.evaluate(
            "(() => { const s = document.getElementById('layer'); s.value = '3';"
            " s.dispatchEvent(new Event('change')); })()"
        )
        recoloured = browser.evaluate(
            "[...document.querySelectorAll('#answer span.tok')].map(s => s.dataset.expert)"
        )
        assert recoloured == [str(t["experts"][3]) for t in state["answer"]]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = browser.screenshot(ARTIFACTS / "routing-page.png")
    assert shot.stat().st_size > 10_000


@pytest.mark.skipif(
    chromium_path() is None, reason="chromium is not installed (apt-get install chromium)"
)
def test_page_asks_for_the_api_key(limited_server, tmp_path):
    page = f"{limited_server.url}/?q=Name+a+colour.&auto=1&max_tokens=3"
    with Browser(chromium_path(), tmp_path / "profile") as browser:
        browser.open(page)
        assert browser.wait_for(DONE, timeout=30) == "error"
        assert "API key" in browser.evaluate("document.getElementById('status').textContent")
        browser.open(page + f"&key={API_KEY}")
        assert browser.wait_for(DONE, timeout=30) == "done"
        assert browser.evaluate("document.querySelectorAll('#answer span.tok').length") >= 1
