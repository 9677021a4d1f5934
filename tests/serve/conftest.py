"""Fixtures of the server tests: the tiny model with a random MoLE adapter, and real servers.

The servers are ``llava-mole serve`` subprocesses on free ports of 127.0.0.1. They are started
as soon as the first serve test runs and waited for only when a test needs them, so they boot
while the in-process tests run. Every server is stopped at the end of the session.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

FAULT_MARKER = "@@fail-inside-generation@@"
API_KEY = "test-key"


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(
    url: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, Any]:
    """``(status, decoded JSON body)`` of a GET (no body) or POST request; no retries."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


class Server:
    """One ``llava-mole serve`` process."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        environment = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        command = [sys.executable, "-m", "llava_mole.cli", "serve", "--port", str(self.port)]
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command + args, stdout=self._log_file, stderr=subprocess.STDOUT, env=environment
        )
        self._ready = False

    def ready(self, timeout: float = 90.0) -> Server:
        """Waits (bounded) until ``/health`` answers; fails with the server's log otherwise."""
        deadline = time.monotonic() + timeout
        while not self._ready:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited ({self.process.returncode}):\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer in {timeout} s:\n{self.output()}")
            try:
                self._ready = http(self.url + "/health", timeout=2)[0] == 200
            except OSError:
                time.sleep(0.2)
        return self

    def health(self) -> dict[str, Any]:
        status, body = http(self.url + "/health")
        assert status == 200, body
        return body

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)
        self._log_file.close()


@pytest.fixture(scope="session")
def serve_world(tiny_world, tmp_path_factory) -> dict[str, Any]:
    """The tiny model, a random MoLE adapter (3 experts), images inside and outside the
    allowed folder."""
    from llava_mole import MoLEConfig, apply_mole, save_adapter
    from llava_mole.models.loading import load_model_and_processor

    root = tmp_path_factory.mktemp("serve")
    model, _ = load_model_and_processor(tiny_world["model"])
    # lora_A is drawn from the global generator: seed it, so that the adapter (and every
    # served answer) does not depend on which tests ran before in this process. Seed 2 is the
    # first whose greedy answer to "Name a colour." has two decodable words, which the
    # stop-string test needs (with seeds 0 and 1 this random model answers in broken bytes).
    with torch.random.fork_rng():
        torch.manual_seed(2)
        apply_mole(model, MoLEConfig(rank=4, alpha=8, num_experts=3, dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "router" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    adapter = save_adapter(model, root / "adapter")
    allowed = root / "images"
    allowed.mkdir()
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    image.paste((30, 30, 200), (22, 8, 36, 24))
    (allowed / "shapes.png").write_bytes(png_bytes(image))
    (root / "outside.png").write_bytes(png_bytes(image))
    return {
        "model": Path(tiny_world["model"]),
        "adapter": Path(adapter),
        "allowed": allowed,
        "image": allowed / "shapes.png",
        "outside": root / "outside.png",
        "root": root,
    }


@pytest.fixture(scope="session")
def _servers(serve_world) -> Any:
    """Both servers, started together (not yet waited for)."""
    world = serve_world
    common = ["--model", str(world["model"]), "--adapter", str(world["adapter"])]
    main = Server(
        common
        + ["--allowed-image-dir", str(world["allowed"]), "--max-tokens", "64"]
        + ["--batch-wait-ms", "50"],
        world["root"] / "main.log",
        env={"LLAVA_MOLE_SERVE_FAULT": FAULT_MARKER},
    )
    limited = Server(
        common
        + ["--api-key", API_KEY, "--max-batch-size", "1", "--max-queue", "1"]
        + ["--max-request-bytes", "100000", "--served-model-name", "limited"],
        world["root"] / "limited.log",
    )
    yield {"main": main, "limited": limited}
    main.stop()
    limited.stop()


@pytest.fixture(autouse=True)
def _boot_servers_early(request) -> None:
    """Every serve test asks for the servers, so they boot during the first (in-process) tests;
    a module with ``OWN_SERVERS = True`` (the family matrix) starts its own instead."""
    if not getattr(request.module, "OWN_SERVERS", False):
        request.getfixturevalue("_servers")


@pytest.fixture
def server(_servers) -> Server:
    """The main server: allowed image folder, --max-tokens 64, the fault hook."""
    return _servers["main"].ready()


@pytest.fixture
def limited_server(_servers) -> Server:
    """A server with an API key, one request per batch, a queue of one, 100 kB requests."""
    return _servers["limited"].ready()
