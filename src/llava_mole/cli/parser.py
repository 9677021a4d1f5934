"""The ``llava-mole`` argument parser: one function per command, each naming its options."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable

from ..eval.settings import EVAL_DEFAULTS, PREDICT_DEFAULTS
from ..toy import WORLD_NAMES
from ..toy.defaults import DEFAULT_DATA_DIR, DEFAULT_TINY_MODEL_DIR
from . import artifacts, commands

Add = Callable[[str, Callable[[argparse.Namespace], int], str, str], argparse.ArgumentParser]
"""Adds one command: ``add(name, func, help_text, examples)`` returns its parser."""


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (a bad value exits 2 with one line)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low} (got {value})")
        return value

    return parse


def _examples(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip(), "  ")


def build_parser() -> argparse.ArgumentParser:
    """The ``llava-mole`` parser; each command's ``func`` runs it."""
    parser = argparse.ArgumentParser(
        prog="llava-mole",
        description="Sparse Mixture of LoRA Experts (LLaVA-MoLE) for multimodal instruction tuning.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples(
            """
            llava-mole demo                          # the data-conflict study on the built-in world
            llava-mole make-tiny && llava-mole make-data
            llava-mole train configs/tiny-mole.yaml --set train.max_steps=50
            """
        ),
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    def add(name: str, func: Callable, help_text: str, examples: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_examples(examples),
            formatter_class=fmt,
        )
        p.set_defaults(func=func)
        # SUPPRESS: a --debug given before the command must not be reset by the subparser.
        p.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks"
        )
        return p

    _demo(add)
    _make_tiny(add)
    _make_data(add)
    _convert(add)
    _train(add)
    _pretrain(add)
    _eval(add)
    _predict(add)
    _serve(add)
    _compare(add)
    _export_peft(add)
    _merge_and_export_moe(add)
    return parser


def _demo(add: Add) -> None:
    p = add(
        "demo",
        commands.cmd_demo,
        "build the tiny model and synthetic domains, run the data-conflict study, write a report",
        "llava-mole demo\nllava-mole demo --out demo-run --seeds 3",
    )
    p.add_argument("--out", default="llava-mole-demo", help="output folder (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per setting (default: %(default)s)")
    p.add_argument(
        "--workers", type=int, default=2, help="parallel training processes (default: %(default)s)"
    )
    p.add_argument(
        "--quick", action="store_true", help="a much smaller study (smoke test; not conclusive)"
    )


def _make_tiny(add: Add) -> None:
    p = add(
        "make-tiny",
        commands.cmd_make_tiny,
        "write the built-in tiny LLaVA (Llama + CLIP + projector, pretrained on captions, cached)",
        f"llava-mole make-tiny\nllava-mole make-tiny {DEFAULT_TINY_MODEL_DIR} --seed 1",
    )
    p.add_argument(
        "out",
        nargs="?",
        default=DEFAULT_TINY_MODEL_DIR,
        help="output folder (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-pretrain", action="store_true", help="skip the stage-1 caption pretraining"
    )
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument(
        "--captions",
        default=None,
        metavar="FILE",
        help="pretrain on this captions file (LLaVA pretrain JSON, e.g. a world's captions.json)",
    )


