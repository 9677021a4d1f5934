"""The ``llava-mole`` commands that use a trained adapter: evaluate, predict, serve, export."""

from __future__ import annotations

import argparse
import sys


def cmd_eval(args: argparse.Namespace) -> int:
    from ..eval.generate import evaluate

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
    from ..adapters.io import record_evaluation

    try:
        record_evaluation(adapter_dir, split, per_domain)
    except OSError as err:
        print(
            f"note: scores not recorded in {adapter_dir} ({err.strerror or err})", file=sys.stderr
        )
    else:
        print(f"scores recorded in {adapter_dir}/README.md")


def cmd_predict(args: argparse.Namespace) -> int:
    from ..eval.generate import predict

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
    from ..serve import ServeOptions, serve

    options = {k: v for k, v in vars(args).items() if k in ServeOptions.__dataclass_fields__}
    serve(ServeOptions(**options))
    return 0


def cmd_export_peft(args: argparse.Namespace) -> int:
    from ..adapters.peft_export import export_peft

    path = export_peft(args.adapter, args.out)
    print(f"PEFT LoRA adapter written to {path}")
    return 0


def _load_adapted(model_dir: str | None, adapter_dir: str, dtype: str):
    """Base model (``--model``, else the one recorded in the adapter) with the adapter loaded."""
    from ..adapters.io import load_adapter, read_adapter_config
    from ..models.loading import ModelLoadError, load_model_and_processor

    _, payload = read_adapter_config(adapter_dir)
    model_dir = model_dir or payload.get("base_model", {}).get("name_or_path")
    if not model_dir:
        raise ModelLoadError(
            f"{adapter_dir}: the adapter does not name its base model; give --model"
        )
    model, processor = load_model_and_processor(model_dir, dtype)
    return load_adapter(model.eval(), adapter_dir), processor


def cmd_merge(args: argparse.Namespace) -> int:
    from ..adapters.merge import merge_and_save

    model, processor = _load_adapted(args.model, args.adapter, args.dtype)
    merge_and_save(model, args.out, processor)
    print(f"merged model written to {args.out} (loads with from_pretrained, no llava-mole needed)")
    return 0


def cmd_export_moe(args: argparse.Namespace) -> int:
    from ..adapters.io import read_adapter_config
    from ..adapters.moe_export import check_exportable, export_moe

    config, _ = read_adapter_config(args.adapter)
    check_exportable(config, args.adapter)  # before loading a large model
    model, processor = _load_adapted(args.model, args.adapter, args.dtype)
    export_moe(model, args.out, processor)
    print(f"sparse-MoE checkpoint written to {args.out} ({config.num_experts} experts, top-1)")
    return 0
