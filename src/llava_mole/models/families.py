"""The model families llava-mole knows: where each keeps its language model, projector and vision tower.

One entry per family, keyed by ``config.model_type`` of the top-level model. Paths are dotted
module paths of the ``*ForConditionalGeneration`` / ``*ForCausalLM`` class that
``AutoModelForImageTextToText`` / ``AutoModelForCausalLM`` load (transformers 5 layout); the
bare ``*Model`` classes are matched too (the same paths without the leading ``model.``).

- ``language_model``: the decoder whose ``layers`` get the adapter (attention LoRA, MoLE MLPs).
- ``projector``: what ``train_projector`` trains fully (the projector, connector or merger).
  Qwen2-VL's merger lives inside ``visual``: it is trained, the rest of ``visual`` is not.
- ``vision``: module trees that are never adapted and never trained (the projector aside).
- ``inputs``: how the family's processor builds a sample's image inputs (:class:`InputRules`,
  applied by ``llava_mole.data.image_inputs``); ``None``: LLaVA-1.5's fixed expansion by the
  prompt encoder (and text-only models).

This module only describes models (no transformers import); ``llava_mole.adapters.targets``
applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Words of a module path that mark a vision tower in any model (also the unknown ones).
VISION_WORDS = ("vision_tower", "vision_model", "visual")
# Where an unknown model's language model may be (first with a ``layers`` list wins).
GENERIC_LANGUAGE_MODELS = (
    "model.language_model",
    "language_model",
    "model.text_model",
    "text_model",
    "model.model",
    "model",
)
GENERIC_PROJECTOR_NAME = "multi_modal_projector"


@dataclass(frozen=True)
class InputRules:
    """How one family's processor turns an image into model inputs (data only).

    Args:
        placeholder: the text put where a sample's ``<image>`` is before the processor expands
            it, formatted with the processor's attributes (``{image_token}``, ``{boi_token}``).
        nested: the processor takes one image list per sample and returns its image tensors
            per sample (``(1, n_images, ...)``), not per image.
        tokens: how per-token inputs span the whole sequence: ``block`` (the processor's values
            on the image block, 0 elsewhere: ``mm_token_type_ids``, Gemma 3's
            ``token_type_ids``), ``prefix`` (PaliGemma: ``token_type_ids`` 0 on the prefix up to
            the first answer token, 1 from there: the prefix attends bidirectionally) or
            ``cross_attention`` (Mllama: ``cross_attention_mask`` 1 from the image token on).
        processors: the processor class names of the family.
    """

    placeholder: str = "{image_token}"
    nested: bool = False
    tokens: str = "block"
    processors: tuple[str, ...] = ()


@dataclass(frozen=True)
class Family:
    """Where one family of Hugging Face models keeps its parts.

    Args:
        name: the family's name in messages and the README.
        model_types: ``config.model_type`` values of the top-level model.
        language_model: dotted path of the language model (a decoder with ``layers``).
        projector: dotted paths of the modules or parameters ``train_projector`` trains.
        vision: dotted paths of the vision tower(s), never adapted nor trained.
        notes: what differs in this family (README, ``describe``).
        inputs: how its processor builds image inputs (None: LLaVA-1.5's fixed expansion, or
            text only).
    """

    name: str
    model_types: tuple[str, ...]
    language_model: str
    projector: tuple[str, ...] = ()
    vision: tuple[str, ...] = ()
    notes: str = ""
    inputs: InputRules | None = None

    @property
    def multimodal(self) -> bool:
        """Whether the family has a vision tower."""
        return bool(self.vision)


_QWEN_IMAGE = "<|vision_start|>{image_token}<|vision_end|>"
_LLAVA_PARTS = dict(
    language_model="model.language_model",
    projector=("model.multi_modal_projector",),
    vision=("model.vision_tower",),
)

FAMILIES: tuple[Family, ...] = (
    Family(
        "LLaVA-1.5",
        ("llava",),
        **_LLAVA_PARTS,
        notes="any dense SwiGLU text model (Llama, Mistral, Qwen2, ...)",
    ),
    Family(
        "LLaVA-NeXT",
        ("llava_next",),
        **_LLAVA_PARTS,
        inputs=InputRules(processors=("LlavaNextProcessor",)),
        notes="the learned image_newline vector stays frozen",
    ),
    Family(
        "LLaVA-OneVision",
        ("llava_onevision",),
        **_LLAVA_PARTS,
        inputs=InputRules(processors=("LlavaOnevisionProcessor",)),
        notes="the learned image_newline vector stays frozen",
    ),
    Family(
        "Qwen2-VL",
        ("qwen2_vl",),
        "model.language_model",
        ("model.visual.merger",),
        ("model.visual",),
        notes="the merger sits inside `visual`: it is trained, the rest of `visual` is frozen",
        inputs=InputRules(_QWEN_IMAGE, processors=("Qwen2VLProcessor",)),
    ),
    Family(
        "Qwen2.5-VL",
        ("qwen2_5_vl",),
        "model.language_model",
        ("model.visual.merger",),
        ("model.visual",),
        notes="as Qwen2-VL; the vision blocks' SwiGLU MLPs are never adapted",
        inputs=InputRules(_QWEN_IMAGE, processors=("Qwen2_5_VLProcessor",)),
    ),
    Family(
        "Qwen3-VL",
        ("qwen3_vl",),
        "model.language_model",
        ("model.visual.merger", "model.visual.deepstack_merger_list"),
        ("model.visual",),
        notes="the merger and the DeepStack mergers are trained, the rest of `visual` is frozen",
        inputs=InputRules(_QWEN_IMAGE, processors=("Qwen3VLProcessor",)),
    ),
    Family(
        "Gemma 3",
        ("gemma3",),
        "model.language_model",
        ("model.multi_modal_projector",),
        ("model.vision_tower",),
        inputs=InputRules("{boi_token}", processors=("Gemma3Processor",)),
    ),
    Family(
        "PaliGemma",
        ("paligemma",),
        "model.language_model",
        ("model.multi_modal_projector",),
        ("model.vision_tower",),
        inputs=InputRules(tokens="prefix", processors=("PaliGemmaProcessor",)),
    ),
    Family(
        "Idefics3",
        ("idefics3",),
        "model.text_model",
        ("model.connector",),
        ("model.vision_model",),
        notes="the language model is `text_model`, the projector the pixel-shuffle `connector`",
        inputs=InputRules(nested=True, processors=("Idefics3Processor",)),
    ),
    Family(
        "SmolVLM",
        ("smolvlm",),
        "model.text_model",
        ("model.connector",),
        ("model.vision_model",),
        notes="as Idefics3",
        inputs=InputRules(nested=True, processors=("SmolVLMProcessor",)),
    ),
    Family(
        "Mllama",
        ("mllama",),
        "model.language_model",
        ("model.multi_modal_projector",),
        ("model.vision_model",),
        notes=(
            "the cross-attention layers' q/k/v/o (`cross_attn`, part of the language model) get "
            "LoRA like self-attention; their tanh gates stay frozen"
        ),
        inputs=InputRules(nested=True, tokens="cross_attention", processors=("MllamaProcessor",)),
    ),
    Family(
        "causal LM",
        ("llama", "mistral", "qwen2", "qwen3"),
        "model",
        notes="text only: no projector",
    ),
)

_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def family_of(model: nn.Module) -> Family | None:
    """The :class:`Family` of ``model`` (by ``config.model_type``), or ``None`` if unknown."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return _BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None


