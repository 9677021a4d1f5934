"""Generation-based evaluation: batched greedy decoding, per-domain scores, routing picture.

:func:`evaluate` answers every test sample of a mixture with greedy decoding (KV cache, left
padding), scores the answers per domain with the mixture's metrics and, for MoLE adapters,
measures which experts the routers pick per domain and token type (text / image) with one
teacher-forced forward per batch. :func:`predict` answers one question about one image. Both
decode through :func:`generate_answers`, a greedy front end of
:func:`llava_mole.eval.decoding.generate_batch`, the only place that calls ``model.generate``
(the server of :mod:`llava_mole.serve` uses it too).
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from llava_mole.adapters.inject import merge_lora, unmerge_lora
from llava_mole.adapters.io import atomic_write_bytes, load_adapter, read_adapter_config
from llava_mole.adapters.state import (
    TOKEN_KINDS,
    get_state,
    routing_stats,
    set_routing_domains,
    set_token_tags,
)
from llava_mole.data.formats import ASSISTANT, IMAGE_PLACEHOLDER, USER, Sample
from llava_mole.data.images import IMAGE_MODES, ImageLoadError, load_image, pixel_values
from llava_mole.data.mixture import MixtureConfig, load_mixture, load_split
from llava_mole.data.templates import (
    TEMPLATES,
    ConversationEncoder,
    EncodeError,
    build_prompt_for_generation,
    get_tokenizer,
)
from llava_mole.eval.batching import (
    ImageInput,
    model_device,
    model_dtype,
    pad_token_id,
    stack_pixels,
)
from llava_mole.eval.decoding import DecodeParams, generate_batch
from llava_mole.eval.metrics import score_predictions
from llava_mole.models.loading import context_length, load_model_and_processor

__all__ = [
    "evaluate",
    "generate_answers",
    "inference_prompt_format",
    "loaded_for_inference",
    "predict",
]

PathLike = str | os.PathLike[str]


# ---------------------------------------------------------------------------
# Generation (the one place that decodes)
# ---------------------------------------------------------------------------


def generate_answers(
    model: nn.Module,
    processor: Any,
    prompts: Sequence[torch.Tensor | Sequence[int]],
    images: Sequence[ImageInput | None] | None = None,
    *,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    image_mode: str = "pad",
) -> list[str]:
    """Greedy answers (KV cache, left-padded batches) to ready-made generation prompts.

    Args:
        model: A LLaVA-style model or causal LM (put it in eval mode first).
        processor: Its processor (or tokenizer for a text-only model).
        prompts: Prompt token ids, each ending with the assistant prefix and with the image
            tokens already expanded (see `build_prompt_for_generation`).
        images: One entry per prompt: a PIL image, pixel values ``(3, H, W)``, or None for a
            text-only prompt. None: all prompts are text-only.
        max_new_tokens: Maximum number of generated tokens per answer.
        batch_size: Prompts decoded together.
        image_mode: ``pad`` or ``resize``, for PIL images (see `llava_mole.data.images`).

    Returns:
        The decoded new tokens of each prompt (special tokens skipped, stripped), in order.

    Raises:
        ValueError: Bad arguments (lengths differ, non-positive sizes).
    """
    if images is None:
        images = [None] * len(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    params = DecodeParams(max_new_tokens=max_new_tokens)
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        out = generate_batch(
            model,
            processor,
            prompts[start : start + batch_size],
            images[start : start + batch_size],
            params,
            image_mode=image_mode,
        )
        answers.extend(g.text for g in out)
    return answers


# ---------------------------------------------------------------------------
# Model acquisition and inference mode
# ---------------------------------------------------------------------------


def _acquire(
    model_dir: PathLike | None,
    model: nn.Module | None,
    processor: Any,
    adapter_dir: PathLike | None,
    dtype: str,
    device: str | None,
    trust_remote_code: bool,
) -> tuple[nn.Module, Any, bool]:
    """Returns ``(model, processor, owned)``; ``owned`` is True when the model was loaded here."""
    owned = model is None
    if model is None:
        if model_dir is None:
            raise ValueError("give model_dir, or model and processor")
        model, loaded_processor = load_model_and_processor(model_dir, dtype, trust_remote_code)
        processor = loaded_processor if processor is None else processor
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    elif processor is None:
        raise ValueError("a model was given without its processor")
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    return model, processor, owned


@contextmanager
def _inference(model: nn.Module, merge: bool) -> Iterator[None]:
    """Eval mode (and merged plain LoRA) for the block; the previous state is restored after.

    Merging folds only plain-LoRA layers into their weights; MoLE blocks stay unmerged (their
    expert depends on the token), so outputs and routing are unchanged, only faster.
    """
    was_training = model.training
    model.eval()
    merged = merge_lora(model) if merge else 0
    try:
        yield
    finally:
        if merged:
            unmerge_lora(model)
        model.train(was_training)


@contextmanager
def loaded_for_inference(
    model_dir: PathLike,
    adapter_dir: PathLike | None = None,
    *,
    dtype: str = "float32",
    device: str | None = None,
    trust_remote_code: bool = False,
) -> Iterator[tuple[nn.Module, Any]]:
    """Loads a model (and adapter) for answering, as `predict` does, for the block.

    The model is in eval mode with plain-LoRA layers merged (MoLE blocks stay unmerged), so a
    long-lived caller (the server) decodes exactly as `predict`.

    Yields:
        ``(model, processor)``.
    """
    model, processor, _ = _acquire(
        model_dir, None, None, adapter_dir, dtype, device, trust_remote_code
    )
    with _inference(model, True):
        yield model, processor


# ---------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------


@dataclass
class _Item:
    """One evaluated sample with its prompt (and teacher-forced ids for routing)."""

    sample: Sample
    prompt: torch.Tensor
    full: torch.Tensor | None
    question: str
    reference: str | list[str]


def _reference(sample: Sample) -> str | list[str]:
    """The last assistant turn, or the VQA-style ``answers`` list of the record if present."""
    answers = sample.meta.get("answers")
    if isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers):
        return list(answers)
    return sample.turns[-1][1]


def _per_domain_limit(samples: list[Sample], limit: int | None) -> list[Sample]:
    """The first `limit` samples of each domain (all with None), in order."""
    if limit is None:
        return samples
    seen: Counter[str] = Counter()
    kept = []
    for sample in samples:
        if seen[sample.domain] < limit:
            seen[sample.domain] += 1
            kept.append(sample)
    return kept


def _prepare(
    samples: Sequence[Sample], encoder: ConversationEncoder, teacher_forced: bool, skipped: Counter
) -> list[_Item]:
    """Builds the prompt of each sample: all turns but the final answer (earlier QA = context)."""
    items = []
    for sample in samples:
        if len(sample.turns) < 2 or sample.turns[-1][0] != ASSISTANT:
            skipped["no_final_answer"] += 1
            continue
        try:
            prompt = torch.tensor(encoder.prompt(sample.turns[:-1]), dtype=torch.long)
        except EncodeError as err:
            skipped[err.reason] += 1
            continue
        full = None
        if teacher_forced:
            try:
                full = torch.tensor(encoder.encode(sample.turns).input_ids, dtype=torch.long)
            except EncodeError:
                # Still scored, only left out of the routing picture: the scores must not
                # depend on whether routing is measured.
                full = None
        question = sample.turns[-2][1].replace(IMAGE_PLACEHOLDER, "").strip()
        items.append(_Item(sample, prompt, full, question, _reference(sample)))
    return items


def _load_images(
    batch: list[_Item], processor: Any, image_mode: str, skipped: Counter
) -> tuple[list[_Item], list[torch.Tensor | None]]:
    """Pixel values of a batch; samples whose image fails now are dropped and counted."""
    kept: list[_Item] = []
    pixels: list[torch.Tensor | None] = []
    image_processor = getattr(processor, "image_processor", None)
    for item in batch:
        if item.sample.image is None:
            kept.append(item)
            pixels.append(None)
            continue
        if image_processor is None:
            raise ValueError(
                f"sample {item.sample.id!r} has an image but the processor has no image_processor"
            )
        try:
            img = load_image(item.sample.image)
        except ImageLoadError as err:
            skipped[err.reason] += 1
            continue
        kept.append(item)
        pixels.append(pixel_values([img], image_processor, image_mode)[0])  # type: ignore[arg-type]
    return kept, pixels


def _routing_forward(
    model: nn.Module,
    batch: list[_Item],
    pixels: list[torch.Tensor | None],
    domain_ids: list[int],
    num_domains: int,
    processor: Any,
) -> None:
    """One teacher-forced forward (prompt + reference answer) with routing statistics on.

    Args:
        model: The model with MoLE blocks.
        batch: The batch's items; those without teacher-forced ids are left out.
        pixels: Pixel values of each item (None: text-only).
        domain_ids: Domain index of each item.
        num_domains: Number of domains of the picture.
        processor: The processor (pad token).
    """
    state = get_state(model)
    assert state is not None
    keep = [k for k, item in enumerate(batch) if item.full is not None]
    if not keep:
        return
    pixels = [pixels[k] for k in keep]
    domain_ids = [domain_ids[k] for k in keep]
    device, dtype = model_device(model), model_dtype(model)
    fulls = [batch[k].full for k in keep]
    length = max(len(f) for f in fulls)  # type: ignore[arg-type]
    ids = torch.full((len(fulls), length), pad_token_id(get_tokenizer(processor)))
    mask = torch.zeros((len(fulls), length), dtype=torch.long)
    answer = torch.zeros((len(fulls), length), dtype=torch.bool)
    for row, (k, full) in enumerate(zip(keep, fulls)):
        ids[row, : len(full)] = full  # type: ignore[arg-type]
        mask[row, : len(full)] = 1  # padding is excluded from the counts through the mask
        # Positions whose next token is an answer token: where the answer is produced.
        answer[row, len(batch[k].prompt) - 1 : len(full) - 1] = True
    inputs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    stacked = stack_pixels(pixels, processor, "pad", dtype, device)
    if stacked is not None:
        inputs["pixel_values"] = stacked
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        inputs["logits_to_keep"] = 1  # only the routing matters, skip the full LM head
    set_token_tags(model, torch.tensor(domain_ids, device=device), num_domains, answer.to(device))
    state.collect_stats = True
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        state.collect_stats = False


def _routing_picture(model: nn.Module, domains: list[str]) -> dict[str, Any] | None:
    """Shares of tokens per expert, per block, domain and token type, from the counts."""
    stats = routing_stats(model)
    if not stats:
        return None
    experts = next(iter(stats.values())).shape[-1]
    blocks = []
    for block, counts in stats.items():
        for d, domain in enumerate(domains):
            entry: dict[str, Any] = {"block": int(block), "domain": domain}
            rows = {kind: counts[d, t].double() for t, kind in enumerate(TOKEN_KINDS)}
            # "text" is every text token, answer-producing positions included (the paper's
            # split); "answer" is that subset alone.
            rows["text"] = rows["text"] + rows["answer"]
            for kind, row in rows.items():
                total = float(row.sum())
                # Counts are fractions 1/top_k per chosen expert, so the row sum is the token count.
                entry[kind] = (row / total).tolist() if total > 0 else None
                entry[f"{kind}_tokens"] = int(round(total))
            blocks.append(entry)
    return {"experts": int(experts), "domains": list(domains), "blocks": blocks}


def _write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Writes one JSON record per line, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(path, text.encode("utf-8"))


def evaluate(
    model_dir: PathLike | None = None,
    adapter_dir: PathLike | None = None,
    mixture: PathLike | MixtureConfig | None = None,
    split: str = "test",
    out: PathLike | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    limit: int | None = None,
    routing: bool = True,
    model: nn.Module | None = None,
    processor: Any = None,
    progress: bool = True,
    *,
    predictions: PathLike | None = None,
    dtype: str = "float32",
    device: str | None = None,
    merge: bool | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Evaluates a model (optionally with an adapter) on one split of a mixture.

    Each sample is answered with greedy decoding from all of its turns but the last assistant
    turn (earlier QA pairs are context); the reference is that last answer, or the record's
    ``answers`` list when present (VQA style). Answers are scored per domain with the mixture's
    metrics. With ``routing`` and a MoLE adapter, one teacher-forced forward per batch (prompt +
    reference answer) measures the expert shares per block, domain and token type.

    Args:
        model_dir: Model directory (unless `model` is given; then only reported).
        adapter_dir: Adapter directory loaded into the model, or None.
        mixture: Mixture YAML file or loaded `MixtureConfig` (required).
        split: ``test`` or ``train``.
        out: JSON file for the result (atomic write), or None.
        batch_size: Samples per generation batch (and per routing forward).
        max_new_tokens: Maximum answer length in tokens.
        limit: At most this many samples per domain (the first ones), or None for all.
        routing: Collect the routing picture (MoLE adapters only; else ``routing`` is None).
        model: An already loaded model; used as is (an adapter is still loaded if given).
        processor: Its processor (required with `model`).
        progress: Show a tqdm progress bar.
        predictions: Predictions JSONL path; default ``<out stem>.predictions.jsonl`` next to
            `out`, or no file when `out` is None too.
        dtype: Weight dtype when loading (``float32``, ``bfloat16``, ``float16``).
        device: Device when loading (default: cuda if available, else cpu).
        merge: Merge plain-LoRA layers for speed. None: only for a model loaded here (merging
            and unmerging a caller's model is not bit-exact); a caller's model is unmerged after.
        trust_remote_code: Passed to the loader.

    Returns:
        ``{"model", "adapter", "split", "per_domain", "overall", "n", "skipped", "predictions",
        "routing", "wall_time_s"}``: ``per_domain``/``overall`` as in `score_predictions`,
        ``skipped`` counts dropped samples per reason (loading and evaluation), ``routing`` is
        ``{"experts": K, "domains": [...], "blocks": [{"block", "domain", "text", "image",
        "answer", "text_tokens", "image_tokens", "answer_tokens"}, ...]}`` (expert shares; None
        where a kind has no tokens; ``answer``: the positions that predict the reference
        answer's tokens, a subset of ``text``) or None.

    Raises:
        ValueError: Missing mixture/model, bad sizes.
        DataConfigError: Bad mixture or missing files.
    """
    start = time.perf_counter()
    if mixture is None:
        raise ValueError("evaluate needs a mixture (YAML path or MixtureConfig)")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    cfg = mixture if isinstance(mixture, MixtureConfig) else load_mixture(mixture)
    samples, report = load_split(cfg, split, strict=False)
    skipped: Counter[str] = Counter(report.skipped)
    samples = _per_domain_limit(samples, limit)

    model, processor, owned = _acquire(
        model_dir, model, processor, adapter_dir, dtype, device, trust_remote_code
    )
    state = get_state(model) if routing else None
    # One encoder, configured as training's: the same ids.
    encoder = ConversationEncoder(processor, cfg.template, system=cfg.system)
    items = _prepare(samples, encoder, state is not None, skipped)
    domains = [d for d in cfg.domains if any(it.sample.domain == d for it in items)]
    domain_index = {d: i for i, d in enumerate(domains)}

    records: list[dict[str, Any]] = []
    picture = None
    saved = None
    if state is not None:  # the caller's statistics and tags survive this evaluation
        saved = (
            state.collect_stats,
            state.stats,
            state.domain_ids,
            state.num_domains,
            state.answer_mask,
        )
        state.collect_stats, state.stats = False, {}
    bar = tqdm(total=len(items), desc="evaluate", unit="sample", disable=not progress)
    try:
        with _inference(model, owned if merge is None else merge):
            for begin in range(0, len(items), batch_size):
                batch, pixels = _load_images(
                    items[begin : begin + batch_size], processor, cfg.image_mode, skipped
                )
                if batch:
                    # Domain-routed adapters (a diagnostic) send tokens by the sample's domain.
                    set_routing_domains(model, [it.sample.domain for it in batch])
                    answers = generate_answers(
                        model,
                        processor,
                        [it.prompt for it in batch],
                        pixels,
                        max_new_tokens=max_new_tokens,
                        batch_size=len(batch),
                    )
                    for item, answer in zip(batch, answers, strict=True):
                        records.append(
                            {
                                "id": item.sample.id,
                                "domain": item.sample.domain,
                                "question": item.question,
                                "prediction": answer,
                                "reference": item.reference,
                            }
                        )
                    if state is not None:
                        ids = [domain_index[it.sample.domain] for it in batch]
                        _routing_forward(model, batch, pixels, ids, len(domains), processor)
                bar.update(min(batch_size, len(items) - begin))
            if state is not None:
                picture = _routing_picture(model, domains)
    finally:
        bar.close()
        if state is not None and saved is not None:
            state.collect_stats, state.stats = saved[0], saved[1]
            set_token_tags(model, saved[2], saved[3], saved[4])

    scores = score_predictions(records, cfg.metrics)
    pred_path: Path | None = None
    if predictions is not None:
        pred_path = Path(predictions)
    elif out is not None:
        pred_path = Path(out).with_name(Path(out).stem + ".predictions.jsonl")
    if pred_path is not None:
        _write_jsonl(pred_path, records)

    result: dict[str, Any] = {
        "model": str(model_dir)
        if model_dir is not None
        else getattr(getattr(model, "config", None), "_name_or_path", None),
        "adapter": None if adapter_dir is None else str(adapter_dir),
        "split": split,
        "per_domain": scores["per_domain"],
        "overall": scores["overall"],
        "n": len(records),
        "skipped": dict(sorted(skipped.items())),
        "predictions": None if pred_path is None else str(pred_path),
        "routing": picture,
        "wall_time_s": round(time.perf_counter() - start, 3),
    }
    if out is not None:
        out_path = Path(out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_path, (json.dumps(result, indent=2) + "\n").encode("utf-8"))
    return result


