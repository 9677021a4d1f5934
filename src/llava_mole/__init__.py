"""llava-mole: sparse Mixture of LoRA Experts (LLaVA-MoLE, arXiv 2401.16160) for multimodal LLMs."""

from .adapters import (
    MoLEConfig,
    apply_mole,
    load_adapter,
    merge_and_save,
    merge_lora,
    mole_aux_loss,
    routing_stats,
    save_adapter,
    unload,
    unmerge_lora,
)

__version__ = "0.1.0"
__all__ = [
    "MoLEConfig",
    "apply_mole",
    "load_adapter",
    "merge_and_save",
    "merge_lora",
    "mole_aux_loss",
    "routing_stats",
    "save_adapter",
    "unload",
    "unmerge_lora",
]
