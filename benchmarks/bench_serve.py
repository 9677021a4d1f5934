"""Throughput of ``llava-mole serve``: N simultaneous requests (dynamic batching) against the
same N requests sent one after another.

    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py [--requests 16] [--max-tokens 32]
        [--repeats 3] [--model DIR --adapter DIR]

Without ``--model``, builds the tiny LLaVA (not pretrained: speed does not depend on it) and a
random MoLE adapter (3 experts, rank 4, as ``configs/tiny-mole.yaml``) in a temporary folder.
Starts a real server on a free port of 127.0.0.1; every request carries an image and asks for
``--max-tokens`` greedy tokens (a random model never stops early, so each answer has that many
tokens). Reports the median wall time of each mode, requests/s, generated tokens/s and the
number of batched ``generate`` calls (from ``/health``).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _tiny(root: Path) -> tuple[Path, Path]:
    """The tiny model and a random MoLE adapter."""
    import torch

    from llava_mole import MoLEConfig, apply_mole, save_adapter
    from llava_mole.models.loading import load_model_and_processor
    from llava_mole.toy.tiny import make_tiny

    model_dir = make_tiny(root / "model", pretrain=False, progress=False)
    model, _ = load_model_and_processor(model_dir)
    apply_mole(model, MoLEConfig(rank=4, alpha=8, num_experts=3, dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "router" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return Path(model_dir), Path(save_adapter(model, root / "adapter"))


def _image_url() -> str:
    from PIL import Image

    image = Image.new("RGB", (40, 30), (200, 30, 30))
    image.paste((30, 30, 200), (22, 8, 36, 24))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _start(model: Path, adapter: Path | None, log: Path, batch: int) -> tuple[Any, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "llava_mole.cli", "serve", "--model", str(model)]
    command += ["--port", str(port), "--max-batch-size", str(batch), "--log-level", "warning"]
    if adapter is not None:
        command += ["--adapter", str(adapter)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            _get(url + "/health")
            return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    sys.exit("the server did not start within 120 s")


def _run(url: str, bodies: list[dict[str, Any]], together: bool) -> tuple[float, int, int]:
    """``(wall seconds, generated tokens, generate calls)`` of one round."""
    calls = _get(url + "/health")["generate_calls"]
    start = time.perf_counter()
    chat = url + "/v1/chat/completions"
    if together:
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda body: _post(chat, body), bodies))
    else:
        answers = [_post(chat, body) for body in bodies]
    wall = time.perf_counter() - start
    tokens = sum(a["usage"]["completion_tokens"] for a in answers)
    return wall, tokens, _get(url + "/health")["generate_calls"] - calls


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--adapter", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        model, adapter = (args.model, args.adapter) if args.model else _tiny(root)
        process, url = _start(model, adapter, root / "server.log", args.requests)
        try:
            name = _get(url + "/v1/models")["data"][0]["id"]
            image = _image_url()
            bodies = [
                {
                    "model": name,
                    "max_tokens": args.max_tokens,
                    "temperature": 0,
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": image}},
                                {"type": "text", "text": f"Is shape {k} red or blue?"},
                            ],
                        }
                    ],
                }
                for k in range(args.requests)
            ]
            _run(url, bodies[:2], together=False)  # warm-up
            report = {}
            for mode, together in (("sequential", False), ("batched", True)):
                rounds = [_run(url, bodies, together) for _ in range(args.repeats)]
                wall = statistics.median(r[0] for r in rounds)
                report[mode] = {
                    "wall_s": round(wall, 3),
                    "requests_per_s": round(args.requests / wall, 2),
                    "tokens_per_s": round(rounds[0][1] / wall, 1),
                    "generate_calls": rounds[0][2],
                }
        finally:
            process.terminate()
            process.wait(30)
    print(json.dumps(report, indent=2))
    speedup = report["sequential"]["wall_s"] / report["batched"]["wall_s"]
    print(
        f"{args.requests} requests x {args.max_tokens} tokens: batched {speedup:.2f}x the "
        f"throughput of sequential ({report['batched']['generate_calls']} generate calls "
        f"instead of {report['sequential']['generate_calls']})"
    )


if __name__ == "__main__":
    main()