# ---------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------


def _open_image(image: PathLike | Image.Image) -> Image.Image:
    """An RGB image from a PIL image or a file; a bad file is a ValueError naming it."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise ValueError(f"image file not found: {path}")
    try:
        return load_image(path)
    except ImageLoadError as err:
        raise ValueError(f"cannot use image {path}: {err}") from None


def _trained_prompt_format(adapter_dir: PathLike | None) -> dict[str, Any]:
    """The prompt format an adapter was trained with (empty if unknown or no adapter)."""
    if adapter_dir is None:
        return {}
    _, payload = read_adapter_config(adapter_dir)
    prompt = (payload.get("extra") or {}).get("prompt")
    return prompt if isinstance(prompt, dict) else {}


def inference_prompt_format(
    adapter_dir: PathLike | None, template: str | None = None, system: str | None = None
) -> tuple[str, str | None]:
    """The ``(template, system)`` to answer with: the caller's choice, else the adapter's.

    Args:
        adapter_dir: Adapter directory, or None.
        template: ``vicuna_v1`` or ``chat_template``; None: the one the adapter was trained
            with, else ``vicuna_v1``.
        system: ``vicuna_v1`` system prompt; None: the adapter's (same template only), else
            LLaVA-1.5's; ``""``: none.

    Raises:
        ValueError: Unknown template, or a domain-routed adapter (it needs domain labels).
    """
    trained = _trained_prompt_format(adapter_dir)
    if adapter_dir is not None and read_adapter_config(adapter_dir)[0].router == "domain":
        raise ValueError(
            f"{adapter_dir}: this adapter routes by domain label (adapter.router='domain', a "
            "study diagnostic), so it needs each sample's domain: use `llava-mole eval`"
        )
    template = template or trained.get("template") or "vicuna_v1"
    if system is None and template == trained.get("template"):
        system = trained.get("system")
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    return template, system


def _check_context(model: nn.Module, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse, before generating, a prompt that does not fit the model's context.

    Truncating would silently drop part of the question (or the image tokens), and generating
    past the position embeddings gives garbage, so the rule is: refuse with the numbers.
    """
    limit = context_length(model)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise ValueError(
            f"the prompt has {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} it "
            f"does not fit the model's context of {limit} tokens (shorten the question)"
        )


