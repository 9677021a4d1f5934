"""Fused Triton kernels for MoLE inference: gathered LoRA shrink and expand-add (Punica style).

At generation sizes a MoLE block on GPU is bound by kernel launches, not arithmetic (H200,
64 tokens: the frozen block 0.09 ms, plain LoRA 0.28 ms, the ``dense`` MoLE path 2.1-2.4x
LoRA; benchmarks/RESULTS.md). For top-1 routing each adapted projection ``P`` needs

    y_n = P(h_n) + s * g_n * B_{e_n} (A_{e_n} h_n)

for token ``n`` with expert ``e_n`` and gate ``g_n``. Two kernels do it with no permutation, no
masking and no copy of the expert weights, reading only the chosen expert's rows:

* :func:`_shrink_kernel`: one program per (token, block of rank rows),
  ``u_n = s * g_n * A_{e_n} h_n`` (float32, r wide);
* :func:`_expand_add_kernel`: one program per (token, block of outputs), ``y_n += B_{e_n} u_n``
  in place on the base projection's output (the LoRA add is fused).

So a projection costs 2 launches instead of the ``dense`` path's 5 (shrink, gate, weight
re-layout, expand, add). This is the per-token gather-matvec of Punica's BGMV
(https://arxiv.org/abs/2310.18547); tokens never need to be grouped by expert.

The kernels are forward-only (no autograd): :class:`~llava_mole.adapters.mole.MoLEMLP` uses them
(strategy :class:`~llava_mole.adapters.experts.TritonExperts`) with ``dispatch="triton"`` when
no gradient is needed, and the PyTorch paths otherwise. Under
``TRITON_INTERPRET=1`` (Triton's CPU interpreter, used by the tests) the autotuner, which needs
a GPU, is replaced by one fixed configuration.
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: without it, dispatch="triton" falls back to the PyTorch paths.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

HAS_TRITON = triton is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(x: torch.Tensor) -> bool:
    """Whether the kernels can run on ``x``'s device (CUDA, or any device under the interpreter)."""
    return HAS_TRITON and (x.is_cuda or (INTERPRET and x.device.type == "cpu"))


if HAS_TRITON:

    def _tuned(configs: list, key: list[str]):
        """``triton.autotune`` on a GPU; the first config alone under the interpreter."""
        if INTERPRET:
            fixed = configs[0]

            def pin(kernel):
                def launch(grid, *args, **kwargs):
                    return kernel[grid](*args, **kwargs, **fixed.kwargs)

                return launch

            return pin

        def tune(kernel):
            tuned = triton.autotune(configs=configs, key=key)(kernel)  # one cache per kernel

            def launch(grid, *args, **kwargs):
                return tuned[grid](*args, **kwargs)

            return launch

        return tune

    @triton.jit
    def _shrink_kernel(
        x_ptr,
        a_ptr,
        expert_ptr,
        gate_ptr,
        u_ptr,
        rank,
        stride_x,
        stride_ae,
        stride_ar,
        scaling,
        D_IN: tl.constexpr,  # constexpr: a model has two widths, and the loop bound must be static
        R_PAD: tl.constexpr,  # under the interpreter (runtime loop bounds fail there with numpy 2.5)
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        n = tl.program_id(0)
        e = tl.load(expert_ptr + n)
        g = tl.load(gate_ptr + n).to(tl.float32)
        # Rank rows are split over programs too: with one token (decoding) a single program
        # would read the whole r x d_in expert matrix alone.
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < rank
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for start in range(0, D_IN, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_ok = cols < D_IN
            xv = tl.load(x_ptr + n * stride_x + cols, mask=col_ok, other=0.0).to(tl.float32)
            av = tl.load(
                a_ptr + e * stride_ae + rows[:, None] * stride_ar + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(av * xv[None, :], axis=1)
        tl.store(u_ptr + n * R_PAD + rows, acc * (g * scaling), mask=row_ok)

    @triton.jit
    def _expand_add_kernel(
        u_ptr,
        b_ptr,
        expert_ptr,
        y_ptr,
        d_out,
        rank,
        stride_be,
        stride_bo,
        stride_y,
        R_PAD: tl.constexpr,
        BLOCK_O: tl.constexpr,
    ):
        n = tl.program_id(0)
        e = tl.load(expert_ptr + n)
        outs = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        out_ok = outs < d_out
        rows = tl.arange(0, R_PAD)
        row_ok = rows < rank
        u = tl.load(u_ptr + n * R_PAD + rows, mask=row_ok, other=0.0)
        bv = tl.load(
            b_ptr + e * stride_be + outs[:, None] * stride_bo + rows[None, :],
            mask=out_ok[:, None] & row_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        delta = tl.sum(bv * u[None, :], axis=1)
        y_at = y_ptr + n * stride_y + outs
        y = tl.load(y_at, mask=out_ok, other=0.0).to(tl.float32)
        tl.store(y_at, (y + delta).to(y_ptr.dtype.element_ty), mask=out_ok)

    _warps = (2, 4, 8)
    _shrink = _tuned(
        [
            triton.Config({"BLOCK_R": br, "BLOCK_D": bd}, num_warps=w)
            for br in (16, 32, 64)
            for bd in (64, 128, 256)
            for w in _warps
        ],
        key=["D_IN", "rank"],
    )(_shrink_kernel)
    _expand_add = _tuned(
        [triton.Config({"BLOCK_O": bo}, num_warps=w) for bo in (32, 64, 128) for w in _warps],
        key=["d_out", "rank"],
    )(_expand_add_kernel)


def gathered_lora_add_(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    experts: torch.Tensor,
    gate: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """In place: ``y[n] += scaling * gate[n] * b[e_n] @ (a[e_n] @ x[n])`` for every row ``n``.

    Args:
        y: ``(N, out)`` base projection output, updated in place (no autograd).
        x: ``(N, in)`` projection input.
        a: ``(K, r, in)``; b: ``(K, out, r)`` expert LoRA weights.
        experts: ``(N,)`` chosen expert of each row (any integer dtype).
        gate: ``(N,)`` gate weight of each row.
        scaling: ``alpha / r``.

    Returns:
        ``y``.
    """
    if not HAS_TRITON:
        raise RuntimeError("dispatch='triton' needs the triton package")
    n, d_in = x.shape
    k, rank, _ = a.shape
    d_out = b.shape[1]
    if n == 0:
        return y
    x, a, b = x.contiguous(), a.contiguous(), b.contiguous()
    if y.stride(-1) != 1:
        raise ValueError("gathered_lora_add_ needs an output with contiguous rows")
    r_pad = max(triton.next_power_of_2(rank), 2)
    experts = experts.to(torch.int32).contiguous()
    gate = gate.to(torch.float32).contiguous()
    u = torch.empty(n, r_pad, device=x.device, dtype=torch.float32)
    _shrink(
        lambda meta: (n, triton.cdiv(rank, meta["BLOCK_R"])),
        x,
        a,
        experts,
        gate,
        u,
        rank,
        x.stride(0),
        a.stride(0),
        a.stride(1),
        float(scaling),
        D_IN=d_in,
        R_PAD=r_pad,
    )
    _expand_add(
        lambda meta: (n, triton.cdiv(d_out, meta["BLOCK_O"])),
        u,
        b,
        experts,
        y,
        d_out,
        rank,
        b.stride(0),
        b.stride(1),
        y.stride(0),
        R_PAD=r_pad,
    )
    return y
