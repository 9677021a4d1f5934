"""Processors for image-only fine-tuning, without the optional packages that videos need.

Several processors carry a video processor (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision,
SmolVLM). In transformers 5 every video processor needs torchvision, and the processor cannot
even be built without one: ``AutoProcessor.from_pretrained`` raises ``ImportError``, and the
constructor fails while checking a ``video_processor=None`` argument. Images are processed by
the PIL-backed image processor, which needs no torchvision. :func:`image_only` derives a
processor class without the video processor; it loads and saves like the original (same
``processor_class`` in the saved files) and processes images and text exactly as it does.
"""

from __future__ import annotations

import inspect
import json
from functools import cache
from pathlib import Path
from typing import Any

# Files that name a checkpoint's processor class, in the order transformers reads them.
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


@cache
def image_only(cls: type) -> type:
    """A subclass of the processor class ``cls`` without its ``video_processor``.

    Its ``__init__`` takes the same arguments minus ``video_processor``, as real parameters:
    transformers derives the sub-processors from the signature and the settings it loads from
    ``__init__.__code__``, so the method is compiled from the parent's parameter list.
    ``video_processor`` is ``None`` on the instances.
    """
    signature = inspect.signature(cls.__init__)
    if "video_processor" not in signature.parameters:
        return cls
    namespace: dict[str, Any] = {"_init": cls.__init__, "_defaults": {}}
    exec(_init_source(signature, namespace["_defaults"]), namespace)  # noqa: S102 (no user input)
    return type(
        cls.__name__, (cls,), {"__init__": namespace["__init__"], "__module__": cls.__module__}
    )


def _init_source(signature: inspect.Signature, defaults: dict[str, Any]) -> str:
    """Source of ``__init__(self, <the parameters but video_processor>)`` calling ``_init``."""
    params, call, keyword_only = ["self"], ["video_processor=None"], False
    for name, param in signature.parameters.items():
        if name in ("self", "video_processor"):
            continue
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            params.append(f"**{name}")
            call.append(f"**{name}")
            continue
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"image_only: *{name} in a processor's __init__ is not supported")
        if param.kind is inspect.Parameter.KEYWORD_ONLY and not keyword_only:
            params.append("*")
            keyword_only = True
        if param.default is inspect.Parameter.empty:
            params.append(name)
        else:
            defaults[name] = param.default
            params.append(f"{name}=_defaults[{name!r}]")
        call.append(f"{name}={name}")
    return (
        f"def __init__({', '.join(params)}):\n"
        f"    _init(self, {', '.join(call)})\n"
        "    self.video_processor = None\n"
    )


def processor_class_name(path: str | Path, model_type: str | None = None) -> str | None:
    """The processor class a checkpoint directory names (or its model type's default)."""
    for name in _PROCESSOR_FILES:
        file = Path(path) / name
        if not file.is_file():
            continue
        try:
            value = json.loads(file.read_text()).get("processor_class")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue
        if isinstance(value, str) and value:
            return value
    if model_type is None:
        return None
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    value = PROCESSOR_MAPPING_NAMES.get(model_type)
    return value if isinstance(value, str) else None


def video_part_failed(err: BaseException) -> bool:
    """Whether a processor failed to load because of its video part.

    That is torchvision missing (every video processor imports it), or a checkpoint without a
    video processor config for a processor class that has one.
    """
    message = str(err).lower()
    return "torchvision" in message or "video processor" in message


def load_image_only_processor(
    path: str | Path, model_type: str | None, trust_remote_code: bool = False
) -> Any | None:
    """The checkpoint's processor without its video processor, or ``None`` if it has none.

    Raises whatever the processor's own loading raises (the caller turns it into one line).
    """
    import transformers

    name = processor_class_name(path, model_type)
    cls = getattr(transformers, name, None) if name else None
    if cls is None or "video_processor" not in inspect.signature(cls.__init__).parameters:
        return None
    return image_only(cls).from_pretrained(str(path), trust_remote_code=trust_remote_code)
