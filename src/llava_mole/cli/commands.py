"""The ``llava-mole`` commands that build worlds, train and run studies (one function each)."""

from __future__ import annotations

import argparse
import sys


def cmd_demo(args: argparse.Namespace) -> int:
    from ..toy.demo import run_demo

    run_demo(out=args.out, seeds=args.seeds, quick=args.quick, workers=args.workers)
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from ..toy.tiny import make_tiny

    if args.captions is not None:
        from ..paths import path_problem

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
    from ..toy.synthetic import make_data

    demo_options = {k: getattr(args, k) for k in _DEMO_WORLD_OPTIONS}
    if args.world != "demo":
        from ..toy.worlds import make_world

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
    from ..data.convert import write_mixture

    result = write_mixture(args.datasets, args.out, template=args.template)
    for entry, counts in zip(result["entries"], result["counts"], strict=True):
        rows = ", ".join(f"{split} {n} rows" for split, n in counts.items())
        print(f"{entry['name']:>8}: domain {entry['domain']}, {entry['metric']}; {rows}")
    print(f"mixture written to {result['path']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..train import distributed
    from ..train.run import train

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
        from ..adapters.io import WEIGHTS_NAME
        from ..train.resume import SUMMARY

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

    from ..train import distributed
    from ..train.pretrain import MARKER, PretrainOptions, pretrain

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
    from ..train.distributed import close_process_group

    close_process_group()


def cmd_compare(args: argparse.Namespace) -> int:
    from ..study.compare import run_study

    if not args.plan:
        run_study(args.study, args.out)
        return 0
    from pathlib import Path

    from ..study.config import load_study
    from ..study.pilot import PilotSettings, run_pilot

    pilot = PilotSettings(delta=args.delta, steps=args.plan_steps)
    plan = run_pilot(load_study(args.study), Path(args.out), pilot)
    print("[plan] proposed (probes and numbers in <out>/pilot/plan.json):")
    for line in plan.lines(args.delta):
        print(f"  - {line}")
    return 0
