"""``llava-mole`` command line: the entry point only; work happens in the library modules."""

from __future__ import annotations

import argparse
import errno
import sys
import textwrap
from collections.abc import Callable

from .eval.settings import EVAL_DEFAULTS, PREDICT_DEFAULTS
from .toy import WORLD_NAMES
from .toy.defaults import DEFAULT_DATA_DIR, DEFAULT_TINY_MODEL_DIR


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


# ---- commands ---------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from .toy.demo import run_demo

    run_demo(out=args.out, seeds=args.seeds, quick=args.quick, workers=args.workers)
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from .toy.tiny import make_tiny

    if args.captions is not None:
        from .paths import path_problem

        problem = path_problem(args.captions, "file")
        if problem:
            raise ValueError(f"--captions {args.captions}: {problem}")
        if args.no_pretrain:
            raise ValueError("--captions is for pretraining: it cannot go with --no-pretrain")
    path = make_tiny(
        args.out,
        seed=args.seed,
        pretrain=not args.no_pretrain,
        pretrain_steps=args.pretrain_steps,
        captions=args.captions,
    )
    print(f"tiny LLaVA written to {path}")
    return 0


_DEMO_WORLD_OPTIONS = {"num_classes": 24, "code_questions": "shared", "code_answers": "plain"}


