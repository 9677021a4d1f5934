"""Memory per GPU of each data-parallel engine for LLaVA-1.5-7B with a MoLE or LoRA adapter.

Counts parameters on a meta-device model (no weights, seconds on a CPU) built from the
LLaVA-1.5-7B configuration (Vicuna-7B + CLIP ViT-L/14-336 + the 2-layer projector) and adapted
with ``configs/llava-1.5-7b-mole.yaml``'s adapter, then applies the ZeRO paper's accounting
(Rajbhandari et al. 2020, mixed-precision Adam: 2 bytes of bf16 weight + 2 of gradient + 12 of
fp32 master weight and Adam moments per trainable parameter; our DDP keeps the trainables in
fp32 with fp32 gradients: the same 16 bytes) to the trainable part only. The frozen base is
bf16 (2 bytes per parameter), replicated under DDP/ZeRO-1/2, sharded under ZeRO-3/FSDP2.
Model states only: activations (with activation checkpointing about one (batch x tokens x
4096) bf16 tensor per layer, plus one layer's recomputation) come on top under every engine.

    python benchmarks/zero_memory.py [--gpus 16] [--adapter mole|lora]
"""

from __future__ import annotations

import argparse

GB = 1e9


def llava_7b_counts(adapter: str) -> tuple[int, int]:
    """``(frozen, trainable)`` parameter counts of LLaVA-1.5-7B with the paper's adapter."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from llava_mole import MoLEConfig, apply_mole
    from llava_mole.models.reference import llava_15_7b_config

    config = llava_15_7b_config()
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    apply_mole(model, MoLEConfig(mode=adapter, rank=32, alpha=64, num_experts=3, top_k=1))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return frozen, trainable


def per_gpu(frozen: int, trainable: int, gpus: int) -> list[tuple[str, float, float, float]]:
    """``(engine, base GB, trainable states GB, total GB)`` per GPU."""
    base, psi = 2 * frozen, trainable
    rows = [
        ("DDP (torchrun, no engine)", base, 16 * psi),
        ("ZeRO-1 (optimizer states sharded)", base, 4 * psi + 12 * psi / gpus),
        ("ZeRO-2 (+ gradients sharded)", base, 2 * psi + 14 * psi / gpus),
        ("ZeRO-3 (+ parameters sharded)", base / gpus, 16 * psi / gpus),
        ("FSDP2 full_shard (fp32 shards, bf16 compute)", base / gpus, 16 * psi / gpus),
    ]
    return [(name, b / GB, s / GB, (b + s) / GB) for name, b, s in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=16, help="data-parallel processes (2 x 8)")
    parser.add_argument("--adapter", choices=("mole", "lora"), default="mole")
    args = parser.parse_args()
    frozen, trainable = llava_7b_counts(args.adapter)
    print(
        f"LLaVA-1.5-7B, {args.adapter} r=32 (K=3): {frozen / 1e9:.3f} B frozen (bf16), "
        f"{trainable / 1e6:.1f} M trainable; {args.gpus} GPUs"
    )
    print("| engine | frozen base | trainable states | model states per GPU |")
    print("|---|---|---|---|")
    for name, base, states, total in per_gpu(frozen, trainable, args.gpus):
        print(f"| {name} | {base:.2f} GB | {states:.2f} GB | {total:.2f} GB |")


if __name__ == "__main__":
    main()
