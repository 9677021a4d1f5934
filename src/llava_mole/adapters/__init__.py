"""MoLE and LoRA adapter layers, injection into Hugging Face models, and adapter files."""

from .config import MoLEConfig
from .inject import (
    AdapterError,
    apply_mole,
    count_trainable,
    merge_lora,
    merge_mole,
    unload,
    unmerge_lora,
)
from .io import load_adapter, save_adapter
from .lora import LoRALinear
from .merge import merge_and_save, merge_and_unload
from .moe_export import export_moe
from .mole import MoLEMLP
from .observe import enable_routing_stats, routing_stats, routing_summary, set_token_tags
from .state import mole_aux_loss, set_dense_routing, set_routing_domains

__all__ = [
    "AdapterError",
    "LoRALinear",
    "MoLEConfig",
    "MoLEMLP",
    "apply_mole",
    "count_trainable",
    "enable_routing_stats",
    "export_moe",
    "load_adapter",
    "merge_and_save",
    "merge_and_unload",
    "merge_lora",
    "merge_mole",
    "mole_aux_loss",
    "routing_stats",
    "routing_summary",
    "save_adapter",
    "set_dense_routing",
    "set_routing_domains",
    "set_token_tags",
    "unload",
    "unmerge_lora",
]
