"""Peak memory of reading a large Hugging Face parquet split through a mixture (CPU).

Writes a synthetic DocVQA-like split (question, 3 reference answers, an id and a small PNG
embedded as a `datasets` Image struct per row) to a temporary folder, in row groups of 10k rows,
then measures, each in a fresh process so that the peaks do not mix:

* ``prepare``: the first `load_dataset` of the parquet file, i.e. its one-off conversion into
  the `datasets` Arrow cache (later runs memory-map that cache);
* ``iterate``: `iter_hf_samples` over the mixture entry, keeping nothing -- the reader itself;
* ``iterate+verify``: the same, opening and ``verify()``-ing every embedded image;
* ``load_split``: `load_split` of the mixture (what training and evaluation call): it keeps a
  `Sample` per row (text + an `EmbeddedImage` reference), the images stay in the mapped file.

* ``open`` (the reference level): imports (torch, transformers, `datasets`) and opening the
  cached split, memory-mapped, without reading rows.

Peak RSS is ``ru_maxrss`` of that process (it includes the interpreter, the imports and file
pages of the memory-mapped Arrow cache that were touched). Usage::

    python benchmarks/bench_hf_data.py               # 200k rows, prints a table
    python benchmarks/bench_hf_data.py --rows 20000 --json out.json
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

PHASES = ("prepare", "open", "iterate", "iterate+verify", "load_split")


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
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


def run_phase(phase: str, mixture: Path) -> dict:
    """Runs one phase in this process and returns its measurements."""
    from llava_mole.data.hf import iter_hf_samples, open_hf_split, resolve_columns
    from llava_mole.data.images import image_checker
    from llava_mole.data.mixture import load_mixture, load_split

    start = time.perf_counter()
    out: dict = {"phase": phase}
    spec = load_mixture(mixture).datasets[0]
    if phase == "load_split":
        samples, report = load_split(mixture, "train", verify_images=False)
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


def child(phase: str, folder: Path) -> dict:
    env = {**os.environ, "HF_DATASETS_CACHE": str(folder / "hf-cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--phase", phase, "--folder", str(folder)]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:  # a child process
        print(json.dumps(run_phase(args.phase, Path(args.folder) / "mixture.yaml")))
        return
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        size = write_parquet(folder / "synth.parquet", args.rows)
        print(
            f"wrote {args.rows} rows, {size / 2**20:.1f} MiB parquet in {time.perf_counter() - t:.0f} s"
        )
        write_mixture(folder)
        results = [child(phase, folder) for phase in PHASES]
        cache_mb = sum(f.stat().st_size for f in (folder / "hf-cache").rglob("*.arrow")) / 2**20
    print(f"Arrow cache: {cache_mb:.1f} MiB")
    level = next(r["peak_rss_mb"] for r in results if r["phase"] == "open")
    print(f"{'phase':<16}{'peak RSS MiB':>14}{'above open':>12}{'seconds':>10}{'samples':>10}")
    for r in results:
        r["above_open_mb"] = round(r["peak_rss_mb"] - level, 1)
        row = f"{r['phase']:<16}{r['peak_rss_mb']:>14}{r['above_open_mb']:>12}{r['seconds']:>10}"
        print(row + f"{r.get('samples', ''):>10}")
    if args.json:
        meta = {
            "commit": _commit(),
            "cpu": _cpu(),
            "rows": args.rows,
            "parquet_mb": round(size / 2**20, 1),
            "arrow_mb": round(cache_mb, 1),
        }
        Path(args.json).write_text(json.dumps({**meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
