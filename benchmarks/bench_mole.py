"""Speed, memory and correctness of one MoLE MLP block against plain LoRA and peer strategies.

One run measures, side by side and interleaved, for every (number of experts K, LoRA rank r):

* ``base``: the frozen SwiGLU block alone;
* ``lora``: this package's plain LoRA (:class:`LoRALinear` on gate, up and down);
* ``mole``: this package's :class:`MoLEMLP` with ``dispatch="auto"``, and each explicit path as
  ``mole_loop``, ``mole_dense``, ``mole_grouped_mm``, ``mole_triton`` (the fused inference
  kernels: generation rows on CUDA only; elsewhere the row says why it was not run);
* peer strategies written here with the same routing semantics (top-1, raw router probability
  as the gate on the LoRA deltas): ``peer_index_loop`` (per-expert ``nonzero`` + ``index_add``),
  ``peer_sorted_split`` (``argsort`` + split by host counts + per-expert matmul + un-sort by
  indexing) and ``peer_dense_masked`` (every expert's full LoRA on every token, weighted sum).

Modes: ``train`` (forward + backward w.r.t. the block input and the adapter parameters, base
frozen), ``generate`` (forward under ``no_grad``, 1 and 64 tokens) and, on CUDA,
``generate_graph`` (the same forward captured once as a CUDA graph and replayed: kernel time
without launch overhead). Every variant is also
checked against a float64 reference at a small size (:func:`check_correctness`).

Usage: ``python benchmarks/bench_mole.py [--device cpu|cuda] [--quick] [--json OUT] [--no-append]``
(see ``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llava_mole.adapters.config import MoLEConfig
from llava_mole.adapters.dispatch import choose_path
from llava_mole.adapters.lora import LoRALinear
from llava_mole.adapters.mole import MoLEMLP

HERE = Path(__file__).resolve().parent
PROJS = ("gate_proj", "up_proj", "down_proj")
MOLE_PATHS = ("loop", "dense", "grouped_mm", "triton")
PEERS = ("index_loop", "sorted_split", "dense_masked")
VARIANTS = (
    "base",
    "lora",
    "mole",
    *(f"mole_{p}" for p in MOLE_PATHS),
    *(f"peer_{p}" for p in PEERS),
)


# ---------------------------------------------------------------------------------------------
# The modules under test
# ---------------------------------------------------------------------------------------------
class SwiGLU(nn.Module):
    """A LLaMA-style MLP block: ``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype, "bias": False}
        self.gate_proj = nn.Linear(d_model, d_ff, **kw)
        self.up_proj = nn.Linear(d_model, d_ff, **kw)
        self.down_proj = nn.Linear(d_ff, d_model, **kw)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LoRAMLP(nn.Module):
    """The package's plain-LoRA baseline on an MLP block (what ``mode="lora"`` injects)."""

    def __init__(self, base: SwiGLU, rank: int, alpha: float) -> None:
        super().__init__()
        for name in PROJS:
            setattr(self, name, LoRALinear(getattr(base, name), rank, alpha, 0.0))
        self.act_fn = base.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PeerMoLE(nn.Module):
    """MoLE semantics implemented with the dispatch strategies of other projects.

    Same parameter layout as :class:`MoLEMLP` (``lora_A[proj]`` ``(K, r, in)``, ``lora_B[proj]``
    ``(K, out, r)``, float32 ``router``) so gradients can be compared name by name. The token's
    expert ``e`` is the router argmax and its gate ``g`` the raw softmax probability; every
    projection ``P`` becomes ``P(h) + g * s * B_e A_e h``.

    Strategies:
        ``index_loop``: HF-Mixtral / MixLoRA style. Base gate and up run once on all tokens; then
            for each expert ``nonzero`` finds its tokens, gathers them by indexing, adds the
            expert's gate/up deltas, runs down (base + delta) on them and ``index_add_``s the
            result into the output. Idle experts are skipped.
        ``sorted_split``: the official LLaVA-MoLE release's way: ``argsort`` the expert index
            once, reorder by indexing, run the base projections on the sorted tokens, split them
            by ``bincount(...).tolist()`` and apply each expert's delta with its own matmuls,
            concatenate, and un-sort the block output by indexing (backward: scatter).
        ``dense_masked``: X-LoRA / LoRAMoE style: every expert's full LoRA (shrink and expand)
            runs on every token and the ``out``-wide results are summed with the routing weights
            (zero for unchosen experts).
    """

    def __init__(self, base: SwiGLU, source: MoLEMLP, strategy: str) -> None:
        super().__init__()
        if strategy not in PEERS:
            raise ValueError(f"unknown peer strategy {strategy!r}")
        self.strategy = strategy
        for name in PROJS:
            setattr(self, name, getattr(base, name))
        self.act_fn = base.act_fn
        self.scaling = source.scaling
        self.num_experts = source.num_experts
        self.lora_A = nn.ParameterDict(
            {n: nn.Parameter(p.detach().clone()) for n, p in source.lora_A.items()}
        )
        self.lora_B = nn.ParameterDict(
            {n: nn.Parameter(p.detach().clone()) for n, p in source.lora_B.items()}
        )
        self.router = nn.Linear(
            base.gate_proj.in_features,
            source.num_experts,
            bias=False,
            device=source.router.weight.device,
            dtype=torch.float32,
        )
        with torch.no_grad():
            self.router.weight.copy_(source.router.weight)

    def _routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(F.linear(x.float(), self.router.weight), dim=-1)
        gate, expert = probs.max(dim=-1)
        return gate, expert

    def _delta(self, name: str, h: torch.Tensor, k: int, g: torch.Tensor) -> torch.Tensor:
        """``g * s * B_k A_k h`` for rows ``h`` that all belong to expert ``k``."""
        z = F.linear(h, self.lora_A[name][k])
        z = z * (g.unsqueeze(1).to(z.dtype) * self.scaling)
        return F.linear(z, self.lora_B[name][k])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        gate, expert = self._routing(flat)
        out = getattr(self, f"_forward_{self.strategy}")(flat, gate, expert)
        return out.view(*shape[:-1], -1)

    def _forward_index_loop(self, x, gate, expert):
        g_all = self.gate_proj(x)
        u_all = self.up_proj(x)
        out = torch.zeros(x.shape[0], self.down_proj.out_features, dtype=x.dtype, device=x.device)
        for k in range(self.num_experts):
            idx = torch.nonzero(expert == k).squeeze(1)
            if idx.numel() == 0:
                continue
            xk, gk = x[idx], gate[idx]
            hg = g_all[idx] + self._delta("gate_proj", xk, k, gk)
            hu = u_all[idx] + self._delta("up_proj", xk, k, gk)
            h = self.act_fn(hg) * hu
            yk = self.down_proj(h) + self._delta("down_proj", h, k, gk)
            out = out.index_add(0, idx, yk)
        return out

    def _forward_sorted_split(self, x, gate, expert):
        order = torch.argsort(expert)
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()
        xs, gs = x[order], gate[order]
        g_chunks = gs.split(counts)

        def proj(name: str, h: torch.Tensor) -> torch.Tensor:
            deltas = [
                self._delta(name, hk, k, gk)
                for k, (hk, gk) in enumerate(zip(h.split(counts), g_chunks))
            ]
            return getattr(self, name)(h) + torch.cat(deltas)

        hs = self.act_fn(proj("gate_proj", xs)) * proj("up_proj", xs)
        ys = proj("down_proj", hs)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return ys[inverse]

    def _forward_dense_masked(self, x, gate, expert):
        weights = torch.zeros(x.shape[0], self.num_experts, device=x.device, dtype=gate.dtype)
        weights = weights.scatter(1, expert.unsqueeze(1), gate.unsqueeze(1)).to(x.dtype)

        def proj(name: str, h: torch.Tensor) -> torch.Tensor:
            y = getattr(self, name)(h)
            a, b = self.lora_A[name], self.lora_B[name]
            for k in range(self.num_experts):
                full = F.linear(F.linear(h, a[k]), b[k]) * self.scaling
                y = y + weights[:, k : k + 1] * full
            return y

        h = self.act_fn(proj("gate_proj", x)) * proj("up_proj", x)
        return proj("down_proj", h)


