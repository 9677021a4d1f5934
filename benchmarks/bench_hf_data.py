"""Peak memory of reading a large Hugging Face parquet split through a mixture (CPU).

Writes a synthetic DocVQA-like split (question, 3 reference answers, an id and a small PNG
embedded as a `datasets` Image struct per row) to a temporary folder, in row groups of 10k rows,
and a tiny model directory (`llava_mole.toy.tiny`, or ``--processor DIR`` for a real
model's processor), then measures, each in a fresh process so that the peaks do not mix:

* ``prepare``: the first `load_dataset` of the parquet file, i.e. its one-off conversion into
  the `datasets` Arrow cache (later runs memory-map that cache);
* ``open`` (the reference level of the reading phases): imports (torch, transformers,
  `datasets`) and opening the cached split, memory-mapped, without reading rows;
* ``iterate``: `iter_hf_samples` over the mixture entry, keeping nothing -- the reader itself;
* ``iterate+verify``: the same, opening and ``verify()``-ing every embedded image;
* ``load_split``: `load_split` of the mixture (what training and evaluation call), lazy: it
  keeps the indices of the valid rows (`HFRows` in a `SampleView`);
* ``load_split-eager``: ``load_split(lazy=False)``, a `Sample` per row (the behaviour before
  the lazy path);
* ``open+processor`` (the reference level of the dataset phases): ``open`` plus loading the
  model's processor;
* ``build_datasets``: `build_datasets` (lazy): one pass tokenizes every item to record its
  length and drops; the dataset keeps small per-item arrays;
* ``build_datasets-eager``: ``build_datasets(lazy=False)``: a `Sample` per row and every item's
  token ids and labels kept (the behaviour before);
* ``getitem``: ``build_datasets`` and then ``dataset[i]`` for ``--items`` random items
  (tokenized again, image decoded and processed).

`load_split` and `build_datasets` run with ``verify_images=False`` (verifying, the training
default, adds the ``iterate+verify`` time and about 1 MiB). Peak RSS is ``VmHWM`` of that
process (it includes the interpreter, the imports and file pages of the memory-mapped Arrow
cache that were touched). Usage::

    python benchmarks/bench_hf_data.py               # 200k rows, prints a table
    python benchmarks/bench_hf_data.py --rows 20000 --json out.json
    python benchmarks/bench_hf_data.py --phases open,load_split --processor /data/llava-1.5-7b-hf
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = (
    "prepare",
    "open",
    "iterate",
    "iterate+verify",
    "load_split",
    "load_split-eager",
    "open+processor",
    "build_datasets",
    "build_datasets-eager",
    "getitem",
)
REFERENCE = {"build_datasets": "open+processor", "getitem": "open+processor"}
"""Reference phase of each phase (default: ``open``)."""


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB: ``VmHWM`` of /proc/self/status where
    there is one (``ru_maxrss`` of a child process can report its parent's peak, from before
    the exec), else ``ru_maxrss`` (Linux reports KiB)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_parquet(path: Path, rows: int, group: int = 10_000) -> int:
    """Writes `rows` synthetic rows in row groups of `group`; returns the file size."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    features = datasets.Features(
        {
            "questionId": datasets.Value("int64"),
            "question": datasets.Value("string"),
            "answers": datasets.List(datasets.Value("string")),
            "image": datasets.Image(),
        }
    )
    schema = features.arrow_schema
    with pq.ParquetWriter(str(path), schema) as writer:
        for start in range(0, rows, group):
            n = min(group, rows - start)
            images = []
            for i in range(start, start + n):
                buf = io.BytesIO()
                colour = (i % 251, (i // 251) % 251, 90)
                Image.new("RGB", (24, 24), colour).save(buf, format="PNG")
                images.append({"bytes": buf.getvalue(), "path": None})
            batch = {
                "questionId": list(range(start, start + n)),
                "question": [f"What is the total amount on page {i % 97}?" for i in range(n)],
                "answers": [[f"${i % 1000}.00", f"{i % 1000} dollars", "n/a"] for i in range(n)],
                "image": images,
            }
            writer.write_table(pa.Table.from_pydict(batch, schema=schema))
    return path.stat().st_size


def write_mixture(folder: Path) -> Path:
    mixture = folder / "mixture.yaml"
    mixture.write_text(
        "datasets:\n"
        "  - domain: document\n"
        "    train: synth.parquet\n"
        "    columns: {id: questionId, question: question, answers: answers, image: image}\n"
        "    metric: anls\n",
        encoding="utf-8",
    )
    return mixture


def _dataset_phase(phase: str, mixture: Path, processor_dir: Path, items: int) -> dict:
    from transformers import AutoProcessor

    from llava_mole.data.mixture import build_datasets, load_mixture

    out: dict = {}
    spec = load_mixture(mixture).datasets[0]
    processor = AutoProcessor.from_pretrained(processor_dir)
    if phase == "open+processor":
        from llava_mole.data.hf import open_hf_split

        out["rows"] = len(open_hf_split(spec.source("train")))
        return out
    lazy = None if phase != "build_datasets-eager" else False
    dataset, report = build_datasets(mixture, processor, "train", verify_images=False, lazy=lazy)
    out.update(items=len(dataset), skipped=report.num_skipped, lazy=dataset.lazy)
    if phase == "getitem":
        import random

        built = time.perf_counter()
        order = random.Random(0).sample(range(len(dataset)), min(items, len(dataset)))
        tokens = sum(len(dataset[i]["input_ids"]) for i in order)
        out["getitem_ms"] = round((time.perf_counter() - built) / len(order) * 1000, 2)
        out["getitem_items"] = len(order)
        out["mean_tokens"] = round(tokens / len(order), 1)
    return out


def run_phase(phase: str, folder: Path, items: int) -> dict:
    """Runs one phase in this process and returns its measurements."""
    from llava_mole.data.hf import iter_hf_samples, open_hf_split, resolve_columns
    from llava_mole.data.images import image_checker
    from llava_mole.data.mixture import load_mixture, load_split

    start = time.perf_counter()
    out: dict = {"phase": phase}
    mixture = folder / "mixture.yaml"
    spec = load_mixture(mixture).datasets[0]
    if phase in ("open+processor", "build_datasets", "build_datasets-eager", "getitem"):
        out.update(_dataset_phase(phase, mixture, folder / "model", items))
    elif phase.startswith("load_split"):
        lazy = False if phase.endswith("eager") else None
        samples, report = load_split(mixture, "train", verify_images=False, lazy=lazy)
        out["samples"] = len(samples)
        out["skipped"] = report.num_skipped
    else:
        ds = open_hf_split(spec.source("train"))
        out["rows"] = len(ds)
        if phase.startswith("iterate"):
            roles = resolve_columns(ds.column_names, spec.columns, "synth")
            check = image_checker() if phase.endswith("verify") else None
            kept = sum(
                1
                for _, s, _ in iter_hf_samples(ds, roles, name="synth", check_image=check)
                if not hasattr(s, "reason")
            )
            out["samples"] = kept
    out["seconds"] = round(time.perf_counter() - start, 2)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return out


def child(phase: str, folder: Path, items: int) -> dict:
    env = {**os.environ, "HF_DATASETS_CACHE": str(folder / "hf-cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--phase", phase, "--folder", str(folder)]
    cmd += ["--items", str(items)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _commit() -> str | None:
    here = Path(__file__).resolve().parent
    done = subprocess.run(
        ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or None


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line for line in f if line.startswith("model name")]
    except OSError:
        names = []
    model = names[0].split(":", 1)[1].strip() if names else "unknown"
    return f"{model}, {os.cpu_count()} cores"


def _model(folder: Path, processor: str | None) -> None:
    """The model directory whose processor the dataset phases load: ``folder/model``."""
    if processor is not None:
        (folder / "model").symlink_to(Path(processor).resolve())
        return
    from llava_mole.toy.tiny import make_tiny

    make_tiny(folder / "model", seed=0, pretrain=False, progress=False)


def _table(results: list[dict], rows: int) -> None:
    """Adds the level above each phase's reference (MiB, and bytes per row); prints a table."""
    levels = {r["phase"]: r["peak_rss_mb"] for r in results}
    head = f"{'phase':<22}{'peak RSS MiB':>14}{'above ref':>11}{'B/row':>8}{'seconds':>10}"
    print(head + "  reference")
    for r in results:
        ref = REFERENCE.get(r["phase"].removesuffix("-eager"), "open")
        if ref not in levels:
            ref = "open"
        if ref in levels:
            r["reference"] = ref
            r["above_reference_mb"] = round(r["peak_rss_mb"] - levels[ref], 1)
            r["bytes_per_row"] = round(r["above_reference_mb"] * 2**20 / rows)
        above = r.get("above_reference_mb", "")
        row = f"{r['phase']:<22}{r['peak_rss_mb']:>14}{above:>11}{r.get('bytes_per_row', ''):>8}"
        print(row + f"{r['seconds']:>10}  {r.get('reference', '')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=1000, help="items read by `getitem`")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset")
    parser.add_argument("--processor", default=None, help="model dir (default: the tiny model)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:  # a child process
        print(json.dumps(run_phase(args.phase, Path(args.folder), args.items)))
        return
    phases = [p for p in PHASES if p in args.phases.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        size = write_parquet(folder / "synth.parquet", args.rows)
        print(
            f"wrote {args.rows} rows, {size / 2**20:.1f} MiB parquet in {time.perf_counter() - t:.0f} s"
        )
        write_mixture(folder)
        _model(folder, args.processor)
        results = []
        for phase in phases:
            results.append(child(phase, folder, args.items))
            print(json.dumps(results[-1]), flush=True)
        cache_mb = sum(f.stat().st_size for f in (folder / "hf-cache").rglob("*.arrow")) / 2**20
    print(f"Arrow cache: {cache_mb:.1f} MiB")
    _table(results, args.rows)
    if args.json:
        meta = {
            "commit": _commit(),
            "cpu": _cpu(),
            "rows": args.rows,
            "parquet_mb": round(size / 2**20, 1),
            "arrow_mb": round(cache_mb, 1),
            "processor": args.processor or "tiny model (llava_mole.toy.tiny, 16 image tokens)",
            "command": " ".join(["python", "benchmarks/bench_hf_data.py", *sys.argv[1:]]),
        }
        Path(args.json).write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