_BY_PROCESSOR = {
    name: family for family in FAMILIES if family.inputs for name in family.inputs.processors
}


def family_of_processor(processor: object) -> Family | None:
    """The :class:`Family` whose processor class ``processor`` is (or derives from), or None."""
    for cls in type(processor).__mro__:
        family = _BY_PROCESSOR.get(cls.__name__)
        if family is not None:
            return family
    return None


def family_names() -> list[str]:
    """The supported families' names, for messages."""
    return [family.name for family in FAMILIES]


def resolve(model: nn.Module, path: str) -> str | None:
    """``path`` as it exists in ``model`` (or without its leading ``model.``), else ``None``.

    The empty string is the model itself.
    """
    candidates = [path]
    if path == "model":
        candidates.append("")
    elif path.startswith("model."):
        candidates.append(path.removeprefix("model."))
    for candidate in candidates:
        if _has_member(model, candidate):
            return candidate
    return None


def _has_member(model: nn.Module, path: str) -> bool:
    """Whether ``path`` names a submodule or a parameter of ``model``."""
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        pass
    try:
        model.get_parameter(path)
        return True
    except AttributeError:
        return False


def under(path: str, roots: tuple[str, ...] | list[str]) -> bool:
    """Whether the dotted ``path`` is one of ``roots`` or inside one of them."""
    return any(path == root or path.startswith(root + ".") for root in roots if root)


def vision_roots(model: nn.Module, family: Family | None) -> list[str]:
    """The paths of ``model``'s vision towers that exist (the family's, or found by name)."""
    if family is not None:
        return [p for p in (resolve(model, v) for v in family.vision) if p]
    roots: list[str] = []
    for name, _ in model.named_modules():
        if name and name.split(".")[-1] in VISION_WORDS and not under(name, roots):
            roots.append(name)
    return roots


def projector_roots(model: nn.Module, family: Family | None) -> list[str]:
    """The paths of what ``train_projector`` trains in ``model`` (may be empty)."""
    if family is not None:
        return [p for p in (resolve(model, v) for v in family.projector) if p]
    return [
        name for name, _ in model.named_modules() if name.split(".")[-1] == GENERIC_PROJECTOR_NAME
    ]


def is_vision(path: str, model_vision: list[str]) -> bool:
    """Whether a module path belongs to a vision tower (by family path or by name)."""
    return under(path, model_vision) or any(word in path.split(".") for word in VISION_WORDS)
