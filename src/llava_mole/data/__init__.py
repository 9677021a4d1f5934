"""Data layer: LLaVA-format loading and validation, mixtures, prompt templates, images, batching.

Typical use::

    dataset, report = build_datasets("mixture.yaml", processor, split="train")
    print(report.summary())
    collator = DataCollator.from_processor(processor)
"""

from .collate import (
    DataCollator,
    InstructDataset,
    ModalityLengthGroupedSampler,
    modality_length_grouped_indices,
)
from .formats import (
    ASSISTANT,
    IMAGE_PLACEHOLDER,
    USER,
    DataConfigError,
    DataError,
    LoadReport,
    Sample,
    Skip,
    load_llava_file,
    validate_record,
)
from .images import ImageLoadError, check_image_file, load_image, pixel_values, to_rgb
from .mixture import (
    KNOWN_METRICS,
    DatasetSpec,
    MixtureConfig,
    build_datasets,
    load_mixture,
    load_split,
)
from .templates import (
    IGNORE_INDEX,
    TEMPLATES,
    VICUNA_V1_SYSTEM,
    ConversationEncoder,
    EncodedConversation,
    EncodeError,
    build_prompt_for_generation,
    encode_conversation,
    image_token_id,
    num_image_tokens,
)

__all__ = [
    "ASSISTANT",
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "KNOWN_METRICS",
    "TEMPLATES",
    "USER",
    "VICUNA_V1_SYSTEM",
    "ConversationEncoder",
    "DataCollator",
    "DataConfigError",
    "DataError",
    "DatasetSpec",
    "EncodeError",
    "EncodedConversation",
    "ImageLoadError",
    "InstructDataset",
    "LoadReport",
    "MixtureConfig",
    "ModalityLengthGroupedSampler",
    "Sample",
    "Skip",
    "build_datasets",
    "build_prompt_for_generation",
    "check_image_file",
    "encode_conversation",
    "image_token_id",
    "load_image",
    "load_llava_file",
    "load_mixture",
    "load_split",
    "modality_length_grouped_indices",
    "num_image_tokens",
    "pixel_values",
    "to_rgb",
    "validate_record",
]