def _init_for_bench(mole: MoLEMLP, d_model: int, rank: int, seed: int) -> None:
    """Non-zero ``B`` (fresh LoRA has ``B = 0``) and a router that spreads tokens evenly."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in mole.lora_B.values():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / math.sqrt(rank)))
        w = mole.router.weight
        w.copy_(torch.randn(w.shape, generator=gen) / math.sqrt(d_model))


def build_variants(
    d_model: int,
    d_ff: int,
    num_experts: int,
    rank: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    variants: tuple[str, ...] = VARIANTS,
) -> tuple[dict[str, nn.Module], dict[str, str], SwiGLU]:
    """All variants over one shared frozen base block, with identical adapter weights.

    Returns ``(modules, kinds, base)``; ``kinds[v]`` is ``"base"``, ``"lora"`` or ``"mole"``
    (which float64 reference the variant must match).
    """
    torch.manual_seed(seed)
    base = SwiGLU(d_model, d_ff, device=device, dtype=dtype).requires_grad_(False)
    lora = LoRAMLP(base, rank, 2.0 * rank)
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name in PROJS:
            b = getattr(lora, name).lora_B
            b.copy_(torch.randn(b.shape, generator=gen) * (0.5 / math.sqrt(rank)))

    def mole_block(dispatch: str) -> MoLEMLP:
        cfg = MoLEConfig(
            mode="mole",
            rank=rank,
            alpha=2.0 * rank,
            dropout=0.0,
            num_experts=num_experts,
            dispatch=dispatch,
        )
        return MoLEMLP(base, cfg, 0, None)

    source = mole_block("auto")
    _init_for_bench(source, d_model, rank, seed)
    modules: dict[str, nn.Module] = {}
    kinds: dict[str, str] = {}
    for v in variants:
        if v == "base":
            modules[v], kinds[v] = base, "base"
        elif v == "lora":
            modules[v], kinds[v] = lora, "lora"
        elif v == "mole":
            modules[v], kinds[v] = source, "mole"
        elif v.startswith("mole_"):
            block = mole_block(v[len("mole_") :])
            block.load_state_dict(source.state_dict())
            modules[v], kinds[v] = block, "mole"
        elif v.startswith("peer_"):
            modules[v], kinds[v] = PeerMoLE(base, source, v[len("peer_") :]), "mole"
        else:
            raise ValueError(f"unknown variant {v!r}")
    return modules, kinds, base


# ---------------------------------------------------------------------------------------------
# Correctness against float64
# ---------------------------------------------------------------------------------------------
def _reference(
    kind: str, module: nn.Module, base: SwiGLU, x: torch.Tensor, dy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Float64 output, input gradient and parameter gradients, straight from the definition.

    The expert of each token is the argmax of the float32 router logits computed exactly as the
    block computes them (so a float32/float64 near-tie cannot flip a decision); the gate value
    and everything else is float64.
    """
    xd = x.detach().double().requires_grad_(True)
    leaves = {
        n: p.detach().double().requires_grad_(True)
        for n, p in module.named_parameters()
        if p.requires_grad
    }
    weights = {n: getattr(base, n).weight.detach().double() for n in PROJS}
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if kind == "lora":
        for n in PROJS:
            adapters[n] = (leaves[f"{n}.lora_A"].unsqueeze(0), leaves[f"{n}.lora_B"].unsqueeze(0))
        expert = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        gate = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
        scaling = module.gate_proj.scaling
    elif kind == "mole":
        for n in PROJS:
            adapters[n] = (leaves[f"lora_A.{n}"], leaves[f"lora_B.{n}"])
        router = leaves["router.weight"]
        expert = F.linear(x.float(), router.detach().float()).argmax(-1)
        probs = torch.softmax(xd @ router.T, dim=-1)
        gate = probs.gather(1, expert.unsqueeze(1)).squeeze(1)
        scaling = module.scaling
    else:
        scaling = 0.0

    def proj(name: str, h: torch.Tensor) -> torch.Tensor:
        y = h @ weights[name].T
        if name in adapters:
            a, b = adapters[name]
            z = torch.einsum("nri,ni->nr", a[expert], h) * (gate * scaling).unsqueeze(1)
            y = y + torch.einsum("nor,nr->no", b[expert], z)
        return y

    y = proj("down_proj", F.silu(proj("gate_proj", xd)) * proj("up_proj", xd))
    names = list(leaves)
    grads = torch.autograd.grad((y * dy.double()).sum(), [xd, *leaves.values()])
    return y.detach(), grads[0], dict(zip(names, grads[1:]))


