"""Stage-1-like captioning pretraining of the tiny LLaVA model.

LLaVA first aligns vision and language on image descriptions before instruction tuning. The
tiny model gets the same treatment at toy scale: a short full-parameter run (AdamW, linear
warm-up then cosine decay) on synthetic images of all three domains with plain-language
captions from :func:`llava_mole.toy.synthetic.caption_for`. Each example is encoded as

    ``<s>USER: <image>*16\\nDescribe the image. ASSISTANT: <caption></s>``

with the loss on the caption tokens (and ``</s>``) only. Captions never contain the code
words of the instruction-tuning task, so the base learns to see and to speak without
learning the task itself. A quarter of the examples instead ask "Say the word W." for a code
word W unrelated to the image, so that the LM can emit every word of its vocabulary (as any
pretrained LM can) without being taught which image goes with which code.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from llava_mole.toy import synthetic

IGNORE_INDEX = -100
PROMPT = f"USER: <image>\n{synthetic.PRETRAIN_QUESTION} ASSISTANT:"


@dataclass
class PretrainConfig:
    """Hyper-parameters of the captioning run.

    Attributes:
        steps: Optimiser steps.
        batch_size: Examples per step.
        lr: Peak learning rate.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        warmup_steps: Linear warm-up steps (capped at a tenth of ``steps``).
        weight_decay: AdamW weight decay (not applied to norms and biases).
        vision_lr_scale: Learning-rate multiplier of the vision tower and projector, which
            start from scratch and are the slowest part to learn.
        grad_clip: Max global gradient norm.
        train_images: Distinct training images over all domains (at most what one pass over
            ``steps * batch_size`` examples needs).
        domain_weights: Share of training images per domain, in the order of
            ``synthetic.DATASETS`` (scenes, charts, cells). Scenes get more: shape is the
            slowest attribute to learn from captions, colours, bars and stains come fast.
        say_word_share: Share of training examples that ask "Say the word W." for a code
            word (see :func:`synthetic_caption_set`).
        heldout_per_domain: Held-out images per domain for the before/after loss.
    """

    steps: int = 1200
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    vision_lr_scale: float = 1.0
    grad_clip: float = 1.0
    train_images: int = 9000
    domain_weights: tuple[float, ...] = (2.0, 1.0, 1.0)
    say_word_share: float = 0.25
    heldout_per_domain: int = 32


@dataclass
class PretrainResult:
    """Outcome of :func:`pretrain_captions`.

    Attributes:
        steps: Steps run.
        final_loss: Mean training caption loss over the last 10% of steps.
        heldout_loss_init: Held-out caption loss before training.
        heldout_loss_final: Held-out caption loss after training.
        seconds: Wall time of the run, data preparation included.
    """

    steps: int
    final_loss: float
    heldout_loss_init: float
    heldout_loss_final: float
    seconds: float

    def as_dict(self) -> dict[str, float | int]:
        """Marker-friendly dict (keys as written to ``tiny_world.json``).

        Returns:
            The fields, rounded, as a plain dict.
        """
        return {
            "pretrain_steps": self.steps,
            "final_pretrain_loss": round(self.final_loss, 4),
            "heldout_caption_loss_init": round(self.heldout_loss_init, 4),
            "heldout_caption_loss_final": round(self.heldout_loss_final, 4),
            "pretrain_seconds": round(self.seconds, 1),
        }


@dataclass
class CaptionSet:
    """Encoded caption examples.

    Attributes:
        pixel_values: ``(N, 3, H, W)`` processed images.
        input_ids: Per example, prompt (with expanded image tokens) + caption + ``</s>``.
        labels: Same length as ``input_ids``; ``-100`` on the prompt.
    """

    pixel_values: Tensor
    input_ids: list[Tensor]
    labels: list[Tensor]

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_captions(
    processor: LlavaProcessor,
    pairs: Iterable[tuple[Image.Image, str] | tuple[Image.Image, str, str]],
) -> CaptionSet:
    """Encode ``(image, caption)`` or ``(image, answer, question)`` examples.

    Each distinct prompt goes through the processor once, so the ``<image>`` expansion is
    exactly the processor's (and must match the model's image sequence length).

    Args:
        processor: The tiny model's ``LlavaProcessor``.
        pairs: Images (32x32 RGB), their captions (answers) and optionally a question other
            than "Describe the image.".

    Returns:
        A :class:`CaptionSet`.
    """
    examples = [p if len(p) == 3 else (p[0], p[1], synthetic.PRETRAIN_QUESTION) for p in pairs]
    images = [e[0] for e in examples]
    tokenizer = processor.tokenizer
    prompts: dict[str, Tensor] = {}
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    input_ids, labels = [], []
    for image, caption, question in examples:
        if question not in prompts:
            text = f"USER: <image>\n{question} ASSISTANT:"
            prompts[question] = processor(text=text, images=image, return_tensors="pt")[
                "input_ids"
            ][0]
        prompt = prompts[question]
        answer = tokenizer(" " + caption, add_special_tokens=False)["input_ids"]
        answer = torch.tensor([*answer, tokenizer.eos_token_id], dtype=torch.long)
        input_ids.append(torch.cat([prompt, answer]))
        labels.append(torch.cat([torch.full_like(prompt, IGNORE_INDEX), answer]))
    return CaptionSet(pixel_values=pixel_values, input_ids=input_ids, labels=labels)


def synthetic_caption_set(
    processor: LlavaProcessor,
    n_per_domain: int | Mapping[str, int],
    seed: int = 0,
    stream: int = 0,
    say_word_share: float = 0.0,
) -> CaptionSet:
    """Encode synthetic image/caption pairs from all three domains.

    Args:
        processor: The tiny model's processor.
        n_per_domain: Examples per domain, or a ``{dataset name: count}`` mapping.
        seed: World seed.
        stream: Sub-stream; use different streams for training and held-out sets.
        say_word_share: Share of examples that ask "Say the word W." for a word W of the
            synthetic vocabulary instead of a caption. A real LM can say every word of its
            vocabulary; without this the tiny LM's output rows of words that captions never
            use (the code words) stay random, and a low-rank adapter cannot reach them. The
            word is unrelated to the image, so nothing of the instruction task is taught.

    Returns:
        The encoded :class:`CaptionSet`.
    """
    examples = synthetic.caption_examples(n_per_domain, seed=seed, stream=stream)
    words = list(synthetic.CODE_WORDS)
    every = round(1 / say_word_share) if say_word_share > 0 else 0

    def items():
        for i, (img, cap, _) in enumerate(examples):
            if every and i % every == 0:
                yield (
                    img,
                    words[(i // every) % len(words)],
                    f"Say the word {words[(i // every) % len(words)]}.",
                )
            else:
                yield img, cap

    return encode_captions(processor, items())


def caption_file_sets(
    processor: LlavaProcessor, path: str | Path, heldout: int, seed: int = 0
) -> tuple[CaptionSet, CaptionSet]:
    """Training and held-out sets from a captions file in LLaVA's pretrain format.

    Each record is ``{"image": <path relative to the file's folder>, "conversations": [{"from":
    "human", "value": "<image>\\n<question>"}, {"from": "gpt", "value": <caption>}]}`` (the
    format of LLaVA's ``blip_laion_cc_sbu_558k.json``); the question after ``<image>`` is kept,
    so "Say the word W." records work too. A seeded ``heldout`` records (at most a tenth) are
    held out for the before/after loss.

    Raises:
        ValueError: One line naming the file and the first bad record.
    """
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read captions file {path}: {e}") from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"captions file {path}: expected a non-empty JSON list of records")
    examples = [_caption_example(path, k, r) for k, r in enumerate(records)]
    order = np.random.default_rng([seed, 5]).permutation(len(examples))
    n_held = min(heldout, len(examples) // 10)
    held = sorted(order[:n_held].tolist())
    held_set = set(held)
    train = [examples[k] for k in range(len(examples)) if k not in held_set]
    return encode_captions(processor, train), encode_captions(
        processor, [examples[k] for k in held]
    )


def _caption_example(path: Path, k: int, record: Any) -> tuple[Image.Image, str, str]:
    where = f"captions file {path}, record {k}"
    if not isinstance(record, dict) or not isinstance(record.get("image"), str):
        raise ValueError(f"{where}: needs an 'image' path")
    turns = record.get("conversations")
    if (
        not isinstance(turns, list)
        or len(turns) != 2
        or not all(isinstance(t, dict) for t in turns)
    ):
        raise ValueError(f"{where}: needs 'conversations' with one human and one gpt turn")
    question, caption = (str(t.get("value", "")) for t in turns)
    if "<image>" not in question or not caption.strip():
        raise ValueError(f"{where}: the human turn needs '<image>' and the gpt turn a caption")
    question = question.replace("<image>", "").strip() or synthetic.PRETRAIN_QUESTION
    try:
        with Image.open(path.parent / record["image"]) as img:
            image = img.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: cannot open image {record['image']!r}: {e}") from None
    return image, caption.strip(), question


def collate(data: CaptionSet, index: Sequence[int], pad_token_id: int) -> dict[str, Tensor]:
    """Right-pad a batch of examples.

    Args:
        data: Encoded examples.
        index: Which examples.
        pad_token_id: Padding id for ``input_ids``.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels``, ``pixel_values`` tensors.
    """
    length = max(len(data.input_ids[i]) for i in index)
    ids = torch.full((len(index), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(index), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(index), length), dtype=torch.long)
    for row, i in enumerate(index):
        n = len(data.input_ids[i])
        ids[row, :n] = data.input_ids[i]
        labels[row, :n] = data.labels[i]
        mask[row, :n] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "pixel_values": data.pixel_values[list(index)],
    }


def _token_loss_sum(model: LlavaForConditionalGeneration, batch: dict[str, Tensor]) -> Tensor:
    """Summed next-token cross-entropy over labelled positions."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()
    target = labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        target.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@torch.no_grad()
def caption_loss(
    model: LlavaForConditionalGeneration, data: CaptionSet, pad_token_id: int, batch_size: int = 64
) -> float:
    """Mean per-token caption loss (token-weighted over the whole set).

    Args:
        model: The model (evaluated in eval mode; its previous mode is restored).
        data: Encoded examples.
        pad_token_id: Padding id.
        batch_size: Evaluation batch size.

    Returns:
        Cross-entropy in nats per caption token.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = collate(data, range(start, min(start + batch_size, len(data))), pad_token_id)
        total += float(_token_loss_sum(model, batch))
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


def _train_counts(cfg: PretrainConfig) -> dict[str, int]:
    """Training images per domain: weighted, and no more than one pass needs."""
    total = min(cfg.train_images, cfg.steps * cfg.batch_size)
    weights = dict(zip(synthetic.DATASET_NAMES, cfg.domain_weights, strict=True))
    norm = sum(weights.values())
    return {name: max(1, math.ceil(total * w / norm)) for name, w in weights.items()}


def _param_groups(model: torch.nn.Module, cfg: PretrainConfig) -> list[dict]:
    """AdamW groups: no decay on norms/biases; vision side (tower, projector) lr-scaled."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        vision = "vision_tower" in name or "multi_modal_projector" in name
        decay = param.ndim >= 2 and "norm" not in name
        groups.setdefault((vision, decay), []).append(param)
    return [
        {
            "params": params,
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "lr_scale": cfg.vision_lr_scale if vision else 1.0,
        }
        for (vision, decay), params in groups.items()
    ]


def _lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def pretrain_captions(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    config: PretrainConfig | None = None,
    seed: int = 0,
    progress: bool = True,
    captions: str | Path | None = None,
) -> PretrainResult:
    """Full-parameter captioning pretraining (in place).

    Deterministic for a given seed (``torch.manual_seed`` plus a seeded batch order).

    Args:
        model: Model to train; left in eval mode.
        processor: Its processor.
        config: Hyper-parameters; defaults to :class:`PretrainConfig`.
        seed: Seed of data generation and batch order.
        progress: Show a tqdm progress bar.
        captions: A captions file in LLaVA's pretrain format (:func:`caption_file_sets`)
            instead of the demo world's generated captions.

    Returns:
        A :class:`PretrainResult` with final training and held-out losses.
    """
    cfg = config or PretrainConfig()
    start = time.perf_counter()
    torch.manual_seed(seed)
    pad = processor.tokenizer.pad_token_id
    if captions is not None:
        n_held = cfg.heldout_per_domain * len(synthetic.DATASETS)
        train, heldout = caption_file_sets(processor, captions, n_held, seed)
    else:
        train = synthetic_caption_set(
            processor, _train_counts(cfg), seed=seed, stream=0, say_word_share=cfg.say_word_share
        )
        heldout = synthetic_caption_set(processor, cfg.heldout_per_domain, seed=seed, stream=1)
    loss_init = caption_loss(model, heldout, pad)

    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.98))
    warmup = min(cfg.warmup_steps, max(1, cfg.steps // 10))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=generator)
    cursor = 0
    losses: list[float] = []
    model.train()
    bar = tqdm(range(cfg.steps), desc="pretrain", disable=not progress, leave=False)
    for step in bar:
        if cursor + cfg.batch_size > len(order):  # new epoch, new order
            order, cursor = torch.randperm(len(train), generator=generator), 0
        index = order[cursor : cursor + cfg.batch_size].tolist()
        cursor += cfg.batch_size
        for group in optimizer.param_groups:
            factor = _lr_factor(step, cfg.steps, warmup, cfg.min_lr_ratio)
            group["lr"] = cfg.lr * group["lr_scale"] * factor
        batch = collate(train, index, pad)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        losses.append(loss.detach().item())
        if step % 10 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    tail = losses[-max(1, cfg.steps // 10) :] if losses else [float("nan")]
    result = PretrainResult(
        steps=cfg.steps,
        final_loss=sum(tail) / len(tail),
        heldout_loss_init=loss_init,
        heldout_loss_final=caption_loss(model, heldout, pad),
        seconds=time.perf_counter() - start,
    )
    if progress:
        print(
            f"[llava-mole] pretraining done: train loss {result.final_loss:.3f}, held-out "
            f"{result.heldout_loss_init:.3f} -> {result.heldout_loss_final:.3f} "
            f"({result.seconds:.0f}s)"
        )
    return result