def cmd_make_data(args: argparse.Namespace) -> int:
    from .toy.synthetic import make_data

    demo_options = {k: getattr(args, k) for k in _DEMO_WORLD_OPTIONS}
    if args.world != "demo":
        from .toy.worlds import make_world

        given = [k for k, v in demo_options.items() if v is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise ValueError(f"{flag} is an option of the demo world, not of --world {args.world}")
        path = make_world(
            args.world,
            args.out,
            samples_per_domain=args.samples_per_domain,
            test_per_domain=args.test_per_domain,
            captions=args.captions,
            seed=args.seed,
        )
        print(
            f"world {args.world!r} written to {path} (mixture: {path / 'mixture.yaml'}, "
            f"stage-1 captions: {path / 'captions.json'})"
        )
        return 0
    options = {k: _DEMO_WORLD_OPTIONS[k] if v is None else v for k, v in demo_options.items()}
    path = make_data(
        args.out,
        samples_per_domain=args.samples_per_domain,
        test_per_domain=args.test_per_domain,
        seed=args.seed,
        **options,
    )
    print(f"synthetic domains written to {path} (mixture: {path / 'mixture.yaml'})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .data.convert import write_mixture

    result = write_mixture(args.datasets, args.out, template=args.template)
    for entry, counts in zip(result["entries"], result["counts"], strict=True):
        rows = ", ".join(f"{split} {n} rows" for split, n in counts.items())
        print(f"{entry['name']:>8}: domain {entry['domain']}, {entry['metric']}; {rows}")
    print(f"mixture written to {result['path']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import distributed
    from .train.run import train

    try:
        result = train(args.config, args.set or [])
        _close_process_group()  # every rank has finished (or the collective timeout fails it)
    except Exception as err:
        line = None if args.debug else distributed.collective_failure(err)
        if line is None:
            raise
        print(f"llava-mole train: error: {line}", file=sys.stderr, flush=True)
        return 1
    if result.completed and distributed.global_rank() == 0:
        from .adapters.io import WEIGHTS_NAME
        from .train.resume import SUMMARY

        missing = [n for n in (WEIGHTS_NAME, SUMMARY) if not (result.output_dir / n).is_file()]
        if missing:
            print(
                f"llava-mole train: error: {result.output_dir / missing[0]} was not written",
                file=sys.stderr,
            )
            return 1
        s = result.summary
        print(
            f"done: {s['steps']} steps, {s.get('tokens_per_s')} tokens/s; adapter in {result.output_dir}",
            flush=True,
        )
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .train import distributed
    from .train.pretrain import MARKER, PretrainOptions, pretrain

    options = PretrainOptions(
        captions=Path(args.captions),
        model=Path(args.model),
        out=Path(args.out),
        image_folder=Path(args.image_folder) if args.image_folder else None,
        train=args.train,
        template=args.template,
        system=args.system,
        overrides=args.set or [],
    )
    result = pretrain(options)
    _close_process_group()  # under torchrun: every rank has finished
    if not result.run.completed or distributed.global_rank() != 0:
        return 0  # stopped early (train.stop_after_steps: the run said how to resume), or a rank
    if not (result.out / MARKER).is_file():
        print(f"llava-mole pretrain: error: {result.out / MARKER} was not written", file=sys.stderr)
        return 1
    s = result.run.summary
    print(
        f"done: {s['steps']} steps; new base model in {result.out} (from_pretrained; use it as "
        "model.path of llava-mole train)",
        flush=True,
    )
    return 0


def _close_process_group() -> None:
    """End torchrun's process group once every rank is done (a monitored barrier on gloo).

    Left to interpreter teardown, the gloo/NCCL threads can abort a rank with SIGABRT
    ("terminate called without an active exception") after a run that finished and saved.
    """
    from .train.distributed import close_process_group

    close_process_group()


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.generate import evaluate

    result = evaluate(
        args.model,
        adapter_dir=args.adapter,
        mixture=args.data,
        split=args.split,
        out=args.out,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
    )
    for domain, row in result["per_domain"].items():
        print(f"{domain:>16}: {row['score']:.4f}  ({row['metric']}, n={row['n']})")
    overall = result["overall"]
    print(
        f"{'overall':>16}: macro {overall['macro']:.4f}, micro {overall['micro']:.4f} (n={overall['n']})"
    )
    if args.out:
        print(f"results: {args.out}")
    if args.adapter:
        _record_scores(args.adapter, args.split, result["per_domain"])
    return 0


def _record_scores(adapter_dir: str, split: str, per_domain: dict) -> None:
    """Put the scores in the adapter's model card; a read-only folder only gets a note."""
    from .adapters.io import record_evaluation

    try:
        record_evaluation(adapter_dir, split, per_domain)
    except OSError as err:
        print(
            f"note: scores not recorded in {adapter_dir} ({err.strerror or err})", file=sys.stderr
        )
    else:
        print(f"scores recorded in {adapter_dir}/README.md")


def cmd_predict(args: argparse.Namespace) -> int:
    from .eval.generate import predict

    print(
        predict(
            args.model,
            image=args.image,
            question=args.question,
            adapter_dir=args.adapter,
            template=args.template,
            max_new_tokens=args.max_new_tokens,
            system=args.system,
        )
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print(
            "llava-mole serve: error: the server needs its extra: pip install 'llava-mole[serve]'",
            file=sys.stderr,
        )
        return 2
    from .serve import ServeOptions, serve

    options = {k: v for k, v in vars(args).items() if k in ServeOptions.__dataclass_fields__}
    serve(ServeOptions(**options))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .study.compare import run_study

    if not args.plan:
        run_study(args.study, args.out)
        return 0
    from pathlib import Path

    from .study.config import load_study
    from .study.pilot import PilotSettings, run_pilot

    pilot = PilotSettings(delta=args.delta, steps=args.plan_steps)
    plan = run_pilot(load_study(args.study), Path(args.out), pilot)
    print("[plan] proposed (probes and numbers in <out>/pilot/plan.json):")
    for line in plan.lines(args.delta):
        print(f"  - {line}")
    return 0


def cmd_export_peft(args: argparse.Namespace) -> int:
    from .adapters.peft_export import export_peft

    path = export_peft(args.adapter, args.out)
    print(f"PEFT LoRA adapter written to {path}")
    return 0


def _load_adapted(model_dir: str | None, adapter_dir: str, dtype: str):
    """Base model (``--model``, else the one recorded in the adapter) with the adapter loaded."""
    from .adapters.io import load_adapter, read_adapter_config
    from .models.loading import ModelLoadError, load_model_and_processor

    _, payload = read_adapter_config(adapter_dir)
    model_dir = model_dir or payload.get("base_model", {}).get("name_or_path")
    if not model_dir:
        raise ModelLoadError(
            f"{adapter_dir}: the adapter does not name its base model; give --model"
        )
    model, processor = load_model_and_processor(model_dir, dtype)
    return load_adapter(model.eval(), adapter_dir), processor


def cmd_merge(args: argparse.Namespace) -> int:
    from .adapters.merge import merge_and_save

    model, processor = _load_adapted(args.model, args.adapter, args.dtype)
    merge_and_save(model, args.out, processor)
    print(f"merged model written to {args.out} (loads with from_pretrained, no llava-mole needed)")
    return 0


def cmd_export_moe(args: argparse.Namespace) -> int:
    from .adapters.io import read_adapter_config
    from .adapters.moe_export import check_exportable, export_moe

    config, _ = read_adapter_config(args.adapter)
    check_exportable(config, args.adapter)  # before loading a large model
    model, processor = _load_adapted(args.model, args.adapter, args.dtype)
    export_moe(model, args.out, processor)
    print(f"sparse-MoE checkpoint written to {args.out} ({config.num_experts} experts, top-1)")
    return 0


# ---- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
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

    p = add(
        "demo",
        cmd_demo,
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

    p = add(
        "make-tiny",
        cmd_make_tiny,
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

    p = add(
        "make-data",
        cmd_make_data,
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

    p = add(
        "convert",
        cmd_convert,
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

    p = add(
        "train",
        cmd_train,
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

    p = add(
        "pretrain",
        cmd_pretrain,
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

    p = add(
        "eval",
        cmd_eval,
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

    p = add(
        "predict",
        cmd_predict,
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

    p = add(
        "serve",
        cmd_serve,
        "serve a model (+ adapter) with an OpenAI-compatible API and a routing web page",
        "llava-mole serve --model llava-mole-work/tiny-llava --adapter runs/tiny-mole\n"
        "llava-mole serve --model M --adapter A --port 8001 --api-key secret "
        "--allowed-image-dir ./images",
    )
    _serve_arguments(p)

    p = add(
        "compare",
        cmd_compare,
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

    p = add(
        "export-peft",
        cmd_export_peft,
        "convert a plain-LoRA (or one-expert) adapter to a Hugging Face PEFT adapter",
        "llava-mole export-peft runs/tiny-lora peft-adapter",
    )
    p.add_argument("adapter")
    p.add_argument("out")

    for name, func, help_text, example in (
        (
            "merge",
            cmd_merge,
            "merge a plain-LoRA (or one-expert) adapter into its base: a normal full checkpoint",
            "llava-mole merge runs/tiny-lora merged-model\n"
            "llava-mole merge runs/tiny-lora merged-model --model llava-mole-work/tiny-llava",
        ),
        (
            "export-moe",
            cmd_export_moe,
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
    return parser


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


def _listing_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is a short bounded list (strict mode's first bad samples)."""
    from .data.formats import DataError

    return (DataError,)


def _user_errors() -> tuple[type[BaseException], ...]:
    from .adapters.inject import AdapterError
    from .data.formats import DataError
    from .models.loading import ModelLoadError
    from .schema import SchemaError
    from .study.compare import StudyWorkersError
    from .train.config import ConfigError
    from .train.lock import RunLockedError
    from .train.trainer import NonFiniteLossError

    return (
        ConfigError,
        SchemaError,
        AdapterError,
        DataError,
        ModelLoadError,
        NonFiniteLossError,
        RunLockedError,
        StudyWorkersError,
        ValueError,
        FileNotFoundError,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line and exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BaseException as err:  # noqa: BLE001 - mapped to one line below
        if debug or isinstance(err, SystemExit):
            raise
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            print(
                f"llava-mole {args.command}: error: disk full while writing ({err.filename or err}); "
                "the previous checkpoint is kept",
                file=sys.stderr,
            )
            return 2
        if isinstance(err, _user_errors()) or isinstance(err, OSError):
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if isinstance(err, _listing_errors()):
                message = str(err).strip()  # the bad samples' list is the point of strict mode
            print(f"llava-mole {args.command}: error: {message}", file=sys.stderr)
            print("  (run with --debug for the full traceback)", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
