"""``llava-mole serve``: load the model once, then run the app on uvicorn."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_mole.eval.generate import inference_prompt_format, loaded_for_inference
from llava_mole.models.loading import context_length

__all__ = ["FAULT_ENV", "ServeOptions", "context_length", "serve"]

FAULT_ENV = "LLAVA_MOLE_SERVE_FAULT"
"""Test hook: a request whose text holds this variable's value fails inside ``generate``."""


@dataclass
class ServeOptions:
    """Everything ``llava-mole serve`` takes (see its ``--help``)."""

    model: str
    adapter: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_key: str | None = None
    allowed_image_dir: str | None = None
    max_image_pixels: int = 16_000_000
    max_request_bytes: int = 20_000_000
    max_tokens: int = 256
    max_batch_size: int = 16
    batch_wait_ms: float = 20.0
    max_queue: int = 64
    template: str | None = None
    system: str | None = None
    image_mode: str = "pad"
    dtype: str = "float32"
    device: str | None = None
    log_level: str = "info"


def _check(options: ServeOptions) -> None:
    """Bad options are ValueErrors (one line, exit 2 from the CLI)."""
    if options.allowed_image_dir is not None and not Path(options.allowed_image_dir).is_dir():
        raise ValueError(f"--allowed-image-dir: not a folder: {options.allowed_image_dir}")
    for name in ("max_image_pixels", "max_request_bytes", "max_tokens", "max_batch_size"):
        if getattr(options, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if options.max_queue < 1 or options.batch_wait_ms < 0:
        raise ValueError("--max-queue must be >= 1 and --batch-wait-ms >= 0")
    if not 0 < options.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {options.port}")


def serve(options: ServeOptions) -> None:
    """Load the model and serve until interrupted.

    Raises:
        ValueError: Bad options; ModelLoadError / AdapterError: a model or adapter that does
            not load.
    """
    import uvicorn

    from .app import ServeSettings, create_app
    from .engine import BatchEngine
    from .inputs import InputBuilder

    _check(options)
    template, system = inference_prompt_format(options.adapter, options.template, options.system)
    name = options.served_model_name or Path(options.adapter or options.model).resolve().name
    with loaded_for_inference(
        options.model, options.adapter, dtype=options.dtype, device=options.device
    ) as (model, processor):
        context = context_length(model)
        inputs = InputBuilder(
            processor,
            template,
            system,
            image_mode=options.image_mode,
            max_image_pixels=options.max_image_pixels,
            allowed_image_dir=options.allowed_image_dir,
            context_length=context,
        )
        engine = BatchEngine(
            model,
            processor,
            image_mode=options.image_mode,
            max_batch_size=options.max_batch_size,
            batch_wait_s=options.batch_wait_ms / 1000.0,
            max_queue=options.max_queue,
            fault_marker=os.environ.get(FAULT_ENV),
        )
        settings = ServeSettings(
            model_id=name,
            api_key=options.api_key,
            max_tokens=options.max_tokens,
            max_request_bytes=options.max_request_bytes,
            context_length=context,
        )
        app: Any = create_app(engine, inputs, settings)
        logging.basicConfig(level=options.log_level.upper(), format="%(levelname)s: %(message)s")
        print(
            f"serving {name!r} ({engine.num_blocks} MoLE layers) on "
            f"http://{options.host}:{options.port} (web page at /, API at /v1)",
            flush=True,
        )
        if options.host not in ("127.0.0.1", "localhost", "::1") and options.api_key is None:
            print(f"warning: listening on {options.host} without --api-key", flush=True)
        uvicorn.run(app, host=options.host, port=options.port, log_level=options.log_level)
