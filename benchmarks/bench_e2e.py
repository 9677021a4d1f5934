"""End to end on a LLaVA-1.5-7B-shaped model: a full training step and decoding, side by side.

    python benchmarks/bench_e2e.py --device cuda --json OUT/e2e.json     # an H200: 7B shapes
    python benchmarks/bench_e2e.py --smoke                                # CPU, tiny shapes (tests)

Training (random weights built from the config on the device, bf16 base, CLIP-L/336 tower,
576 image tokens, sequence 2048, non-reentrant activation checkpointing): one optimizer step
(forward, backward, AdamW) through this package's trainer (``MoLETrainer``, the collator with
loss positions, fp32 master weights of the adapters under bf16 autocast, as ``llava-mole
train`` runs it) for

* ``peft_lora``: PEFT LoRA on the same targets (q/k/v/o/gate/up/down of the language model)
  with bf16 adapters (``autocast_adapter_dtype=False``), through the same trainer;
* ``lora``: this package's plain LoRA (``mode="lora"``) at rank r;
* ``mole``: MoLE with K experts of rank r (the paper's K=3 r=32, and K=8 r=128).

Decoding (``--decode``): greedy tokens/s at batch 1, 8 and 64 with a static KV cache, the
forward compiled with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) on CUDA, for
plain LoRA unmerged, LoRA merged and MoLE; decode time = time for N new tokens minus the
time for 1 (the prefill).

Every ratio the goals use (issue 23) is measured in this one run. Numbers are labelled with
the device; CPU numbers from ``--smoke`` only show that the script runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

GOALS = {
    "mole_step_vs_lora": 1.05,
    "lora_step_vs_peft": 1.0,
    "mole_memory_vs_lora": 1.05,
    "mole_decode_vs_lora_b1": 1.3,
    "mole_decode_vs_lora_b8": 1.3,
}


@dataclass
class Shape:
    """Model and batch sizes (``SEVEN_B``: LLaVA-1.5-7B; ``SMOKE``: tiny, for CPU tests)."""

    hidden: int = 4096
    intermediate: int = 11008
    layers: int = 32
    heads: int = 32
    vocab: int = 32064
    vision_hidden: int = 1024
    vision_intermediate: int = 4096
    vision_layers: int = 24
    vision_heads: int = 16
    image_size: int = 336
    patch: int = 14
    seq: int = 2048
    answer_tokens: int = 256
    batch: int = 1
    train_steps: int = 10
    warmup_steps: int = 3
    decode_batches: tuple[int, ...] = (1, 8, 64)  # the goal lines first: a timeout cuts 64
    new_tokens: int = 64
    adapters: tuple[tuple[int, int], ...] = ((3, 32), (8, 128))  # (K, r)

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2


SEVEN_B = Shape()
SMOKE = Shape(
    hidden=32,
    intermediate=64,
    layers=2,
    heads=4,
    vocab=128,
    vision_hidden=32,
    vision_intermediate=64,
    vision_layers=2,
    vision_heads=4,
    image_size=32,
    patch=8,
    seq=48,
    answer_tokens=8,
    batch=2,
    train_steps=2,
    warmup_steps=1,
    decode_batches=(1, 2),
    new_tokens=3,
    adapters=((3, 4),),
)
IMAGE_TOKEN_ID = 32000


@dataclass
class Row:
    variant: str
    kind: str  # "train" or "decode"
    experts: int
    rank: int
    batch: int
    tokens_per_s: float
    step_ms: float | None = None
    peak_mib: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def build_model(shape: Shape, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A LLaVA-1.5-shaped model with random weights, built directly on ``device``."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    config = LlavaConfig(
        text_config=LlamaConfig(
            hidden_size=shape.hidden,
            intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.heads,
            vocab_size=shape.vocab + 64,
            max_position_embeddings=max(4096, shape.seq + shape.new_tokens + 8),
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=shape.vision_hidden,
            intermediate_size=shape.vision_intermediate,
            num_hidden_layers=shape.vision_layers,
            num_attention_heads=shape.vision_heads,
            image_size=shape.image_size,
            patch_size=shape.patch,
        ),
        image_token_id=min(IMAGE_TOKEN_ID, shape.vocab + 1),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def adapt(model: torch.nn.Module, variant: str, experts: int, rank: int) -> torch.nn.Module:
    """Put the variant's adapter on ``model`` (trainable adapters; frozen base)."""
    if variant == "peft_lora":
        import peft

        targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        config = peft.LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=targets
        )
        model = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
        adapted = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert adapted > 0, "PEFT matched no target module"
        return model
    from llava_mole import MoLEConfig, apply_mole

    mode = "lora" if variant.startswith("lora") else "mole"
    apply_mole(model, MoLEConfig(mode=mode, rank=rank, alpha=2 * rank, num_experts=experts))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # fp32 masters, as `llava-mole train` keeps them
    return model


