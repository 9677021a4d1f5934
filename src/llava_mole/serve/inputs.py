"""From a chat request to model inputs: prompt ids (the training template) and the image.

Images come as ``image_url`` parts: base64 ``data:`` URLs, or local files (``file://`` URLs or
absolute paths) that lie inside the folder allowed at start (``--allowed-image-dir``); remote
URLs are refused (the server is offline). Every image goes through the training loader
(:func:`llava_mole.data.images.load_image`: size guard before decoding, EXIF orientation, RGB),
so the server sees the same pixels as ``predict``; the prompt is built by
:func:`llava_mole.data.templates.build_prompt_for_generation`, as in ``predict``.

What a request's image becomes depends on the family, as in ``predict``: LLaVA-1.5 gets its
``(3, H, W)`` pixel values here (``image_mode``); every family whose processor builds the image
inputs (``llava_mole.data.image_inputs``: LLaVA-NeXT, Qwen-VL, Gemma 3, Idefics3, Mllama, ...)
gets the image block in the prompt from the image's size, and the RGB image itself goes to
``generate_batch``, which builds and batches that family's inputs. A text-only model refuses
images before they are decoded.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import torch
from PIL import Image

from llava_mole.data.formats import ASSISTANT, IMAGE_PLACEHOLDER, IMAGE_TOO_LARGE, USER
from llava_mole.data.image_inputs import image_inputs_for
from llava_mole.data.images import ImageLoadError, load_image, pixel_values
from llava_mole.data.templates import EncodeError, build_prompt_for_generation

from .schema import APIError, ChatRequest, ImagePart, Message

__all__ = ["InputBuilder", "Prepared"]


@dataclass
class Prepared:
    """Model inputs of one request.

    Attributes:
        prompt: Prompt ids, image tokens expanded, ending with the assistant prefix.
        image: Pixel values ``(3, H, W)`` (LLaVA-1.5), the RGB image (families whose processor
            builds the image inputs), or None (text only).
        text: The conversation text (without images).
    """

    prompt: torch.Tensor
    image: torch.Tensor | Image.Image | None
    text: str


class InputBuilder:
    """Turns chat requests into `Prepared` inputs with the served model's prompt format.

    Args:
        processor: The model's processor.
        template: Prompt template (see `inference_prompt_format`).
        system: Default ``vicuna_v1`` system prompt (a system message replaces it).
        image_mode: ``pad`` or ``resize``.
        max_image_pixels: Larger images are refused (checked before decoding).
        allowed_image_dir: Folder local image files may come from (None: no local files).
        context_length: The model's context in tokens (None: unchecked).
    """

    def __init__(
        self,
        processor: Any,
        template: str,
        system: str | None,
        *,
        image_mode: str = "pad",
        max_image_pixels: int = 16_000_000,
        allowed_image_dir: str | os.PathLike[str] | None = None,
        context_length: int | None = None,
    ) -> None:
        self.processor = processor
        self.template = template
        self.system = system
        self.image_mode = image_mode
        self.max_image_pixels = max_image_pixels
        self.allowed = None if allowed_image_dir is None else Path(allowed_image_dir).resolve()
        self.context_length = context_length
        self.processor_built = image_inputs_for(processor) is not None
        self.takes_images = self.processor_built or (
            getattr(processor, "image_processor", None) is not None
        )
        # Hugging Face tokenizers must not be reconfigured while another thread encodes; one
        # prompt built now also settles the tokenizer's state and checks the template.
        self._lock = threading.Lock()
        build_prompt_for_generation([(USER, "Hello.")], processor, template, system)

    def prepare(self, request: ChatRequest) -> Prepared:
        """The inputs of a request.

        Raises:
            APIError: 400 (bad messages or image, prompt longer than the context), 403 (a
                file outside the allowed folder).
        """
        turns, system, part = self._turns(request.messages)
        if part is not None and not self.takes_images:
            raise APIError(
                400,
                "messages: this model is text-only and takes no images",
                param="messages",
                code="images_not_supported",
            )
        rgb = None if part is None else self._image(part)
        size = None if rgb is None else rgb.size
        prompt = self._prompt(turns, system, size)
        if self.context_length is not None and len(prompt) >= self.context_length:
            raise APIError(
                400,
                f"this model's context is {self.context_length} tokens, but the prompt has "
                f"{len(prompt)} (image tokens included); shorten the messages",
                param="messages",
                code="context_length_exceeded",
            )
        image = rgb if rgb is None or self.processor_built else self._pixels(rgb)
        return Prepared(prompt, image, "\n".join(text for _, text in turns))

    def _prompt(
        self, turns: list[tuple[str, str]], system: str | None, size: tuple[int, int] | None
    ) -> torch.Tensor:
        """The prompt ids; for processor-built families the image block comes from `size`."""
        with self._lock:
            try:
                return build_prompt_for_generation(
                    turns, self.processor, self.template, system, image_size=size
                )
            except EncodeError as err:
                raise APIError(400, f"messages: {err}", param="messages") from None
            except ValueError as err:
                if size is None or not self.processor_built:
                    raise APIError(400, f"messages: {err}", param="messages") from None
                raise APIError(  # the processor refused the image (e.g. its aspect ratio)
                    400,
                    f"image_url: this model's processor cannot use a {size[0]}x{size[1]} image "
                    f"({err})",
                    param="messages",
                    code="invalid_image",
                ) from None

    # ---- messages ----------------------------------------------------------------------------
    def _turns(self, messages: list[Message]) -> tuple[list[tuple[str, str]], str | None, Any]:
        """``(turns, system, image part)``: alternating user/assistant turns ending with a user
        turn; system messages replace the default system prompt."""
        turns: list[tuple[str, str]] = []
        system_texts: list[str] = []
        images: list[ImagePart] = []
        for index, message in enumerate(messages):
            text = self._content(message, images, index)
            if message.role in ("system", "developer"):
                system_texts.append(text)
                continue
            role = USER if message.role == "user" else ASSISTANT
            expected = USER if not turns or turns[-1][0] == ASSISTANT else ASSISTANT
            if role != expected:
                raise APIError(
                    400,
                    f"messages.{index}: user and assistant messages must alternate, starting "
                    "with a user message",
                    param="messages",
                )
            turns.append((role, text))
        if not turns or turns[-1][0] != USER:
            raise APIError(
                400, "messages: the last message must be a user message", param="messages"
            )
        if len(images) > 1:
            raise APIError(
                400,
                f"messages: {len(images)} images were sent; this server takes at most one image "
                "per request",
                param="messages",
                code="too_many_images",
            )
        system = "\n".join(system_texts) if system_texts else self.system
        return turns, system, images[0] if images else None

    def _content(self, message: Message, images: list[ImagePart], index: int) -> str:
        """A message's text, with ``<image>`` where its image part is."""
        content = message.content
        parts = [content] if isinstance(content, str) else list(content or [])
        pieces = []
        for part in parts:
            text = part if isinstance(part, str) else getattr(part, "text", None)
            if text is not None:
                if IMAGE_PLACEHOLDER in text:
                    raise APIError(
                        400,
                        f"messages.{index}: text may not contain {IMAGE_PLACEHOLDER!r}; send "
                        "images as image_url parts",
                        param="messages",
                    )
                pieces.append(text)
            elif message.role != "user":
                raise APIError(
                    400, f"messages.{index}: only user messages may hold images", param="messages"
                )
            else:
                images.append(part)  # type: ignore[arg-type]
                pieces.append(IMAGE_PLACEHOLDER)
        return "\n".join(pieces)

    # ---- images ------------------------------------------------------------------------------
    def _image(self, part: ImagePart) -> Image.Image:
        """The RGB image of an ``image_url`` part."""
        url = part.image_url.url.strip()
        if url.startswith("data:"):
            return self._data_url(url)
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https"):
            raise APIError(
                400,
                "image_url: remote URLs are not fetched (offline server); send a base64 data URL",
                param="messages",
                code="invalid_image_url",
            )
        if parsed.scheme == "file":
            return self._local_file(Path(unquote(parsed.path)))
        if parsed.scheme == "" and Path(url).is_absolute():
            return self._local_file(Path(url))
        raise APIError(
            400, "image_url: expected a data: URL or a local file path", param="messages"
        )

    def _data_url(self, url: str) -> Image.Image:
        header, sep, data = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise APIError(
                400,
                "image_url: a data URL must be base64 (data:image/png;base64,...)",
                param="messages",
            )
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(
                400, "image_url: invalid base64 data", param="messages", code="invalid_base64"
            ) from None
        with tempfile.TemporaryDirectory(prefix="llava-mole-image-") as tmp:
            path = Path(tmp) / "image"
            path.write_bytes(raw)
            return self._load(path, "the data URL")

    def _local_file(self, path: Path) -> Image.Image:
        if self.allowed is None:
            raise APIError(
                403,
                "image_url: local files are disabled (start the server with --allowed-image-dir)",
                type="permission_error",
                param="messages",
                code="image_path_not_allowed",
            )
        resolved = path.resolve()
        if not resolved.is_relative_to(self.allowed):
            raise APIError(
                403,
                f"image_url: {path} is outside the allowed image folder",
                type="permission_error",
                param="messages",
                code="image_path_not_allowed",
            )
        if not resolved.is_file():
            raise APIError(400, f"image_url: no such image file: {path}", param="messages")
        return self._load(resolved, str(path))

    def _load(self, path: Path, name: str) -> Image.Image:
        try:
            return load_image(path, max_pixels=self.max_image_pixels)
        except ImageLoadError as err:
            if err.reason == IMAGE_TOO_LARGE:
                raise APIError(
                    400,
                    f"image_url: {name} is larger than {self.max_image_pixels} pixels "
                    "(--max-image-pixels)",
                    param="messages",
                    code="image_too_large",
                ) from None
            raise APIError(
                400,
                f"image_url: {name} is not a readable image",
                param="messages",
                code="invalid_image",
            ) from None

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        """LLaVA-1.5's pixel values of one RGB image."""
        return pixel_values([image], self.processor.image_processor, self.image_mode)[0]
