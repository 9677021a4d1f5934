"""Generation-based evaluation of one split of a mixture: answers, per-domain scores, routing.

Each sample is answered with greedy decoding from all of its turns but the last assistant turn
(earlier QA pairs are context); the reference is that last answer, or the record's ``answers``
list when present (VQA style). Answers are scored per domain with the mixture's metrics. With
routing on and a MoLE adapter, one teacher-forced forward per batch measures the expert shares
(:mod:`llava_mole.eval.routing`). Defaults: :data:`llava_mole.eval.settings.EVAL_DEFAULTS`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters.io import atomic_write_bytes
from ..adapters.observe import RoutingCapture, capture_routing
from ..adapters.state import get_state, set_routing_domains
from ..data.formats import ASSISTANT, IMAGE_PLACEHOLDER, Sample
from ..data.image_inputs import image_inputs_for, image_size
from ..data.images import ImageLoadError, load_image, pixel_values
from ..data.mixture import MixtureConfig, load_mixture, load_split
from ..data.templates import ConversationEncoder, EncodeError
from . import generation  # called through the module: one place to stub decoding
from .batching import ImageInput
from .collapse import evaluation_warnings
from .inference import Loaded, inference_mode, load_for_inference
from .metrics import score_predictions
from .routing import RoutingRow, routing_forward, routing_picture
from .settings import EVAL_DEFAULTS, EvalSettings

logger = logging.getLogger(__name__)

__all__ = ["evaluate"]

PathLike = str | os.PathLike[str]


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
    """Builds the prompt of each sample: all turns but the final answer (earlier QA = context).

    The prompt is encoded as training encodes the same prefix (for processor-built image
    blocks, from the image's size), so the prompt is the start of the teacher-forced ids.
    """
    items = []
    for sample in samples:
        if len(sample.turns) < 2 or sample.turns[-1][0] != ASSISTANT:
            skipped["no_final_answer"] += 1
            continue
        try:
            size = image_size(sample.image) if encoder.images and sample.image else None
            prompt = torch.tensor(encoder.prompt(sample.turns[:-1], size), dtype=torch.long)
        except (EncodeError, ImageLoadError) as err:
            skipped[err.reason] += 1
            continue
        full = None
        if teacher_forced:
            try:
                full = torch.tensor(encoder.encode(sample.turns, size).input_ids)
            except EncodeError:
                # Still scored, only left out of the routing picture: the scores must not
                # depend on whether routing is measured.
                full = None
        question = sample.turns[-2][1].replace(IMAGE_PLACEHOLDER, "").strip()
        items.append(_Item(sample, prompt, full, question, _reference(sample)))
    return items


def _load_images(
    batch: list[_Item], processor: Any, image_mode: str, skipped: Counter
) -> tuple[list[_Item], list[ImageInput | None]]:
    """The images of a batch (LLaVA-1.5: pixel values; other families: the PIL images, which
    their processor turns into inputs); samples whose image fails now are dropped, counted."""
    kept: list[_Item] = []
    images: list[ImageInput | None] = []
    image_processor = getattr(processor, "image_processor", None)
    processor_built = image_inputs_for(processor) is not None
    for item in batch:
        if item.sample.image is None:
            kept.append(item)
            images.append(None)
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
        images.append(
            img if processor_built else pixel_values([img], image_processor, image_mode)[0]
        )
    return kept, images


def _write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Writes one JSON record per line, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(path, text.encode("utf-8"))


def _answer(
    loaded: Loaded,
    items: list[_Item],
    cfg: MixtureConfig,
    settings: EvalSettings,
    domains: list[str],
    capture: RoutingCapture | None,
    skipped: Counter,
) -> list[dict[str, Any]]:
    """Answers `items` batch by batch (and counts their routing in `capture`)."""
    model, processor = loaded.model, loaded.processor
    index = {d: i for i, d in enumerate(domains)}
    records: list[dict[str, Any]] = []
    size = settings.batch_size
    with tqdm(
        total=len(items), desc="evaluate", unit="sample", disable=not settings.progress
    ) as bar:
        for begin in range(0, len(items), size):
            batch, images = _load_images(
                items[begin : begin + size], processor, cfg.image_mode, skipped
            )
            bar.update(min(size, len(items) - begin))
            if not batch:
                continue
            # Domain-routed adapters (a diagnostic) send tokens by the sample's domain.
            set_routing_domains(model, [it.sample.domain for it in batch])
            answers = generation.generate_answers(
                model,
                processor,
                [it.prompt for it in batch],
                images,
                max_new_tokens=settings.max_new_tokens,
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
            if capture is not None:
                rows = [
                    RoutingRow(it.full, len(it.prompt), img, index[it.sample.domain])
                    for it, img in zip(batch, images)
                    if it.full is not None
                ]
                routing_forward(model, capture, rows, len(domains), processor)
    return records


def evaluate(
    model_dir: PathLike | None = None,
    adapter_dir: PathLike | None = None,
    mixture: PathLike | MixtureConfig | None = None,
    split: str | None = None,
    out: PathLike | None = None,
    *,
    settings: EvalSettings = EVAL_DEFAULTS,
    model: nn.Module | None = None,
    processor: Any = None,
    predictions: PathLike | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Evaluates a model (optionally with an adapter) on one split of a mixture.

    Args:
        model_dir: Model directory (unless `model` is given; then only reported).
        adapter_dir: Adapter directory loaded into the model, or None.
        mixture: Mixture YAML file or loaded `MixtureConfig` (required).
        split: ``test`` or ``train`` (None: ``settings.split``).
        out: JSON file for the result (atomic write), or None.
        settings: Batch size, answer length, limit, routing, loading (see `EvalSettings`).
        model: An already loaded model; used as is (an adapter is still loaded if given).
        processor: Its processor (required with `model`).
        predictions: Predictions JSONL path; default ``<out stem>.predictions.jsonl`` next to
            `out`, or no file when `out` is None too.
        **overrides: Fields of `settings` to change for this call (``batch_size=4``, ...).

    Returns:
        ``{"model", "adapter", "split", "per_domain", "overall", "n", "skipped", "predictions",
        "routing", "warnings", "wall_time_s"}`` (the results JSON): ``per_domain``/``overall`` as in
        `score_predictions`, ``skipped`` counts dropped samples per reason, ``routing`` as
        `llava_mole.eval.routing.routing_picture` (None without a MoLE adapter or routing),
        ``warnings`` one line per silent failure found (`llava_mole.eval.collapse`).

    Raises:
        ValueError: Missing mixture/model, bad settings.
        TypeError: An override that is not a field of `EvalSettings`.
        DataConfigError: Bad mixture or missing files.
    """
    start = time.perf_counter()
    settings = replace(settings, **overrides, **({"split": split} if split else {}))
    if mixture is None:
        raise ValueError("evaluate needs a mixture (YAML path or MixtureConfig)")
    cfg = mixture if isinstance(mixture, MixtureConfig) else load_mixture(mixture)
    samples, report = load_split(cfg, settings.split, strict=False)
    skipped: Counter[str] = Counter(report.skipped)
    loaded = load_for_inference(
        model_dir,
        adapter_dir,
        dtype=settings.dtype,
        device=settings.device,
        trust_remote_code=settings.trust_remote_code,
        model=model,
        processor=processor,
    )
    measure = settings.routing and get_state(loaded.model) is not None
    # One encoder, configured as training's: the same ids.
    encoder = ConversationEncoder(loaded.processor, cfg.template, system=cfg.system)
    items = _prepare(_per_domain_limit(samples, settings.limit), encoder, measure, skipped)
    domains = [d for d in cfg.domains if any(it.sample.domain == d for it in items)]
    merge = loaded.owned if settings.merge is None else settings.merge
    # The caller's routing statistics and tags survive this evaluation.
    capturing = capture_routing(loaded.model) if measure else nullcontext()
    with inference_mode(loaded.model, merge), capturing as capture:
        records = _answer(loaded, items, cfg, settings, domains, capture, skipped)
        picture = routing_picture(capture.stats, domains) if capture is not None else None
        warnings = evaluation_warnings(records, capture.stats if capture is not None else None)
    for line in warnings:
        logger.warning(line)

    return _write_result(
        records,
        cfg,
        settings,
        skipped,
        picture,
        warnings,
        model=str(model_dir) if model_dir is not None else _name(loaded.model),
        adapter=None if adapter_dir is None else str(adapter_dir),
        out=out,
        predictions=predictions,
        start=start,
    )


def _name(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None)


def _write_result(
    records: list[dict[str, Any]],
    cfg: MixtureConfig,
    settings: EvalSettings,
    skipped: Counter,
    picture: dict[str, Any] | None,
    warnings: list[str],
    *,
    model: str | None,
    adapter: str | None,
    out: PathLike | None,
    predictions: PathLike | None,
    start: float,
) -> dict[str, Any]:
    """Scores the answers and writes the predictions JSONL and the results JSON."""
    scores = score_predictions(records, cfg.metrics)
    pred_path = Path(predictions) if predictions is not None else None
    if pred_path is None and out is not None:
        pred_path = Path(out).with_name(Path(out).stem + ".predictions.jsonl")
    if pred_path is not None:
        _write_jsonl(pred_path, records)
    result: dict[str, Any] = {
        "model": model,
        "adapter": adapter,
        "split": settings.split,
        "per_domain": scores["per_domain"],
        "overall": scores["overall"],
        "n": len(records),
        "skipped": dict(sorted(skipped.items())),
        "predictions": None if pred_path is None else str(pred_path),
        "routing": picture,
        "warnings": warnings,
        "wall_time_s": round(time.perf_counter() - start, 3),
    }
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(out), (json.dumps(result, indent=2) + "\n").encode("utf-8"))
    return result
