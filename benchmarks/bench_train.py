"""End-to-end training throughput of the tiny model: plain LoRA vs MoLE, side by side.

    python benchmarks/bench_train.py [--steps 60] [--repeats 3] [--threads 2] [--rank 4]

Builds (or reuses) the tiny LLaVA (not pretrained: speed does not depend on it) and a small
synthetic world in a temporary folder, then trains LoRA and MoLE alternately with the real
``llava-mole train`` code path (Trainer, collator, logging), ``repeats`` times each, and reports
the median tokens/s of each and their ratio. Appends a section to ``benchmarks/RESULTS.md``
unless ``--no-append``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()

    from llava_mole.toy.synthetic import make_data
    from llava_mole.toy.tiny import make_tiny
    from llava_mole.train.config import load_train_config
    from llava_mole.train.run import train

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    model = make_tiny(root / "model", pretrain=False, progress=False)
    data = make_data(root / "data", samples_per_domain=200, test_per_domain=4)
    results: dict[str, list[float]] = {"lora": [], "mole": []}
    for repeat in range(args.repeats):
        for kind in ("lora", "mole"):
            out = root / f"{kind}-{repeat}"
            config = load_train_config(
                None,
                [
                    f"model.path={model}",
                    f"data.mixture={data / 'mixture.yaml'}",
                    f"output_dir={out}",
                    f"adapter.type={kind}",
                    f"adapter.rank={args.rank}",
                    f"adapter.alpha={2 * args.rank}",
                    f"adapter.num_experts={args.experts}",
                    f"train.max_steps={args.steps}",
                    f"train.per_device_batch_size={args.batch}",
                    f"train.logging_steps={args.steps}",
                    "train.report_to=[none]",
                    "train.log_domain_loss=false",
                ],
            )
            summary = train(config).summary
            results[kind].append(summary["tokens_per_s"])
            print(f"{kind} repeat {repeat}: {summary['tokens_per_s']:.0f} tokens/s", flush=True)
    lora = statistics.median(results["lora"])
    mole = statistics.median(results["mole"])
    line = (
        f"| tiny LLaVA train step (CPU, {args.threads} threads, batch {args.batch}, r={args.rank}, "
        f"K={args.experts}, {args.steps} steps x {args.repeats}) | {lora:.0f} | {mole:.0f} | "
        f"{lora / mole:.3f} |"
    )
    print(
        f"LoRA {lora:.0f} tokens/s, MoLE {mole:.0f} tokens/s: MoLE step time = {lora / mole:.3f} x LoRA"
    )
    if not args.no_append:
        try:
            commit = (
                subprocess.run(
                    ["git", "rev-parse", "--short", "HEAD"],
                    cwd=Path(__file__).parent,
                    capture_output=True,
                    text=True,
                ).stdout.strip()
                or "unknown"
            )
        except OSError:
            commit = "unknown"
        section = (
            f"\n## End-to-end training throughput, CPU ({datetime.date.today()}, commit {commit})\n\n"
            f"- machine: {platform.processor() or platform.machine()}, torch {torch.__version__}\n"
            f"- command: `python benchmarks/bench_train.py --steps {args.steps} --repeats {args.repeats} "
            f"--threads {args.threads} --rank {args.rank}`\n\n"
            "| what | LoRA tokens/s | MoLE tokens/s | MoLE time / LoRA time |\n|---|---:|---:|---:|\n"
            f"{line}\n"
        )
        with open(Path(__file__).with_name("RESULTS.md"), "a") as handle:
            handle.write(section)


if __name__ == "__main__":
    main()