def predict(
    model_dir: PathLike | None = None,
    image: PathLike | Image.Image | None = None,
    question: str = "",
    adapter_dir: PathLike | None = None,
    template: str | None = None,
    max_new_tokens: int = 32,
    *,
    system: str | None = None,
    image_mode: str = "pad",
    model: nn.Module | None = None,
    processor: Any = None,
    dtype: str = "float32",
    device: str | None = None,
    trust_remote_code: bool = False,
) -> str:
    """Answers one question, about one image or text-only, with greedy decoding.

    Args:
        model_dir: Model directory (unless `model` is given).
        image: Image file or PIL image; the ``<image>`` placeholder is put before the question
            unless the question already contains it. None: text-only.
        question: The question.
        adapter_dir: Adapter directory, or None.
        template: ``vicuna_v1`` or ``chat_template``; None: the one the adapter was trained
            with (recorded in its ``adapter_config.json``), else ``vicuna_v1``.
        max_new_tokens: Maximum answer length in tokens.
        system: ``vicuna_v1`` system prompt, as in the training mixture's ``system``; None: the
            one the adapter was trained with, else LLaVA-1.5's; ``""``: none.
        image_mode: ``pad`` or ``resize``.
        model: An already loaded model (with `processor`).
        processor: Its processor.
        dtype: Weight dtype when loading.
        device: Device when loading (default: cuda if available, else cpu).
        trust_remote_code: Passed to the loader.

    Returns:
        The answer text.

    Raises:
        ValueError: Empty question, unknown template or image mode, a placeholder without an
            image, or an image file that is missing or unreadable (the message names it).
    """
    if not question.strip():
        raise ValueError("question is empty")
    template, system = inference_prompt_format(adapter_dir, template, system)
    if image_mode not in IMAGE_MODES:
        raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {image_mode!r}")
    img = None
    if image is not None:
        img = _open_image(image)  # before loading the model: a bad path fails fast
        if IMAGE_PLACEHOLDER not in question:
            question = f"{IMAGE_PLACEHOLDER}\n{question}"
    elif IMAGE_PLACEHOLDER in question:
        raise ValueError(f"the question contains {IMAGE_PLACEHOLDER} but no image was given")
    if question.count(IMAGE_PLACEHOLDER) > 1:
        raise ValueError(
            f"the question has {question.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} "
            "placeholders but one image was given"
        )
    model, processor, owned = _acquire(
        model_dir, model, processor, adapter_dir, dtype, device, trust_remote_code
    )
    try:
        prompt = build_prompt_for_generation([(USER, question)], processor, template, system)
    except EncodeError as err:
        raise ValueError(f"cannot build the prompt: {err}") from None
    _check_context(model, len(prompt), max_new_tokens)
    with _inference(model, owned):
        (answer,) = generate_answers(
            model,
            processor,
            [prompt],
            [img],
            max_new_tokens=max_new_tokens,
            image_mode=image_mode,
        )
    return answer
