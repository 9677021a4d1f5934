"""The benchmark's variants all compute the same block: each against a float64 reference.

Runs ``check_correctness`` from ``benchmarks/bench_mole.py`` at tiny sizes. No timing here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # end to end; `-m 'not slow'` leaves it out

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_mole.py"
TOL = 1e-5  # float32 against float64


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_mole", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_mole"] = module  # dataclasses resolve annotations through sys.modules
    threads = torch.get_num_threads()
    # Tiny tensors gain nothing from threads, and one thread cannot stall on a busy machine.
    torch.set_num_threads(1)
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("bench_mole", None)


@pytest.mark.parametrize(
    ("tokens", "num_experts", "rank", "auto_path"),
    [
        (96, 4, 8, "dense"),  # CPU: auto picks dense up to K * r = 32
        (200, 4, 32, "loop"),  # many tokens, K * r > 32: auto picks the grouped loop on CPU
        (1, 2, 8, "dense"),  # one generated token
        (37, 8, 8, "loop"),  # odd count, some experts idle
    ],
)
def test_every_variant_matches_float64(bench, tokens, num_experts, rank, auto_path):
    rows = bench.check_correctness(
        "cpu", torch.float32, d_model=32, d_ff=88, tokens=tokens, num_experts=num_experts, rank=rank
    )
    assert [r["variant"] for r in rows] == list(bench.VARIANTS)
    for row in rows:
        if row["variant"] in bench.FORWARD_ONLY:  # CUDA-only kernels: a stated reason, no numbers
            assert row["error"].startswith("not run:") and row["out_err"] is None, row
            continue
        assert row["error"] is None, row
        assert row["out_err"] <= TOL, row
        assert row["grad_x_err"] <= TOL, row
        assert row["grad_param_err"] <= TOL, row
    assert next(r for r in rows if r["variant"] == "mole")["path"] == auto_path


def test_check_detects_a_wrong_variant(bench, monkeypatch):
    """A peer that forgets the gate on its deltas must fail the check (the check can fail)."""

    def ungated(self, name, h, k, g):
        z = torch.nn.functional.linear(h, self.lora_A[name][k]) * self.scaling
        return torch.nn.functional.linear(z, self.lora_B[name][k])

    monkeypatch.setattr(bench.PeerMoLE, "_delta", ungated)
    rows = bench.check_correctness("cpu", torch.float32, d_model=32, d_ff=88, tokens=64)
    errors = {r["variant"]: r["out_err"] for r in rows}
    assert errors["peer_index_loop"] > 1e-3 and errors["peer_sorted_split"] > 1e-3
    assert errors["mole"] <= TOL and errors["lora"] <= TOL


def test_goals_and_tables_from_records(bench):
    """Ratios, goal verdicts and the markdown table from hand-made records."""
    records = []
    for variant, ms in [("base", 8.0), ("lora", 10.0), ("mole", 11.0)]:
        records.append(
            {
                "device": "cpu",
                "mode": "train",
                "tokens": 64,
                "num_experts": 4,
                "rank": 16,
                "variant": variant,
                "median_ms": ms,
                "ratio_to_lora": ms / 10.0,
                "ratio_to_base": ms / 8.0,
                "peak_mem_mb": 100.0 if variant != "mole" else 104.0,
                "foreign_load": 0.0,
                "path": "dense" if variant == "mole" else None,
            }
        )
    goals = {g["goal"]: g["status"] for g in bench.evaluate_goals(records)}
    assert goals["CPU train: MoLE <= 1.15x LoRA"] == "PASS"
    assert goals["CPU train memory: MoLE peak <= 1.05x LoRA peak"] == "PASS"
    assert goals["GPU train (K=4,8): MoLE <= 1.05x LoRA"] == "SKIP"
    records[2]["ratio_to_lora"] = 1.2
    goals = {g["goal"]: g["status"] for g in bench.evaluate_goals(records)}
    assert goals["CPU train: MoLE <= 1.15x LoRA"] == "FAIL"
    table = bench.markdown_tables(records, [])
    assert "| CPU | train | 64 | 4 | 16 |" in table and "| 1.20 |" in table


@pytest.fixture(scope="module")
def gpu_session_smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """``gpu_session.sh OUT --smoke`` once for the module: it runs ``bench_e2e.py --smoke
    --decode --device cpu --json OUT/e2e.json`` in a fresh process (one run, two tests: the
    end-to-end smoke used to run a second time in-process)."""
    out = tmp_path_factory.mktemp("gpu_session")
    done = subprocess.run(
        ["bash", str(SCRIPT.parent / "gpu_session.sh"), str(out), "--smoke"],
        cwd=SCRIPT.parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return done, out


def test_end_to_end_benchmark_runs_on_cpu_at_tiny_sizes(gpu_session_smoke):
    """``bench_e2e.py --smoke``: every variant trains and decodes, every goal ratio is computed."""
    done, out = gpu_session_smoke
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((out / "e2e.json").read_text())
    kinds = {(r["variant"], r["kind"]) for r in result["rows"]}
    assert kinds == {
        ("peft_lora", "train"),
        ("lora", "train"),
        ("mole", "train"),
        ("lora", "decode"),
        ("lora_merged", "decode"),
        ("mole", "decode"),
    }
    assert all(r["tokens_per_s"] > 0 for r in result["rows"])
    assert set(result["ratios"]) == {
        "mole_step_vs_lora",
        "lora_step_vs_peft",
        "mole_decode_vs_lora_b1",
    }  # no peak memory and no batch 8 on the CPU smoke plan
    assert result["device_type"] == "cpu"
    assert (out / "e2e.json").is_file()


def test_gpu_session_script_smoke_mode(gpu_session_smoke):
    """The one GPU-session command runs here first, on CPU at tiny sizes, and writes its JSON."""
    done, out = gpu_session_smoke
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "mole_step_vs_lora" in done.stdout
    assert (out / "e2e.json").is_file()