class _Synthetic(torch.utils.data.Dataset):
    """Fixed-length samples: 576 image tokens, text, labels on the last answer tokens."""

    def __init__(self, shape: Shape, image_token: int, count: int) -> None:
        self.shape, self.image_token, self.count = shape, image_token, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, Any]:
        shape = self.shape
        gen = torch.Generator().manual_seed(index)
        text = torch.randint(3, shape.vocab, (shape.seq - shape.image_tokens,), generator=gen)
        ids = torch.cat([torch.full((shape.image_tokens,), self.image_token), text])
        labels = torch.full_like(ids, -100)
        labels[-shape.answer_tokens :] = ids[-shape.answer_tokens :]
        pixels = torch.randn(3, shape.image_size, shape.image_size, generator=gen)
        return {"input_ids": ids, "labels": labels, "pixel_values": pixels, "domain_id": 0}


class _StepTimer:
    """Trainer callback: wall time of each optimizer step (device synchronised)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self._start = device, [], 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)
        if len(self.times) == args.warmup_measure and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()


def time_training(
    model, shape: Shape, device: torch.device, out_dir: Path
) -> tuple[float, float | None]:
    """Median step time (s) after warm-up, and the peak device memory (MiB) of the timed steps."""
    from transformers import TrainerCallback, TrainingArguments

    from llava_mole.data.collate import DataCollator
    from llava_mole.train.trainer import MoLETrainer

    steps = shape.warmup_steps + shape.train_steps
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=shape.batch,
        max_steps=steps,
        learning_rate=1e-4,
        bf16=device.type == "cuda",
        use_cpu=device.type != "cuda",
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    args.warmup_measure = shape.warmup_steps
    timer = _StepTimer(device)
    callback = type(
        "Timer",
        (TrainerCallback,),
        {
            "on_step_begin": lambda self, *a, **k: timer.on_step_begin(*a, **k),
            "on_step_end": lambda self, *a, **k: timer.on_step_end(*a, **k),
        },
    )()
    trainer = MoLETrainer(
        model=model,
        args=args,
        train_dataset=_Synthetic(shape, model_image_token(model), steps * shape.batch),
        data_collator=DataCollator(pad_token_id=0, loss_positions=True),
        domains=["all"],
        callbacks=[callback],
    )
    trainer._logits_to_keep = (
        True  # PeftModel hides the argument; every variant keeps the same logits
    )
    trainer.train()
    timed = sorted(timer.times[shape.warmup_steps :])
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return timed[len(timed) // 2], peak


def model_image_token(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    inner = getattr(getattr(model, "base_model", None), "model", None)
    return getattr(config, "image_token_id", None) or inner.config.image_token_id


def time_decoding(model, shape: Shape, device: torch.device, batch: int, compile_: bool) -> float:
    """Greedy decode tokens/s at ``batch`` with a static cache (prefill subtracted)."""
    gen = torch.Generator().manual_seed(1)
    prompt_text = 16
    ids = torch.cat(
        [
            torch.full((batch, shape.image_tokens), model_image_token(model)),
            torch.randint(3, shape.vocab, (batch, prompt_text), generator=gen),
        ],
        dim=1,
    ).to(device)
    dtype = next(p for p in model.parameters() if not p.requires_grad).dtype
    pixels = torch.randn(batch, 3, shape.image_size, shape.image_size, generator=gen).to(
        device, dtype
    )
    settings = dict(do_sample=False, cache_implementation="static", pad_token_id=0)

    def run(new: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                pixel_values=pixels,
                max_new_tokens=new,
                min_new_tokens=new,
                **settings,
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if compile_:
        model.forward = torch.compile(model.forward, mode="reduce-overhead")
    run(shape.new_tokens)  # warm-up (and compilation)
    full, prefill = min(run(shape.new_tokens) for _ in range(2)), min(run(1) for _ in range(2))
    return batch * (shape.new_tokens - 1) / max(full - prefill, 1e-9)


def _train_rows(shape: Shape, device: torch.device, dtype: torch.dtype, tmp: Path) -> list[Row]:
    rows = []
    for experts, rank in shape.adapters:
        for variant in ("peft_lora", "lora", "mole"):
            model = adapt(build_model(shape, device, dtype), variant, experts, rank)
            step, peak = time_training(model, shape, device, tmp / f"{variant}-{experts}-{rank}")
            tokens = shape.batch * shape.seq / step
            rows.append(Row(variant, "train", experts, rank, shape.batch, tokens, step * 1e3, peak))
            print(
                f"train {variant:>9} K={experts} r={rank}: {step * 1e3:8.1f} ms/step, "
                f"{tokens:9.0f} tokens/s, peak {peak or float('nan'):8.0f} MiB",
                flush=True,
            )
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _decode_rows(
    shape: Shape, device: torch.device, dtype: torch.dtype, compile_: bool
) -> list[Row]:
    from llava_mole import merge_lora

    experts, rank = shape.adapters[0]
    rows = []
    for variant in ("lora", "lora_merged", "mole"):
        for batch in shape.decode_batches:
            model = adapt(build_model(shape, device, dtype), variant, experts, rank).eval()
            for param in model.parameters():
                param.data = param.data.to(dtype)  # inference in the base dtype
            if variant == "lora_merged":
                merge_lora(model)
            tokens = time_decoding(model, shape, device, batch, compile_)
            rows.append(Row(variant, "decode", experts, rank, batch, tokens))
            print(f"decode {variant:>11} batch {batch:3d}: {tokens:9.1f} tokens/s", flush=True)
            del model
            torch._dynamo.reset()
    return rows


def ratios(rows: list[Row]) -> dict[str, float]:
    """The goal ratios (issue 23), for the paper's adapter (first in the plan)."""

    def pick(variant, kind, batch=None):
        for r in rows:
            if r.variant == variant and r.kind == kind and (batch is None or r.batch == batch):
                return r
        return None

    out: dict[str, float] = {}
    mole, lora, peft_ = pick("mole", "train"), pick("lora", "train"), pick("peft_lora", "train")
    if mole and lora:
        out["mole_step_vs_lora"] = lora.tokens_per_s / mole.tokens_per_s
        if mole.peak_mib and lora.peak_mib:
            out["mole_memory_vs_lora"] = mole.peak_mib / lora.peak_mib
    if lora and peft_:
        out["lora_step_vs_peft"] = peft_.tokens_per_s / lora.tokens_per_s
    for batch in (1, 8):
        m, l_ = pick("mole", "decode", batch), pick("lora", "decode", batch)
        if m and l_:
            out[f"mole_decode_vs_lora_b{batch}"] = l_.tokens_per_s / m.tokens_per_s
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU tests)")
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--decode", action="store_true", help="also time decoding")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--tmp", default="/tmp/bench_e2e")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape = SMOKE if args.smoke else SEVEN_B
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows: list[Row] = []
    if not args.no_train:
        rows += _train_rows(shape, device, dtype, Path(args.tmp))
    if args.decode:
        rows += _decode_rows(shape, device, dtype, compile_=device.type == "cuda")
    found = ratios(rows)
    verdicts = {k: ("PASS" if v <= GOALS[k] else "FAIL") for k, v in found.items()}
    for key, value in found.items():
        print(f"{key}: {value:.3f} (goal <= {GOALS[key]}) {verdicts[key]} [{device.type}]")
    result = {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "device_type": device.type,
        "commit": _commit(),
        "shape": asdict(shape),
        "rows": [asdict(r) for r in rows],
        "ratios": found,
        "verdicts": verdicts,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    main()
