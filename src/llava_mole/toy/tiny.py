"""A tiny but real LLaVA checkpoint, built fully offline.

:func:`make_tiny` writes a standard ``transformers`` model directory holding a
``LlavaForConditionalGeneration`` (Llama text model with SwiGLU MLPs, CLIP vision tower,
LLaVA's two-layer GELU projector; about one million parameters), a byte-level BPE tokenizer
trained on the synthetic world's vocabulary, and a ``LlavaProcessor`` backed by the PIL CLIP
image processor (no torchvision needed). With ``pretrain=True`` the model first gets a short
LLaVA-stage-1-like captioning run (:mod:`llava_mole.toy.pretrain`) so that instruction
tuning starts from a base that already sees and speaks; pretrained builds are cached under
``~/.cache/llava-mole/tiny/<key>`` (root overridable with ``LLAVA_MOLE_CACHE``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from llava_mole.toy import synthetic
from llava_mole.toy.defaults import DEFAULT_DATA_DIR, DEFAULT_TINY_MODEL_DIR

__all__ = [
    "BUILD_SPEC_VERSION",
    "DEFAULT_DATA_DIR",
    "DEFAULT_PRETRAIN_STEPS",
    "DEFAULT_TINY_MODEL_DIR",
    "build_config",
    "build_processor",
    "build_tiny",
    "build_tokenizer",
    "cache_key",
    "cache_root",
    "make_tiny",
    "tiny_cache_dir",
]

#: Bump whenever anything that changes the built files changes (invalidates the cache).
BUILD_SPEC_VERSION = "tiny-llava-v3"
DEFAULT_PRETRAIN_STEPS = 1200
# Pretraining always runs on this many threads: CPU kernels split their reductions by thread
# count, so builds made with different counts differ in the last bits and then diverge over
# 1200 steps (measured: the demo's gaps moved between domains). Two threads match the 2-core
# machines the demo is sized for, and make the build the same on any machine with the same
# CPU kernels.
PRETRAIN_THREADS = 2
MARKER_FILE = "tiny_world.json"

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN)  # ids 0..4, in this order
IMAGE_SIZE = synthetic.IMAGE_SIZE
PATCH_SIZE = 8
# CLIP adds a CLS token (+1) that the "default" strategy drops again (-1).
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# Generic English so that hand-written prompts still tokenize into whole words.
_GENERIC_WORDS = """
a an the and or but not no yes of to in on at by for from with without into over under
about above below between near inside outside this that these those it its there here
is are was were be been being am do does did has have had can could will would should may
might must what which who whom whose why how when where please tell me you your we our
they them their he she his her i my one two three four five six seven eight nine ten
first second third fourth fifth last next other another more most less least very much
many few some all any each every none only also just than then so if else because
image picture photo figure chart plot graph table diagram scan slide cell cells tissue
object objects shape shapes colour color colours colors size number count value values
left right top bottom middle centre center up down front back big small large tiny long
short tall wide narrow high low dark light bright pale black white grey gray red green
blue yellow orange purple pink brown cyan magenta describe description show shows
shown see look looks looking answer answers question questions word words code codes
name label class type kind same different similar both either neither image's user
assistant chat curious artificial intelligence helpful detailed polite human gpt
""".split()

# Vicuna-v1 style (LLaVA-1.5): "<system> USER: <image>\\n<q> ASSISTANT: <a></s>USER: ...".
# Accepts plain string contents or LLaVA-HF style lists of {"type": "image"|"text"} parts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set ns = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>\\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}"
    "{%- endif -%}{%- endfor -%}{%- set text = ns.text -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ text + ' ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' + text + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + text + eos_token }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def _tokenizer_corpus() -> list[str]:
    """Training text: task words repeated often (so they end up as whole tokens)."""
    task_words = synthetic.corpus_words()
    lines: list[str] = []
    for _ in range(8):
        lines += [" " + " ".join(task_words), " ".join(w.capitalize() for w in task_words)]
        lines += [f"USER: {synthetic.CODE_QUESTION} ASSISTANT: {w}" for w in synthetic.CODE_WORDS]
        lines += [f"\n{s.natural_question}" for s in synthetic.DATASETS]
        lines += [f"\n{synthetic.CODE_QUESTION}", f"\n{synthetic.PRETRAIN_QUESTION}"]
    lines += [VICUNA_SYSTEM] * 4
    lines += [" " + " ".join(_GENERIC_WORDS), " ".join(w.capitalize() for w in _GENERIC_WORDS)]
    lines += ["0 1 2 3 4 5 6 7 8 9 10 . , : ; ? ! ' \" ( ) - / %"]
    return lines


def build_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE tokenizer offline.

    Byte-level BPE never emits ``<unk>`` and decodes losslessly; the synthetic world's words
    are frequent in the training text, so each becomes a single token.

    Args:
        vocab_size: Upper bound of the vocabulary (bytes + merges + special tokens).

    Returns:
        A ``PreTrainedTokenizerFast`` with ``<s>``/``</s>``/``<pad>``/``<unk>``/``<image>``,
        BOS prepended on encode, and the vicuna-style chat template.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    # Llama-style: prepend BOS, never append EOS automatically.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=512,
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """Wrap the tokenizer and a 32-px PIL CLIP image processor into a ``LlavaProcessor``.

    Args:
        tokenizer: Tokenizer from :func:`build_tokenizer`.

    Returns:
        Processor whose ``<image>`` expansion (16 tokens) matches the model.
    """
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """The tiny LLaVA architecture.

    Args:
        tokenizer: Provides vocabulary size and special token ids.

    Returns:
        ``LlavaConfig`` with a 4-layer Llama (hidden 128) and a 2-layer CLIP ViT (hidden 64).
    """
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=64,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=NUM_IMAGE_TOKENS,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )


def build_tiny(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build a randomly initialised tiny model and its processor in memory.

    Args:
        seed: Seed for ``torch.manual_seed`` before weight initialisation.

    Returns:
        ``(model, processor)``.
    """
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    config = build_config(tokenizer)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor


