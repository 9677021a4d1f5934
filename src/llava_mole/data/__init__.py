"""Data layer: LLaVA-format and Hugging Face `datasets` loading and validation, mixtures,
presets of public datasets, prompt templates, images, batching.

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
from .convert import PRESETS, write_mixture
from .formats import (
    ASSISTANT,
    IMAGE_PLACEHOLDER,
    USER,
    DataConfigError,
    DataError,
    LoadReport,
    Sample,
    Skip,
)
from .hf import HFRows, HFSource, load_hf_samples, open_hf_split, resolve_columns, scan_hf_rows
from .images import (
    EmbeddedImage,
    ImageLoadError,
    check_image_file,
    load_image,
    pixel_values,
    to_rgb,
)
from .mixture import (
    KNOWN_METRICS,
    DatasetSpec,
    MixtureConfig,
    build_datasets,
    load_mixture,
    load_split,
)
from .records import load_llava_file, validate_record
from .selection import SampleView
from .templates import (
    IGNORE_INDEX,
    TEMPLATES,
    VICUNA_V1_SYSTEM,
    ConversationEncoder,
    EncodedConversation,
    EncodeError,
    build_prompt_for_generation,
    encode_conversation,
)
from .tokens import image_token_id, num_image_tokens

__all__ = [
    "ASSISTANT",
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "KNOWN_METRICS",
    "PRESETS",
    "TEMPLATES",
    "USER",
    "VICUNA_V1_SYSTEM",
    "ConversationEncoder",
    "DataCollator",
    "DataConfigError",
    "DataError",
    "DatasetSpec",
    "EncodeError",
    "EmbeddedImage",
    "EncodedConversation",
    "HFRows",
    "HFSource",
    "ImageLoadError",
    "InstructDataset",
    "LoadReport",
    "MixtureConfig",
    "ModalityLengthGroupedSampler",
    "Sample",
    "SampleView",
    "Skip",
    "build_datasets",
    "build_prompt_for_generation",
    "check_image_file",
    "encode_conversation",
    "image_token_id",
    "load_hf_samples",
    "load_image",
    "load_llava_file",
    "load_mixture",
    "load_split",
    "modality_length_grouped_indices",
    "num_image_tokens",
    "open_hf_split",
    "pixel_values",
    "resolve_columns",
    "scan_hf_rows",
    "to_rgb",
    "validate_record",
    "write_mixture",
]