def _make_data(add: Add) -> None:
    p = add(
        "make-data",
        commands.cmd_make_data,
        "write three synthetic visual domains in LLaVA format, plus mixture YAMLs",
        f"llava-mole make-data\nllava-mole make-data {DEFAULT_DATA_DIR} --samples-per-domain 1000",
    )
    p.add_argument(
        "out", nargs="?", default=DEFAULT_DATA_DIR, help="output folder (default: %(default)s)"
    )
    p.add_argument("--samples-per-domain", type=_at_least(1), default=600)
    p.add_argument("--test-per-domain", type=_at_least(1), default=200)
    p.add_argument(
        "--world",
        choices=("demo", *WORLD_NAMES),
        default="demo",
        help="the demo's world, or one of the worlds it was not tuned for (llava_mole.toy.worlds)",
    )
    p.add_argument("--num-classes", type=_at_least(2), default=None, help="demo world (24)")
    p.add_argument(
        "--code-questions",
        choices=("shared", "domain"),
        default=None,
        help="demo world: one code question for all domains (default), or one per domain",
    )
    p.add_argument(
        "--code-answers",
        choices=("plain", "domain"),
        default=None,
        help="demo world: the bare code word (default), or after the domain's subject",
    )
    p.add_argument(
        "--captions",
        type=_at_least(0),
        default=6000,
        help="other worlds: stage-1 caption records to write (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0)


def _convert(add: Add) -> None:
    p = add(
        "convert",
        commands.cmd_convert,
        "write a mixture YAML for local Hugging Face copies of VQAv2, TextVQA, DocVQA, ChartQA "
        "and PathVQA (nothing is downloaded)",
        "llava-mole convert vqav2=/data/VQAv2 docvqa=/data/DocVQA chartqa=/data/ChartQA "
        "pathvqa=/data/path-vqa --out paper-mixture.yaml\n"
        "llava-mole convert docvqa=lmms-lab/DocVQA --out docs.yaml   # from the local HF cache\n"
        "llava-mole convert chartqa:test=/data/chartqa/test.parquet --out charts.yaml",
    )
    p.add_argument(
        "datasets",
        nargs="+",
        metavar="PRESET=SOURCE",
        help="PRESET (vqav2, textvqa, docvqa, chartqa, pathvqa) = a folder with splits, a "
        "cached dataset name, or (as PRESET:train=... / PRESET:test=...) one split",
    )
    p.add_argument("--out", required=True, help="mixture YAML to write")
    p.add_argument("--template", default="vicuna_v1", choices=("vicuna_v1", "chat_template"))


def _train(add: Add) -> None:
    p = add(
        "train",
        commands.cmd_train,
        "fine-tune with a MoLE or LoRA adapter from a YAML config",
        "llava-mole train configs/tiny-mole.yaml\n"
        "llava-mole train configs/tiny-lora.yaml --set train.max_steps=20 --set adapter.rank=8\n"
        "llava-mole train configs/tiny-mole.yaml --set train.optim=adamw_torch_fused "
        "--set train.report_to=[wandb]\n"
        "torchrun --nproc_per_node 2 -m llava_mole.cli train configs/tiny-mole.yaml",
    )
    p.add_argument("config", help="training YAML (see configs/)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, parsed as YAML (repeatable); train.* also takes any "
        "transformers TrainingArguments field",
    )


def _pretrain(add: Add) -> None:
    p = add(
        "pretrain",
        commands.cmd_pretrain,
        "stage 1: align a model's projector on image-caption pairs (LLaVA pretrain JSON); "
        "writes a new base model folder",
        "llava-mole pretrain world/captions.json --model tiny-llava --out tiny-llava-world\n"
        "llava-mole pretrain blip_laion_cc_sbu_558k.json --model BASE --out NEW_BASE "
        "--image-folder images --set train.per_device_batch_size=32\n"
        "llava-mole pretrain captions.json --model BASE --out NEW_BASE --train lora "
        "--set adapter.rank=8",
    )
    p.add_argument("captions", help="captions file (LLaVA pretrain JSON / JSONL records)")
    p.add_argument("--model", required=True, help="base model directory")
    p.add_argument("--out", required=True, help="output folder: the new base model")
    p.add_argument(
        "--image-folder", default=None, help="image folder (default: the captions file's folder)"
    )
    p.add_argument(
        "--train",
        choices=("projector", "lora", "full"),
        default="projector",
        help="what trains: the projector only (stage 1, default), also LoRA on the language "
        "model (merged into the written weights), or also the whole language model",
    )
    p.add_argument(
        "--template",
        choices=("vicuna_v1", "plain", "chat_template"),
        default="vicuna_v1",
        help="prompt format: vicuna_v1 keeps each record's instruction (default); plain is "
        "LLaVA's stage-1 format (image, then caption)",
    )
    p.add_argument("--system", default=None, help="vicuna_v1 system prompt ('' for none)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a training setting, as llava-mole train (train.learning_rate=2e-3, "
        "train.max_steps=..., data.max_length=...)",
    )


def _eval(add: Add) -> None:
    p = add(
        "eval",
        artifacts.cmd_eval,
        "generate answers for a split of a mixture and score them per domain",
        "llava-mole eval --model llava-mole-work/tiny-llava --adapter runs/tiny-mole "
        "--data llava-mole-work/data/mixture.yaml --out results.json",
    )
    p.add_argument("--model", required=True, help="base model directory")
    p.add_argument("--adapter", default=None, help="adapter directory (omit for the base model)")
    p.add_argument("--data", required=True, help="mixture YAML")
    p.add_argument("--split", default=EVAL_DEFAULTS.split)
    p.add_argument("--out", default=None, help="results JSON (predictions go next to it)")
    p.add_argument("--batch-size", type=int, default=EVAL_DEFAULTS.batch_size)
    p.add_argument("--max-new-tokens", type=int, default=EVAL_DEFAULTS.max_new_tokens)
    p.add_argument(
        "--limit",
        type=int,
        default=EVAL_DEFAULTS.limit,
        help="at most this many samples per dataset",
    )


def _predict(add: Add) -> None:
    p = add(
        "predict",
        artifacts.cmd_predict,
        "answer one question about one image",
        "llava-mole predict --model llava-mole-work/tiny-llava --image cat.png --question 'What is this?'",
    )
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", default=None)
    p.add_argument("--image", default=None)
    p.add_argument("--question", required=True)
    p.add_argument("--max-new-tokens", type=int, default=PREDICT_DEFAULTS.max_new_tokens)
    p.add_argument(
        "--template",
        default=None,
        help="vicuna_v1 or chat_template (default: the adapter's training format, else vicuna_v1)",
    )
    p.add_argument(
        "--system",
        default=None,
        help="vicuna_v1 system prompt ('' for none; default: the one the adapter was trained "
        "with, else LLaVA-1.5's)",
    )


def _serve(add: Add) -> None:
    p = add(
        "serve",
        artifacts.cmd_serve,
        "serve a model (+ adapter) with an OpenAI-compatible API and a routing web page",
        "llava-mole serve --model llava-mole-work/tiny-llava --adapter runs/tiny-mole\n"
        "llava-mole serve --model M --adapter A --port 8001 --api-key secret "
        "--allowed-image-dir ./images",
    )
    _serve_arguments(p)


def _compare(add: Add) -> None:
    p = add(
        "compare",
        commands.cmd_compare,
        "run the data-conflict study (single-domain LoRA, mixed LoRA, mixed MoLE, controls)",
        "llava-mole compare configs/study-tiny.yaml --out study-run\n"
        "llava-mole compare configs/study-tiny.yaml --out study-run --plan --delta 0.03",
    )
    p.add_argument("study", help="study YAML")
    p.add_argument(
        "--out", required=True, help="output folder (re-running continues an interrupted study)"
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="run short probes (learning rates x settings, 2 seeds) under OUT/pilot and propose "
        "the learning rate, budget and seeds the study needs, with its wall time",
    )
    p.add_argument(
        "--delta", type=float, default=0.03, help="with --plan: the difference to resolve"
    )
    p.add_argument(
        "--plan-steps", type=_at_least(1), default=None, help="with --plan: steps per probe"
    )


def _export_peft(add: Add) -> None:
    p = add(
        "export-peft",
        artifacts.cmd_export_peft,
        "convert a plain-LoRA (or one-expert) adapter to a Hugging Face PEFT adapter",
        "llava-mole export-peft runs/tiny-lora peft-adapter",
    )
    p.add_argument("adapter")
    p.add_argument("out")


def _merge_and_export_moe(add: Add) -> None:
    for name, func, help_text, example in (
        (
            "merge",
            artifacts.cmd_merge,
            "merge a plain-LoRA (or one-expert) adapter into its base: a normal full checkpoint",
            "llava-mole merge runs/tiny-lora merged-model\n"
            "llava-mole merge runs/tiny-lora merged-model --model llava-mole-work/tiny-llava",
        ),
        (
            "export-moe",
            artifacts.cmd_export_moe,
            "write a top-1 MoLE adapter (gate_weighting 'none' or 'straight') as a sparse-MoE (Mixtral-style) "
            "checkpoint that transformers and serving engines load without llava-mole",
            "llava-mole export-moe runs/tiny-mole-none moe-model",
        ),
    ):
        p = add(name, func, help_text, example)
        p.add_argument("adapter", help="adapter directory")
        p.add_argument("out", help="output model directory")
        p.add_argument(
            "--model", default=None, help="base model directory (default: the adapter's base)"
        )
        p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``llava-mole serve`` (limits: see the README's Serving section)."""
    p.add_argument("--model", required=True, help="base model directory")
    p.add_argument("--adapter", default=None, help="adapter directory (omit for the base model)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--served-model-name", default=None, help="model name (default: folder name)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument(
        "--allowed-image-dir", default=None, help="folder local image paths may come from"
    )
    limits = [
        ("--max-image-pixels", 16_000_000, "larger images get 400"),
        ("--max-request-bytes", 20_000_000, "larger request bodies get 413"),
        ("--max-tokens", 256, "largest (and default) max_tokens"),
        ("--max-batch-size", 16, "requests decoded together"),
        ("--max-queue", 64, "waiting requests beyond this get 503"),
    ]
    for flag, default, text in limits:
        p.add_argument(flag, type=int, default=default, help=f"{text} (default: %(default)s)")
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=20.0,
        help="how long a request waits for others to batch with (default: %(default)s)",
    )
    p.add_argument("--template", default=None, help="prompt template (default: the adapter's)")
    p.add_argument("--system", default=None, help="vicuna_v1 system prompt (as predict)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