def cache_root() -> Path:
    """Root of llava-mole's cache (``$LLAVA_MOLE_CACHE`` or ``~/.cache/llava-mole``).

    Returns:
        The cache root path (not necessarily existing).
    """
    env = os.environ.get("LLAVA_MOLE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llava-mole"


def _source_fingerprint() -> str:
    """Short hash of the code that determines a build (data, tokenizer, model, pretraining).

    Part of the cache key, so an edited generator never reuses a stale cached model even if
    nobody bumped :data:`BUILD_SPEC_VERSION`.
    """
    digest = hashlib.sha256(BUILD_SPEC_VERSION.encode())
    here = Path(__file__)
    for name in ("tiny.py", "pretrain.py", "synthetic.py", "classes.py", "draw.py"):
        path = here.with_name(name)
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def captions_fingerprint(captions: str | Path) -> str:
    """Short hash of a captions file and every image it names (part of the cache key)."""
    path = Path(captions)
    digest = hashlib.sha256(path.read_bytes())
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return digest.hexdigest()[:10]  # pretraining reports the bad file in one line
    for image in sorted({r.get("image") for r in records if isinstance(r, dict)} - {None}):
        file = path.parent / str(image)
        digest.update(file.read_bytes() if file.is_file() else b"missing")
    return digest.hexdigest()[:10]


def cache_key(seed: int, steps: int, captions: str | Path | None = None) -> str:
    """Cache key of a pretrained build.

    Args:
        seed: Build seed.
        steps: Pretraining steps.
        captions: The captions file pretrained on (None: the demo world's captions).

    Returns:
        A directory-name-safe key: spec version, seed, steps, a source fingerprint and, for a
        captions file, its fingerprint.
    """
    key = f"{BUILD_SPEC_VERSION}-seed{seed}-steps{steps}-{_source_fingerprint()}"
    return key if captions is None else f"{key}-captions{captions_fingerprint(captions)}"


def tiny_cache_dir(
    seed: int = 0, steps: int = DEFAULT_PRETRAIN_STEPS, captions: str | Path | None = None
) -> Path:
    """Where a pretrained build is cached.

    Args:
        seed: Build seed.
        steps: Pretraining steps.
        captions: The captions file pretrained on (None: the demo world's).

    Returns:
        ``<cache_root>/tiny/<key>``.
    """
    return cache_root() / "tiny" / cache_key(seed, steps, captions)


def _copy_dir(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file():
            shutil.copy2(item, dst / item.name)


def _save(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    out: Path,
    marker: dict[str, Any],
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # Marker last: its presence means the directory is complete.
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")


def make_tiny(
    out_dir: str | Path,
    seed: int = 0,
    pretrain: bool = True,
    pretrain_steps: int | None = None,
    progress: bool = True,
    captions: str | Path | None = None,
) -> Path:
    """Write the tiny LLaVA model directory (model, tokenizer, processor, marker).

    Args:
        out_dir: Target directory (created if missing; existing files are overwritten).
        seed: Seed for the weights and the pretraining run.
        pretrain: Run (or reuse from cache) the stage-1 captioning pretraining.
        pretrain_steps: Optimiser steps of pretraining; ``None`` uses
            :data:`DEFAULT_PRETRAIN_STEPS`.
        progress: Print progress (tqdm bar while pretraining).
        captions: Pretrain on this captions file (LLaVA's pretrain JSON format, e.g. the
            ``captions.json`` of a :mod:`llava_mole.toy.worlds` world) instead of the demo
            world's captions. The tokenizer stays the built-in one (byte-level: any text works).

    Returns:
        ``out_dir`` as a :class:`Path`; loadable with ``AutoProcessor.from_pretrained`` and
        ``AutoModelForImageTextToText.from_pretrained``.
    """
    out = Path(out_dir)
    steps = DEFAULT_PRETRAIN_STEPS if pretrain_steps is None else int(pretrain_steps)
    marker: dict[str, Any] = {
        "builder": "llava_mole.toy.tiny.make_tiny",
        "spec_version": BUILD_SPEC_VERSION,
        "seed": seed,
        "pretrain": pretrain,
        "pretrain_steps": steps if pretrain else 0,
    }
    if captions is not None:
        marker["pretrain_captions"] = str(Path(captions).resolve())
    if pretrain:
        cached = tiny_cache_dir(seed, steps, captions)
        if (cached / MARKER_FILE).is_file():
            if progress:
                print(f"[llava-mole] tiny model from cache {cached}")
            _copy_dir(cached, out)
            marker = json.loads((out / MARKER_FILE).read_text(encoding="utf-8"))
            marker["from_cache"] = str(cached)
            (out / MARKER_FILE).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
            return out

    # Imported lazily: pretrain imports this module for the build helpers.
    from llava_mole.toy.pretrain import PretrainConfig, pretrain_captions

    model, processor = build_tiny(seed)
    if pretrain:
        if progress:
            print(f"[llava-mole] pretraining tiny model ({steps} steps, seed {seed})")
        threads = torch.get_num_threads()
        torch.set_num_threads(PRETRAIN_THREADS)
        try:
            result = pretrain_captions(
                model,
                processor,
                PretrainConfig(steps=steps),
                seed=seed,
                progress=progress,
                captions=captions,
            )
        finally:
            torch.set_num_threads(threads)
        marker.update(result.as_dict())
        marker["pretrain_threads"] = PRETRAIN_THREADS
    marker.update(
        {
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(processor.tokenizer),
            "image_tokens": NUM_IMAGE_TOKENS,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )
    model.eval()
    if not pretrain:
        _save(model, processor, out, marker)
        return out

    marker["cache_key"] = cache_key(seed, steps, captions)
    cached = tiny_cache_dir(seed, steps, captions)
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = cached.parent / f".{cached.name}.{uuid.uuid4().hex}"
    _save(model, processor, staging, marker)
    try:
        staging.replace(cached)  # atomic publish; a concurrent writer may have won
    except OSError:
        _copy_dir(staging, out)
        shutil.rmtree(staging, ignore_errors=True)
        return out
    _copy_dir(cached, out)
    return out
