"""``llava-mole pretrain``: LLaVA's stage 1 (projector alignment on image-caption pairs).

A stage-1 run is one run of the training recipe (:mod:`.run`: resume, lock, checkpoints, logs,
NaN guard), not a second training loop: its adapter is ``type: none`` (nothing is injected;
only the family's projector / connector / merger trains, see ``models/families.py``) and its
data is a one-dataset mixture written for the captions file. The merge path
(:func:`llava_mole.adapters.merge.merge_and_save`, as ``llava-mole merge``) then writes the base
with its trained projector as a complete model folder.

``--train lora`` also trains LoRA on the language model's attention and MLP projections
(``adapter.type: lora``), merged into the written weights likewise; ``--train full`` trains the
language model and its head fully as well (``adapter.train_language_model``), the vision
towers staying frozen.

The captions file is LLaVA's pretrain JSON (``blip_laion_cc_sbu_558k.json`` style: the record
format of its instruction data, a human turn ``<image>\\n<instruction>`` and a gpt turn with the
caption). ``template: vicuna_v1`` (default) keeps each record's own instruction;
``template: plain`` is LLaVA's stage-1 format (image block, then the caption).

Output folder::

    config.json, model.safetensors, processor files   the new base: from_pretrained, and the
                                                      model.path of `llava-mole train`
    stage1.json        what was trained on what (written last: the folder is complete)
    stage1/            the training run (the layout of `llava-mole train`: run_config.yaml,
                       checkpoints, logs.jsonl, summary.json, training.png, the trained
                       projector as adapter files) and captions.yaml, the mixture it read
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..adapters.io import atomic_write_bytes, load_adapter
from ..adapters.merge import merge_and_save
from ..data.formats import LoadReport
from ..data.records import load_llava_file
from ..models.families import FAMILIES
from ..paths import not_found_or, path_problem
from . import distributed
from .config import ConfigError, TrainConfig, load_train_config
from .lock import run_lock
from .resume import SUMMARY
from .run import TrainResult, train

RUN_DIR = "stage1"
MIXTURE = "captions.yaml"
MARKER = "stage1.json"
DOMAIN = "captions"
TrainWhat = Literal["projector", "lora", "full"]
TRAIN_CHOICES: tuple[str, ...] = ("projector", "lora", "full")
PRETRAIN_TEMPLATES: tuple[str, ...] = ("vicuna_v1", "plain", "chat_template")

#: The stage-1 defaults that differ from ``llava-mole train``'s (LLaVA's stage 1: lr 1e-3 for
#: the projector, one epoch, warmup 0.03, cosine, no weight decay); ``--set train.*`` overrides.
STAGE1_DEFAULTS: dict[str, dict[str, Any]] = {
    "projector": {"adapter.type": "none", "train.learning_rate": 1e-3},
    "lora": {
        "adapter.type": "lora",
        "train.learning_rate": 2e-4,
        "train.projector_lr": 1e-3,
    },
    "full": {
        "adapter.type": "none",
        "adapter.train_language_model": True,
        "train.learning_rate": 2e-5,
        "train.projector_lr": 1e-3,
    },
}
_COMMON = {"train.epochs": 1, "train.warmup_ratio": 0.03, "train.lr_scheduler": "cosine"}
#: Keys the command sets from its own arguments.
OWNED_KEYS = {
    "model.path": "--model",
    "data.mixture": "the captions file",
    "output_dir": "--out",
    "adapter.type": "--train",
    "adapter.train_projector": "(always true)",
    "adapter.train_language_model": "--train full",
}


@dataclass
class PretrainOptions:
    """One ``llava-mole pretrain`` invocation.

    Args:
        captions: the captions file (LLaVA pretrain JSON / JSONL).
        model: the base model folder.
        out: the new base's folder.
        image_folder: where the records' image paths are relative to (default: the captions
            file's folder).
        train: ``projector`` (stage 1), ``lora`` (also LoRA on the language model) or
            ``full`` (also the whole language model).
        template: ``vicuna_v1`` (each record's instruction), ``plain`` or ``chat_template``.
        system: the ``vicuna_v1`` system prompt (None: LLaVA-1.5's; ``""``: none).
        overrides: ``--set`` items of the training config (``train.*``, ``adapter.*``, ...).
    """

    captions: Path
    model: Path
    out: Path
    image_folder: Path | None = None
    train: TrainWhat = "projector"
    template: str = "vicuna_v1"
    system: str | None = None
    overrides: list[str] = field(default_factory=list)


@dataclass
class PretrainResult:
    """The new base folder, the training run's result and whether the model was written."""

    out: Path
    run: TrainResult
    written: bool


def pretrain(options: PretrainOptions) -> PretrainResult:
    """Align the projector of ``options.model`` on the captions; write the new base model.

    One invocation per output folder (a lock); running it again resumes an interrupted run
    and leaves a complete one unchanged.

    Raises:
        ConfigError: one line for bad input (captions file, records, images, model, keys).
    """
    check_inputs(options)
    out = Path(options.out)
    with run_lock(out):
        config = stage1_config(options)
        result = train(config)
        if not result.completed or distributed.global_rank() != 0:  # rank 0 writes the model
            return PretrainResult(out, result, False)
        if _marker_matches(out, options):
            print(f"{out}: model already written; nothing changed", flush=True)
            return PretrainResult(out, result, False)
        write_base(config, out / RUN_DIR, out)
        record = {**_identity(options), **_run_numbers(result.summary)}
        atomic_write_bytes(out / MARKER, (json.dumps(record, indent=2) + "\n").encode())
        return PretrainResult(out, result, True)


def check_inputs(options: PretrainOptions) -> None:
    """Refuse bad input with one line, before any model is loaded."""
    if options.train not in TRAIN_CHOICES:
        raise ConfigError(f"--train: expected one of {', '.join(TRAIN_CHOICES)}")
    if options.template not in PRETRAIN_TEMPLATES:
        raise ConfigError(f"--template: expected one of {', '.join(PRETRAIN_TEMPLATES)}")
    if options.system is not None and options.template != "vicuna_v1":
        raise ConfigError("--system: only the vicuna_v1 template takes a system prompt")
    _check_path(options.captions, "file", "captions")
    _check_path(options.model, "folder", "--model")
    if options.image_folder is not None:
        _check_path(options.image_folder, "folder", "--image-folder")
    _check_out(Path(options.out), Path(options.model))
    for item in options.overrides:
        key = item.partition("=")[0].strip()
        if key in OWNED_KEYS:
            raise ConfigError(f"--set {key}: set by llava-mole pretrain ({OWNED_KEYS[key]})")
    check_family(Path(options.model))
    check_captions(Path(options.captions), options.image_folder)


def _check_path(path: Path, kind: str, what: str) -> None:
    problem = path_problem(path, kind)
    if problem:
        missing = f"{kind} not found: {path}"
        raise ConfigError(f"{what}: {not_found_or(path, kind, missing)}")


def _check_out(out: Path, model: Path) -> None:
    """Never write over the base, nor into a model folder this command did not write."""
    if out.resolve() == model.resolve():
        raise ConfigError(f"--out {out}: is the base model folder; give a new folder")
    ours = (out / MARKER).is_file() or (out / RUN_DIR).is_dir()
    if (out / "config.json").is_file() and not ours:
        raise ConfigError(f"--out {out}: holds another model; give a new folder")


def check_family(model_dir: Path) -> None:
    """Refuse a model whose family has no projector to train (read from ``config.json``)."""
    try:
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # not readable here: the model loader says why, with one line
    for family in FAMILIES:
        if model_type in family.model_types and not family.projector:
            raise ConfigError(
                f"--model {model_dir}: a {family.name} ({model_type}) has no projector to align "
                "(stage 1 trains the vision projector of a multimodal model)"
            )


def check_captions(path: Path, image_folder: Path | None) -> LoadReport:
    """Read the captions through the data path (bad records are counted skips) and refuse a
    file with no usable image-caption record, or with records without an image.

    Returns:
        The load report (images are checked for existence only; training verifies them).
    """
    report = LoadReport()
    samples = load_llava_file(path, image_folder, domain=DOMAIN, report=report)
    if not samples:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(report.skipped.items()))
        first = f"; first: {report.problems[0]}" if report.problems else ""
        hint = " (set --image-folder?)" if "missing_image" in report.skipped else ""
        raise ConfigError(
            f"{path}: no usable image-caption records ({reasons or 'the file is empty'}){hint}"
            f"{first}"
        )
    textual = [s for s in samples if not s.has_image]
    if textual:
        raise ConfigError(
            f"{path}: {len(textual)} of {len(samples)} records have no image (first: id "
            f"{textual[0].id!r}); stage-1 records are an image and its caption"
        )
    if report.skipped:
        print(f"{path}: {report.num_skipped} bad records skipped", flush=True)
    return report


def stage1_config(options: PretrainOptions) -> TrainConfig:
    """The training config of the stage-1 run (its mixture written to ``out/stage1``)."""
    run_dir = Path(options.out) / RUN_DIR
    mixture = write_mixture(options, run_dir)
    items = {**_COMMON, **STAGE1_DEFAULTS[options.train]}
    items.update(
        {
            "model.path": str(options.model),
            "data.mixture": str(mixture),
            "output_dir": str(run_dir),
            "adapter.train_projector": True,
        }
    )
    given = [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in items.items()]
    return load_train_config(None, given + options.overrides)


def write_mixture(options: PretrainOptions, run_dir: Path) -> Path:
    """``captions.yaml`` in the run folder; refuses a folder that holds a run on other data."""
    entry: dict[str, Any] = {
        "name": DOMAIN,
        "domain": DOMAIN,
        "train": str(Path(options.captions).resolve()),
    }
    if options.image_folder is not None:
        entry["image_folder"] = str(Path(options.image_folder).resolve())
    doc: dict[str, Any] = {"template": options.template}
    if options.system is not None:
        doc["system"] = options.system
    doc["datasets"] = [entry]
    text = yaml.safe_dump(doc, sort_keys=False)
    path = run_dir / MIXTURE
    held = (run_dir / SUMMARY).is_file() or any(run_dir.glob("checkpoint-*"))
    if held and path.is_file() and path.read_text() != text:
        raise ConfigError(
            f"{options.out} holds a stage-1 run on other captions or another template "
            f"({path}); use a new --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode())
    return path


def write_base(config: TrainConfig, run_dir: Path, out: Path) -> None:
    """The base with the run's trained tensors merged in, as a complete model folder."""
    from ..models.loading import load_model_and_processor

    model, processor = load_model_and_processor(
        config.model.path,
        config.model.dtype,
        config.model.trust_remote_code,
        config.model.attn_implementation,
    )
    load_adapter(model.eval(), run_dir)
    merge_and_save(model, out, processor)


def _identity(options: PretrainOptions) -> dict[str, Any]:
    """What the written model was made from (compared on a later invocation)."""
    return {
        "captions": str(Path(options.captions).resolve()),
        "image_folder": str(Path(options.image_folder).resolve()) if options.image_folder else None,
        "base_model": str(Path(options.model).resolve()),
        "train": options.train,
        "template": options.template,
        "system": options.system,
        "overrides": list(options.overrides),
    }


def _run_numbers(summary: dict[str, Any]) -> dict[str, Any]:
    curve = summary.get("loss_curve") or []
    return {
        "run": RUN_DIR,
        "steps": summary.get("steps"),
        "trainable_parameters": summary.get("trainable_parameters"),
        "first_loss": curve[0][1] if curve else None,
        "final_loss": curve[-1][1] if curve else None,
    }


def _marker_matches(out: Path, options: PretrainOptions) -> bool:
    """Whether ``out`` already holds the model this invocation would write."""
    try:
        record = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    same = all(record.get(k) == v for k, v in _identity(options).items())
    return same and (out / "config.json").is_file()