def rel_err(value: torch.Tensor | None, ref: torch.Tensor) -> float:
    """``max|value - ref| / max|ref|`` (``None`` counts as zeros: a skipped idle expert)."""
    ref = ref.detach().double()
    value = torch.zeros_like(ref) if value is None else value.detach().double()
    scale = ref.abs().max().item()
    diff = (value - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def check_correctness(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    d_model: int = 64,
    d_ff: int = 176,
    tokens: int = 96,
    num_experts: int = 4,
    rank: int = 8,
    seed: int = 0,
    variants: tuple[str, ...] = VARIANTS,
) -> list[dict[str, Any]]:
    """Every variant against the float64 reference at one small size, same weights and routing.

    Returns one dict per variant: ``variant``, ``kind``, ``path`` (``mole`` only: what ``auto``
    picked), ``out_err``, ``grad_x_err``, ``grad_param_err`` (max over adapter/router parameters)
    as :func:`rel_err`, and ``error`` (the exception text when the variant failed to run).
    """
    device = torch.device(device)
    modules, kinds, base = build_variants(
        d_model, d_ff, num_experts, rank, device, dtype, seed, variants
    )
    gen = torch.Generator().manual_seed(seed + 3)
    x = torch.randn(tokens, d_model, generator=gen).to(device=device, dtype=dtype)
    dy = torch.randn(tokens, d_model, generator=gen).to(device=device, dtype=dtype)
    rows = []
    for name, module in modules.items():
        row: dict[str, Any] = {
            "variant": name,
            "kind": kinds[name],
            "dtype": str(dtype).replace("torch.", ""),
            "tokens": tokens,
            "num_experts": num_experts,
            "rank": rank,
            "path": _auto_path(module, x) if name == "mole" else None,
            "error": None,
        }
        if name in FORWARD_ONLY:
            rows.append(_check_forward_only(row, module, kinds[name], base, x, dy, device))
            continue
        try:
            xg = x.clone().requires_grad_(True)
            params = {n: p for n, p in module.named_parameters() if p.requires_grad}
            for p in params.values():
                p.grad = None
            y = module(xg)
            y.backward(dy)
            ref_y, ref_gx, ref_gp = _reference(kinds[name], module, base, x, dy)
            row["out_err"] = rel_err(y, ref_y)
            row["grad_x_err"] = rel_err(xg.grad, ref_gx)
            row["grad_param_err"] = max(
                (rel_err(params[n].grad, g) for n, g in ref_gp.items()), default=0.0
            )
        except Exception as exc:  # report, do not hide: the row carries the error
            row.update(out_err=None, grad_x_err=None, grad_param_err=None, error=repr(exc))
        rows.append(row)
    return rows


FORWARD_ONLY = ("mole_triton",)  # inference kernels: generation rows only, CUDA only


# Variants that read counts on the host: a CUDA graph cannot capture them (and a failed capture
# can leave the stream unusable for the variants after it), so graph rows skip them.
HOST_SYNC = ("mole_loop", "peer_index_loop", "peer_sorted_split")


def _not_run_reason(name: str, mode: str, device: torch.device) -> str | None:
    if mode == "generate_graph" and name in HOST_SYNC:
        return "not run: synchronises with the host, so it cannot be captured as a CUDA graph"
    if name not in FORWARD_ONLY:
        return None
    if device.type != "cuda":
        return "not run: the Triton kernels are timed on CUDA only"
    if mode == "train":
        return "not run: forward-only kernels (training uses the autograd paths)"
    return None


def _check_forward_only(row, module, kind, base, x, dy, device) -> dict[str, Any]:
    reason = _not_run_reason(row["variant"], "generate", device)
    if reason:
        return {**row, "out_err": None, "grad_x_err": None, "grad_param_err": None, "error": reason}
    try:
        with torch.no_grad():
            y = module(x)
        ref_y, _, _ = _reference(kind, module, base, x, dy)
        return {**row, "out_err": rel_err(y, ref_y), "grad_x_err": None, "grad_param_err": None}
    except Exception as exc:  # report, do not hide
        return {
            **row,
            "out_err": None,
            "grad_x_err": None,
            "grad_param_err": None,
            "error": repr(exc),
        }


def _auto_path(module: nn.Module, x: torch.Tensor) -> str | None:
    if not isinstance(module, MoLEMLP):
        return None
    return choose_path(module.dispatch, x, module.num_experts, module.rank, module.top_k)


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Step:
    """One training step (forward + backward) or one generation forward of a variant."""

    def __init__(self, module: nn.Module, x: torch.Tensor, dy: torch.Tensor, mode: str) -> None:
        self.module, self.mode, self.dy = module, mode, dy
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.x = x.detach().clone().requires_grad_(mode == "train")

    def reset(self) -> None:
        for p in self.params:
            p.grad = None
        self.x.grad = None

    def __call__(self) -> None:
        if self.mode == "train":
            self.reset()
            self.module(self.x).backward(self.dy)
        else:
            with torch.no_grad():
                self.module(self.x)


class GraphStep(Step):
    """A generation forward captured once as a CUDA graph and replayed: kernel time without the
    launch overhead that dominates eager generation at 1-64 tokens."""

    def __init__(self, module: nn.Module, x: torch.Tensor, dy: torch.Tensor, mode: str) -> None:
        super().__init__(module, x, dy, "generate")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(3):  # warm up (allocations, autotuning) outside the capture
                module(self.x)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.out = module(self.x)

    def __call__(self) -> None:
        self.graph.replay()


def time_interleaved(
    steps: dict[str, Step],
    device: torch.device,
    warmup: int,
    repeats: int,
    min_sample_s: float,
    max_load: float | None = None,
    max_rounds: int | None = None,
) -> tuple[dict[str, list[float]], list[float]]:
    """Per-call seconds of every step, timed in rounds that rotate through the variants.

    Each round times every variant once (in a rotated order, so slow drift of the machine hits
    all of them alike). A sample times ``inner`` back-to-back calls (calibrated on the warmup so
    that it lasts at least ``min_sample_s``) and divides; CUDA work is synchronised around each
    sample. With ``max_load`` (CPU), rounds during which other processes used more cores than
    that do not count: rounds go on (at most ``max_rounds``) until ``repeats`` clean ones were
    timed, and the ``repeats`` least disturbed rounds are kept.

    Returns ``(samples, loads)``: per-variant seconds and the other-process load of each kept
    round (``0.0`` where it cannot be read).
    """
    inner: dict[str, int] = {}
    for name, step in steps.items():
        for _ in range(max(warmup - 1, 0)):
            step()
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        once = time.perf_counter() - t0
        inner[name] = max(1, min(1000, math.ceil(min_sample_s / max(once, 1e-7))))
    names = list(steps)
    rounds: list[tuple[float, dict[str, float]]] = []
    limit = max(repeats, max_rounds or repeats)
    while len(rounds) < limit:
        shift = len(rounds) % max(len(names), 1)
        timed: dict[str, float] = {}
        with ForeignLoad() as foreign:
            for name in names[shift:] + names[:shift]:
                step, n = steps[name], inner[name]
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(n):
                    step()
                _sync(device)
                timed[name] = (time.perf_counter() - t0) / n
        rounds.append((foreign.value or 0.0, timed))
        clean = sum(load < max_load for load, _ in rounds) if max_load is not None else len(rounds)
        if clean >= repeats:
            break
    if max_load is not None:
        rounds = sorted(rounds, key=lambda r: r[0])[:repeats]
    samples = {n: [timed[n] for _, timed in rounds] for n in names}
    return samples, [load for load, _ in rounds]


class ForeignLoad:
    """CPU time used by *other* processes while a block runs, in cores (Linux ``/proc/stat``).

    ``(busy CPU time of the whole machine - this process's CPU time) / wall time``: 0 on an idle
    machine, about 1 when another process keeps one core busy. CPU timings taken under a foreign
    load of a sizeable fraction of the cores are unreliable (OpenMP threads wait for each other
    while one of them is descheduled), so the benchmark records it next to every group.
    """

    def __init__(self) -> None:
        self.value: float | None = None

    @staticmethod
    def _busy_s() -> float | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except (OSError, IndexError):
            return None
        ticks = [int(v) for v in fields]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        guest = sum(ticks[8:10])  # already counted in user / nice
        return (sum(ticks) - idle - guest) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> ForeignLoad:
        self._busy, self._own, self._wall = self._busy_s(), time.process_time(), time.time()
        return self

    def __exit__(self, *exc) -> None:
        busy, wall = self._busy_s(), time.time() - self._wall
        if busy is None or self._busy is None or wall <= 0:
            return
        own = time.process_time() - self._own
        self.value = max(0.0, (busy - self._busy - own) / wall)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence C-level stderr (the profiler prints start/stop lines) for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_mb(step: Step, device: torch.device) -> float | None:
    """Peak extra memory of one step above the level at its start, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the running
    sum of the CPU allocator's alloc/free events recorded by ``torch.profiler`` with
    ``profile_memory=True`` (every tensor PyTorch allocates; not oneDNN/MKL internal scratch,
    not the Python heap). Gradients of the previous step are released before the start.
    """
    step.reset()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - start
        step.reset()
        return peak / 2**20
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        with _quiet_stderr():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                step()
            prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    deltas = sorted(
        (float(e["ts"]), int(e["args"].get("Bytes", 0)))
        for e in events
        if e.get("name") == "[memory]" and int(e.get("args", {}).get("Device Type", 0)) == 0
    )
    step.reset()
    if not deltas:
        return None
    running = peak = 0
    for _, nbytes in deltas:
        running += nbytes
        peak = max(peak, running)
    return peak / 2**20


def saved_activations_mb(step: Step) -> float | None:
    """MiB of tensors autograd saves for backward in one training forward (activation memory).

    Counted once per storage, parameters (frozen base and adapters) excluded: what grows with
    the number of tokens and stays alive until backward. ``None`` for generation.
    """
    if step.mode != "train":
        return None
    resident = {p.untyped_storage().data_ptr() for p in step.module.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in resident:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    step.reset()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step.module(step.x)
    del out
    return sum(saved.values()) / 2**20


# ---------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    device: str
    dtype: str
    d_model: int
    d_ff: int
    train_tokens: int
    gen_tokens: tuple[int, ...]
    experts: tuple[int, ...]
    ranks: tuple[int, ...]
    warmup: int
    train_repeats: int
    gen_repeats: int
    min_sample_s: float
    seed: int = 0
    max_other_load: float | None = None
    max_rounds_factor: int = 4
    variants: tuple[str, ...] = VARIANTS
    measure_memory: bool = True
    cuda_graphs: bool = True  # CUDA: also time generation as CUDA-graph replays


def default_plan(device: str, quick: bool) -> Plan:
    """Sizes per device. CUDA: one LLaMA-7B MLP block. CPU: scaled so a run fits the budget."""
    if device == "cuda":
        return Plan(
            device="cuda",
            dtype="bfloat16",
            d_model=4096,
            d_ff=11008,
            train_tokens=4096 if quick else 16384,
            gen_tokens=(1, 64),
            experts=(4, 8) if quick else (2, 4, 8),
            ranks=(128,) if quick else (16, 128),
            warmup=3,
            train_repeats=5 if quick else 10,
            gen_repeats=10 if quick else 20,
            min_sample_s=0.01,
        )
    if quick:
        return Plan(
            device="cpu",
            dtype="float32",
            d_model=512,
            d_ff=1376,
            train_tokens=512,
            gen_tokens=(1, 64),
            experts=(2, 8),
            ranks=(16, 128),
            warmup=1,
            train_repeats=3,
            gen_repeats=5,
            min_sample_s=0.01,
        )
    return Plan(
        device="cpu",
        dtype="float32",
        d_model=1024,
        d_ff=2752,
        # 4 tokens per model dimension, as at the CUDA training size (16384 at d=4096): fewer
        # would make the K x adapter gradients look larger next to the activations than they are.
        train_tokens=4096,
        gen_tokens=(1, 64),
        experts=(2, 4, 8),
        ranks=(16, 128),
        warmup=1,
        train_repeats=3,
        gen_repeats=9,
        min_sample_s=0.02,
    )


def wait_for_quiet(limit: float, max_wait_s: float, log: Callable[[str], None]) -> float | None:
    """Sleep until other processes use fewer than ``limit`` cores over a 1 s window."""
    waited = 0.0
    while True:
        with ForeignLoad() as probe:
            time.sleep(1.0)
        waited += 1.0
        if probe.value is None or probe.value < limit or waited >= max_wait_s:
            if waited > 1.0:
                level = "n/a" if probe.value is None else f"{probe.value:.2f}"
                log(f"  waited {waited:.0f}s for a quiet machine (other load {level})")
            return probe.value


def time_group(
    modules: dict[str, nn.Module],
    plan: Plan,
    mode: str,
    tokens: int,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Time all variants on one (mode, tokens) setting; one record per variant."""
    device = torch.device(plan.device)
    dtype = getattr(torch, plan.dtype)
    gen = torch.Generator().manual_seed(plan.seed + tokens)
    x = torch.randn(tokens, plan.d_model, generator=gen).to(device, dtype)
    dy = torch.randn(tokens, plan.d_model, generator=gen).to(device, dtype)
    steps: dict[str, Step] = {}
    errors: dict[str, str] = {}
    for name, module in modules.items():
        reason = _not_run_reason(name, mode, device)
        if reason:
            errors[name] = reason
            continue
        try:
            step = (GraphStep if mode == "generate_graph" else Step)(module, x, dy, mode)
            step()  # first call: also proves the variant runs here
            steps[name] = step
        except Exception as exc:  # recorded in the row, the run goes on
            errors[name] = repr(exc)
    repeats = plan.train_repeats if mode == "train" else plan.gen_repeats
    filtering = plan.max_other_load is not None and device.type == "cpu"
    if filtering:
        wait_for_quiet(plan.max_other_load, 30.0, log)
    samples, loads = time_interleaved(
        steps,
        device,
        plan.warmup,
        repeats,
        plan.min_sample_s,
        max_load=plan.max_other_load if filtering else None,
        max_rounds=plan.max_rounds_factor * repeats if filtering else None,
    )
    load = statistics.mean(loads) if loads else None
    if filtering and max(loads, default=0.0) >= plan.max_other_load:
        log(
            f"  could not get {repeats} quiet rounds; kept the least disturbed (mean load {load:.2f})"
        )
    group = []
    for name, module in modules.items():
        rec: dict[str, Any] = {
            "device": plan.device,
            "mode": mode,
            "tokens": tokens,
            "num_experts": getattr(module, "num_experts", None),
            "rank": None,
            "variant": name,
            "dtype": plan.dtype,
            "d_model": plan.d_model,
            "d_ff": plan.d_ff,
            "path": _auto_path(module, x) if name == "mole" else None,
            "median_ms": None,
            "min_ms": None,
            "repeats": repeats,
            "peak_mem_mb": None,
            "saved_mb": None,
            "mem_method": None,
            "foreign_load": load if device.type == "cpu" else None,
            "foreign_load_max": max(loads, default=None) if device.type == "cpu" else None,
            "threads": torch.get_num_threads(),
            "cpus": _usable_cpus(),
            "param_grad_mb": sum(p.numel() * p.element_size() for p in steps[name].params) / 2**20
            if mode == "train" and name in steps
            else None,
            "error": errors.get(name),
        }
        if name in samples:
            ms = [t * 1e3 for t in samples[name]]
            rec["median_ms"] = statistics.median(ms)
            rec["min_ms"] = min(ms)
            if plan.measure_memory:
                rec["peak_mem_mb"] = peak_memory_mb(steps[name], device)
                rec["saved_mb"] = saved_activations_mb(steps[name])
                rec["mem_method"] = (
                    "cuda.max_memory_allocated"
                    if device.type == "cuda"
                    else "cpu allocator events (torch.profiler)"
                )
        group.append(rec)
    by_name = {r["variant"]: r for r in group}
    for rec in group:
        for ref in ("lora", "base"):
            ref_ms = by_name.get(ref, {}).get("median_ms")
            ok = rec["median_ms"] is not None and ref_ms
            rec[f"ratio_to_{ref}"] = rec["median_ms"] / ref_ms if ok else None
    return group


def run_benchmark(plan: Plan, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Time every variant for every (mode, tokens, K, r) group; one record per measurement."""
    device = torch.device(plan.device)
    dtype = getattr(torch, plan.dtype)
    records: list[dict[str, Any]] = []
    settings = [("train", plan.train_tokens)] + [("generate", n) for n in plan.gen_tokens]
    if device.type == "cuda" and plan.cuda_graphs:
        settings += [("generate_graph", n) for n in plan.gen_tokens]
    for rank in plan.ranks:
        for k in plan.experts:
            modules, _, _ = build_variants(
                plan.d_model, plan.d_ff, k, rank, device, dtype, plan.seed, plan.variants
            )
            for mode, tokens in settings:
                t0 = time.perf_counter()
                group = time_group(modules, plan, mode, tokens, log)
                for rec in group:  # base and LoRA are timed with every (K, r) group
                    rec["num_experts"], rec["rank"] = k, rank
                records.extend(group)
                log(_group_line(group, time.perf_counter() - t0))
            del modules
    return records


def _group_line(group: list[dict[str, Any]], seconds: float) -> str:
    r0 = group[0]
    head = f"[{r0['mode']:8s} n={r0['tokens']:<5d} K={r0['num_experts']} r={r0['rank']:<3d}]"
    parts = []
    for rec in group:
        if rec["median_ms"] is None:
            parts.append(f"{rec['variant']}=ERR")
        elif rec["variant"] in ("base", "lora"):
            parts.append(f"{rec['variant']}={rec['median_ms']:.2f}ms")
        else:
            parts.append(f"{rec['variant']}={rec['ratio_to_lora']:.2f}x")
    load = r0.get("foreign_load")
    busy = "" if load is None else f", other processes used {load:.2f} cores"
    return f"{head} " + " ".join(parts) + f" ({seconds:.1f}s{busy})"


# ---------------------------------------------------------------------------------------------
# Goals and reporting
# ---------------------------------------------------------------------------------------------
DISTURBED_MARGIN = 0.25  # cores of other load, beyond the cores a run leaves free


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def disturbed(rec: dict[str, Any]) -> bool:
    """A CPU row timed while other processes competed for this run's cores.

    Other load up to the cores the run leaves free (``cpus - threads``) does not compete; above
    that by more than :data:`DISTURBED_MARGIN`, threads were descheduled while timed.
    """
    load = rec.get("foreign_load")
    if load is None:
        return False
    threads = rec.get("threads") or 1
    free = max((rec.get("cpus") or threads) - threads, 0)
    return load > free + DISTURBED_MARGIN


def evaluate_goals(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The performance targets (not asserts): PASS / FAIL / SKIP with the worst case."""

    def pick(device, mode, experts=None, tokens=None):
        return [
            r
            for r in records
            if r["device"] == device
            and r["mode"] == mode
            and r["variant"] == "mole"
            and r["median_ms"] is not None
            and (experts is None or r["num_experts"] in experts)
            and (tokens is None or r["tokens"] == tokens)
        ]

    def goal(name, rows, key, limit, timing=True):
        rows = [r for r in rows if r.get(key) is not None]
        if not rows:
            return {"goal": name, "status": "SKIP", "detail": "no rows measured"}
        worst = max(rows, key=lambda r: r[key])
        status = "PASS" if worst[key] <= limit else "FAIL"
        failing = sum(r[key] > limit for r in rows)
        detail = (
            f"worst {worst[key]:.3f}x (limit {limit}x) at {worst['mode']} n={worst['tokens']} "
            f"K={worst['num_experts']} r={worst['rank']}; {failing}/{len(rows)} over the limit"
        )
        noisy = sum(disturbed(r) for r in rows) if timing else 0
        if noisy:
            detail += f"; {noisy} of these rows were timed on a busy machine (unreliable)"
        return {"goal": name, "status": status, "detail": detail}

    goals = [
        goal("CPU train: MoLE <= 1.15x LoRA", pick("cpu", "train"), "ratio_to_lora", 1.15),
        goal(
            "GPU train (K=4,8): MoLE <= 1.05x LoRA",
            pick("cuda", "train", (4, 8)),
            "ratio_to_lora",
            1.05,
        ),
        goal(
            "GPU train (K=4,8): MoLE <= 1.12x base",
            pick("cuda", "train", (4, 8)),
            "ratio_to_base",
            1.12,
        ),
        goal(
            "GPU generate (64 tokens): MoLE <= 1.3x LoRA",
            pick("cuda", "generate", tokens=64),
            "ratio_to_lora",
            1.3,
        ),
        goal(
            "GPU generate (64 tokens, CUDA-graph replay): MoLE <= 1.3x LoRA",
            pick("cuda", "generate_graph", tokens=64),
            "ratio_to_lora",
            1.3,
        ),
    ]
    for device in ("cpu", "cuda"):
        rows = []
        lora_mem = {
            (r["tokens"], r["num_experts"], r["rank"]): r["peak_mem_mb"]
            for r in records
            if r["device"] == device
            and r["mode"] == "train"
            and r["variant"] == "lora"
            and r["peak_mem_mb"]
        }
        for r in pick(device, "train"):
            ref = lora_mem.get((r["tokens"], r["num_experts"], r["rank"]))
            if ref and r["peak_mem_mb"] is not None:
                rows.append({**r, "mem_ratio": r["peak_mem_mb"] / ref})
        label = "CPU" if device == "cpu" else "GPU"
        goals.append(
            goal(
                f"{label} train memory: MoLE peak <= 1.05x LoRA peak",
                rows,
                "mem_ratio",
                1.05,
                timing=False,
            )
        )
    return goals


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def markdown_tables(records: list[dict[str, Any]], correctness: list[dict[str, Any]]) -> str:
    """Ratio table (one row per group), memory table (train) and correctness table."""
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in records)]
    shown = [v for v in variants if v not in ("base", "lora")]
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in records:
        key = (r["device"], r["mode"], r["tokens"], r["num_experts"], r["rank"])
        groups.setdefault(key, {})[r["variant"]] = r
    lines = [
        "Times are medians; every variant column is **time / plain-LoRA time** of the same row "
        "(lower is better); `base` is the frozen block alone. `auto` is the path "
        '`dispatch="auto"` picked. `other load`: cores kept busy by other processes while the '
        "row was timed; a CPU row is unreliable when it exceeds the cores the run left free "
        "(CPUs - threads) by more than 0.25.",
        "",
        "| device | mode | tokens | K | r | other load | base ms | LoRA ms | base | auto | "
        + " | ".join(shown)
        + " |",
        "|" + "---|" * (10 + len(shown)),
    ]
    for key, row in groups.items():
        device, mode, tokens, k, rank = key
        base_ms = row.get("base", {}).get("median_ms")
        lora_ms = row.get("lora", {}).get("median_ms")
        cells = [
            device.upper() if device == "cpu" else "GPU",
            mode,
            str(tokens),
            str(k),
            str(rank),
            _fmt(next(iter(row.values())).get("foreign_load"), ".2f"),
            _fmt(base_ms, ".2f" if (base_ms or 0) < 100 else ".0f"),
            _fmt(lora_ms, ".2f" if (lora_ms or 0) < 100 else ".0f"),
            _fmt(row.get("base", {}).get("ratio_to_lora")),
            str(row.get("mole", {}).get("path") or "n/a"),
        ]
        for v in shown:
            rec = row.get(v)
            if rec is not None and rec["median_ms"] is not None:
                cells.append(_fmt(rec["ratio_to_lora"]))
            elif rec is not None and str(rec.get("error") or "").startswith("not run"):
                cells.append("–")  # not applicable here (the JSON row says why)
            else:
                cells.append("ERR")
        lines.append("| " + " | ".join(cells) + " |")

    train = [k for k in groups if k[1] == "train"]
    if train:
        lines += [
            "",
            "Peak extra memory of one training step, MiB (method: see `memory` above); the "
            "`grads` columns are the size of the adapter gradients included in the peak (MoLE "
            "has K times LoRA's adapter parameters); `saved` columns are the activations autograd "
            "keeps for backward (unique storages, parameters excluded):",
            "",
            "| device | tokens | K | r | "
            + " | ".join(variants)
            + " | MoLE / LoRA | grads: LoRA | grads: MoLE | saved: LoRA | saved: MoLE |",
            "|" + "---|" * (9 + len(variants)),
        ]
        for key in train:
            row = groups[key]
            device, _, tokens, k, rank = key
            mem = {v: row.get(v, {}).get("peak_mem_mb") for v in variants}
            ratio = mem["mole"] / mem["lora"] if mem.get("mole") and mem.get("lora") else None
            cells = [device.upper() if device == "cpu" else "GPU", str(tokens), str(k), str(rank)]
            cells += [_fmt(mem[v], ".1f") for v in variants] + [_fmt(ratio, ".3f")]
            cells += [_fmt(row.get(v, {}).get("param_grad_mb"), ".1f") for v in ("lora", "mole")]
            cells += [_fmt(row.get(v, {}).get("saved_mb"), ".1f") for v in ("lora", "mole")]
            lines.append("| " + " | ".join(cells) + " |")

    if correctness:
        c0 = correctness[0]
        lines += [
            "",
            f"Correctness against float64 (`max|err| / max|ref|`; {c0['tokens']} tokens, "
            f"K={c0['num_experts']}, r={c0['rank']}, same weights and routing for all):",
            "",
            "| dtype | variant | auto path | output | input grad | param grads | error |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in correctness:
            lines.append(
                f"| {c['dtype']} | {c['variant']} | {c['path'] or ''} | "
                f"{_fmt(c['out_err'], '.1e')} | {_fmt(c['grad_x_err'], '.1e')} | "
                f"{_fmt(c['grad_param_err'], '.1e')} | {c['error'] or ''} |"
            )
    return "\n".join(lines)


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": _usable_cpus(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=10,
        )
        commit = out.stdout.strip()
        if out.returncode != 0 or not commit:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def results_section(meta: dict[str, Any], tables: str, goals: list[dict[str, Any]]) -> str:
    m, p = meta["machine"], meta["plan"]
    device = "GPU" if p["device"] == "cuda" else "CPU"
    what = f"GPU: {m['gpu']} (CUDA {m['cuda']})" if p["device"] == "cuda" else "CPU only"
    mem = (
        "`torch.cuda.max_memory_allocated` during one step minus the memory allocated at its start"
        if p["device"] == "cuda"
        else "running sum of CPU-allocator alloc/free events from `torch.profiler` "
        "(`profile_memory=True`) during one step, above the level at its start; counts every "
        "PyTorch tensor, not oneDNN/MKL scratch"
    )
    lines = [
        f"## {meta['date']}: {device} run{' (quick)' if meta['quick'] else ''}",
        "",
        f"- **Device: {device}** ({what}); CPU {m['cpu']} ({m['logical_cpus']} logical CPUs), "
        f"torch {m['torch']}, threads: {m['threads']}",
        f"- commit: `{meta['commit']}`",
        f"- command: `{meta['command']}`",
        f"- sizes: d_model={p['d_model']}, d_ff={p['d_ff']}, {p['dtype']}, train tokens "
        f"{p['train_tokens']}, generate tokens {', '.join(map(str, p['gen_tokens']))}; "
        f"median of {p['train_repeats']} (train) / {p['gen_repeats']} (generate) interleaved "
        f"samples after warmup",
        f"- memory: {mem}",
        f"- load average at start: {meta.get('loadavg', 'n/a')}; total run time "
        f"{meta['elapsed_s']} s",
    ]
    noisy = {
        (r["mode"], r["tokens"], r["num_experts"], r["rank"])
        for r in meta.get("records", [])
        if disturbed(r)
    }
    if noisy:
        lines.append(
            f"- **warning**: {len(noisy)} rows were timed while other processes used more than "
            f"the {m.get('usable_cpus', m['logical_cpus'])} - {m['threads']} cores this run left free "
            f"(+{DISTURBED_MARGIN}, column `other load`); their ratios are unreliable"
        )
    if meta.get("rendered"):
        lines.append(f"- {meta['rendered']}")
    lines += [
        "",
        tables,
        "",
        "Goals (targets, not asserts):",
        "",
    ]
    lines += [f"- {g['status']}: {g['goal']} ({g['detail']})" for g in goals]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--quick", action="store_true", help="small plan (CPU < 60 s)")
    parser.add_argument("--json", type=Path, default=None, help="write all records here")
    parser.add_argument("--no-append", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--experts", type=int, nargs="+", default=None, help="override K list")
    parser.add_argument("--ranks", type=int, nargs="+", default=None, help="override ranks")
    parser.add_argument("--train-tokens", type=int, default=None)
    parser.add_argument("--gen-tokens", type=int, nargs="*", default=None)
    parser.add_argument("--d-model", type=int, default=None)
    parser.add_argument("--d-ff", type=int, default=None)
    parser.add_argument(
        "--max-other-load",
        type=float,
        default=None,
        help="CPU: discard timing rounds during which other processes used more cores than "
        "this and time more rounds (up to --max-rounds-factor x the repeats) instead",
    )
    parser.add_argument("--max-rounds-factor", type=int, default=4)
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=None, help="time only these variants"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        help="measure nothing: print (and append unless --no-append) the section of a JSON "
        "written by --json, e.g. one measured on another machine",
    )
    args = parser.parse_args(argv)
    if args.render is not None:
        payload = json.loads(args.render.read_text())
        cpus = payload["meta"]["machine"].get(
            "usable_cpus", payload["meta"]["machine"].get("logical_cpus")
        )
        for rec in payload["records"]:
            rec.setdefault("cpus", cpus)
        payload["meta"]["rendered"] = (
            f"section rendered from the run's JSON by `python benchmarks/bench_mole.py --render "
            f"{args.render.name}` (commit {_git_commit()})"
        )
        payload["goals"] = evaluate_goals(payload["records"])
        report(payload, None, args.results, not args.no_append)
        return 0

    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    print(
        f"torch {torch.__version__}; torch.set_num_threads({threads}) -> "
        f"{torch.get_num_threads()} threads"
    )
    plan = default_plan(device_name, args.quick)
    overrides = {
        "experts": tuple(args.experts) if args.experts else None,
        "ranks": tuple(args.ranks) if args.ranks else None,
        "train_tokens": args.train_tokens,
        "gen_tokens": tuple(args.gen_tokens) if args.gen_tokens is not None else None,
        "d_model": args.d_model,
        "d_ff": args.d_ff,
        "max_other_load": args.max_other_load,
        "max_rounds_factor": args.max_rounds_factor,
        "variants": tuple(v for v in VARIANTS if v in args.variants) if args.variants else None,
        "measure_memory": False if args.no_memory else None,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(plan, key, value)
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 correctness check is exact-ish
    print(f"plan: {asdict(plan)}")
    started = time.perf_counter()
    load_at_start = _loadavg()

    correctness = check_correctness(device, torch.float32)
    if device.type == "cuda" and plan.dtype != "float32":
        correctness += check_correctness(device, getattr(torch, plan.dtype))
    for c in correctness:
        print(
            f"correctness {c['dtype']:8s} {c['variant']:18s} out {_fmt(c['out_err'], '.1e')} "
            f"grad_x {_fmt(c['grad_x_err'], '.1e')} grad_params {_fmt(c['grad_param_err'], '.1e')}"
            + (f" ERROR {c['error']}" if c["error"] else "")
        )

    records = run_benchmark(plan)
    goals = evaluate_goals(records)
    elapsed = time.perf_counter() - started
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(device),
        "commit": _git_commit(),
        "command": "python "
        + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "quick": args.quick,
        "plan": asdict(plan),
        "elapsed_s": round(elapsed, 1),
        "loadavg": load_at_start,
    }
    payload = {"meta": meta, "records": records, "correctness": correctness, "goals": goals}
    report(payload, args.json, args.results, not args.no_append)
    return 0


def report(payload: dict[str, Any], json_out: Path | None, results: Path, append: bool) -> None:
    """Print the tables and goals; write the JSON; append the section to ``results``."""
    meta, records, goals = payload["meta"], payload["records"], payload["goals"]
    tables = markdown_tables(records, payload["correctness"])
    print()
    print(tables)
    print()
    for g in goals:
        print(f"{g['status']}: {g['goal']} -- {g['detail']}")
    print(f"total {meta['elapsed_s']}s")
    if json_out:
        json_out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {json_out}")
    if append:
        with results.open("a") as fh:
            fh.write("\n" + results_section({**meta, "records": records}, tables, goals))
        print(f"appended a section to {results}")


if __name__ == "__main__":
    raise SystemExit(main())
