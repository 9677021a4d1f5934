"""Token routing and expert dispatch: the one implementation used for training and inference.

A MoLE block sends each token to ``top_k`` of ``K`` LoRA experts. Only the rank-r LoRA deltas
differ between experts, so the block either

* **groups** tokens by expert once (``argsort`` of the expert index), runs the whole SwiGLU block
  in that order, and un-sorts the output once (paths ``loop`` and ``grouped_mm``), or
* computes every expert's rank-r shrink densely as one GEMM over ``K * r`` columns, zeroes the
  columns of unchosen experts and expands with one GEMM (path ``dense``). With ``K * r`` small
  next to the model width this costs about as much as LoRA and needs no permutation, which makes
  it the right choice for short inputs (generation) and for ``top_k > 1``.

This module holds the routing and the tensor operations of each path; :mod:`.experts` wraps
each path as a strategy that :class:`~llava_mole.adapters.mole.MoLEMLP` composes with.

Permutations are :class:`PermuteRows` so that their backward is a gather with the inverse
permutation instead of the scatter-add that ``x[order]`` would use (much slower on GPU). Nothing
in the ``grouped_mm`` and ``dense`` paths synchronises host and device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kernels import triton_usable

# Widest expert concatenation (K * r) for which ``auto`` uses the dense path on CPU.
CPU_DENSE_MAX_COLUMNS = 32

_HAS_GROUPED_MM = hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offs)


class _RouterLogits(torch.autograd.Function):
    """``x @ W.T`` in float32 that keeps ``x`` (not a float32 copy of it) for backward.

    ``W`` is float32 except where an engine casts the whole module (DeepSpeed bf16 keeps its
    float32 master copy in the optimizer): the product is float32 either way.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x.float(), weight.float())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.float()).to(x.dtype)
        if ctx.needs_input_grad[1]:
            # The float32 copy of x lives only during this product.
            grad_w = (grad.t() @ x.float()).to(weight.dtype)
        return grad_x, grad_w


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Float32 router logits ``(N, K)`` of ``(N, d)`` tokens in any dtype.

    Same numbers as ``F.linear(x.float(), weight)``, but for a bf16/fp16 ``x`` autograd keeps
    ``x`` itself, which the block's projections keep anyway, instead of a float32 copy: at
    16384 tokens of width 4096 that copy was 256 MiB per block (H200 benchmark, ``saved``
    column), the whole of MoLE's activation-memory excess over LoRA in the dense path.
    """
    if x.dtype == torch.float32 or not (x.requires_grad or weight.requires_grad):
        return F.linear(x.float(), weight.float())
    return _RouterLogits.apply(x, weight)


@dataclass
class Routing:
    """Router decision for ``N`` tokens.

    Attributes:
        probs: softmax of the router logits, float32 ``(N, K)``.
        experts: chosen experts ``(N, top_k)``, int64.
        weights: gate weight of each chosen expert ``(N, top_k)``, float32 (ones when the
            gate weighting is ``"none"``).
    """

    probs: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor

    def dense_weights(self) -> torch.Tensor:
        """``(N, K)`` gate weights, zero for experts a token was not sent to."""
        dense = torch.zeros_like(self.probs)
        return dense.scatter(1, self.experts, self.weights)

    def one_hot(self) -> torch.Tensor:
        """``(N, K)`` float indicator of the chosen experts."""
        return torch.zeros_like(self.probs).scatter(1, self.experts, 1.0)


def route(
    logits: torch.Tensor, top_k: int = 1, gate_weighting: str = "prob", normalize: bool = False
) -> Routing:
    """Top-k routing in float32.

    With ``top_k=1`` the weight is the raw max probability (not renormalised): a renormalised
    single weight is always 1 and the language-model loss could not train the router.

    Args:
        logits: router logits ``(N, K)``.
        top_k: experts per token.
        gate_weighting: ``"prob"``, ``"none"`` (weight 1, the official release's behaviour) or
            ``"straight"``: weight ``p / stop_gradient(p)``, exactly 1 in value (the delta keeps
            LoRA's full scale, as with ``"none"``) with the gradient of ``log p`` for the router.
        normalize: renormalise the top-k probabilities to sum to one (``"prob"`` only).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    top_p, experts = probs.topk(top_k, dim=-1)
    if gate_weighting == "none":
        weights = torch.ones_like(top_p)
    elif gate_weighting == "straight":
        weights = top_p / top_p.detach()
    elif normalize:
        weights = top_p / top_p.sum(dim=-1, keepdim=True)
    else:
        weights = top_p
    return Routing(probs=probs, experts=experts, weights=weights)


@dataclass
class ExpertGrouping:
    """Tokens sorted by expert, computed once per block and reused by gate, up and down.

    Attributes:
        order: ``order[i]`` is the token at sorted position ``i``.
        inverse: inverse permutation (``inverse[order[i]] == i``).
        counts: tokens per expert ``(K,)``.
        offsets: int32 cumulative ends of each expert's rows, as ``grouped_mm`` expects.
    """

    order: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def from_experts(cls, experts: torch.Tensor, num_experts: int) -> ExpertGrouping:
        """Group by a top-1 expert index ``(N,)`` without host synchronisation."""
        order = torch.argsort(experts, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        # scatter_add, not bincount: bincount on CUDA reads the max index on the host.
        counts = torch.zeros(num_experts, dtype=torch.long, device=experts.device)
        counts.scatter_add_(0, experts, torch.ones_like(experts))
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        return cls(order=order, inverse=inverse, counts=counts, offsets=offsets)


class PermuteRows(torch.autograd.Function):
    """``x[perm]`` whose backward gathers with the inverse permutation (no scatter-add)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Reorder rows of ``x`` by the permutation ``perm`` (``inverse`` is its inverse)."""
    return PermuteRows.apply(x, perm, inverse)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``grouped_mm``'s backward on torch 2.13 CPU fails on stride-0 gradients (e.g. from
    ``y.sum()``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _aligned_for_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # grouped_mm needs every row stride to be a multiple of 16 bytes.
    step = 16 // x.element_size()
    return x.shape[-1] % step == 0 and weight.shape[-2] % step == 0


def grouped_linear(
    x_sorted: torch.Tensor, weight: torch.Tensor, grouping: ExpertGrouping, path: str
) -> torch.Tensor:
    """Per-expert ``x @ weight[k].T`` on rows already sorted by expert.

    Args:
        x_sorted: ``(N, in)`` rows grouped by expert.
        weight: ``(K, out, in)`` expert weights.
        grouping: the block's :class:`ExpertGrouping`.
        path: ``"loop"`` (one matmul per expert; reads the counts on the host, for CPU) or
            ``"grouped_mm"`` (one fused kernel, no host sync; falls back to the loop for widths
            that are not multiples of 16 bytes, which the kernel refuses).

    Returns:
        ``(N, out)`` in sorted order. Every expert takes part in the graph, even with zero rows,
        so each gets a (zero) gradient and DDP needs no ``find_unused_parameters``.
    """
    if path == "grouped_mm" and _aligned_for_grouped_mm(x_sorted, weight):
        out = _grouped_mm(x_sorted.contiguous(), weight.transpose(1, 2), grouping.offsets)
        return _ContiguousGrad.apply(out)
    chunks = x_sorted.split(grouping.counts.tolist())
    return torch.cat([F.linear(chunk, w) for chunk, w in zip(chunks, weight.unbind(0))])


class _SortedShrink(torch.autograd.Function):
    """``grouped_linear(x[order], a)`` that keeps ``x``, not its sorted copy, for backward."""

    @staticmethod
    def forward(ctx, x, a, grouping: ExpertGrouping, path: str) -> torch.Tensor:
        ctx.save_for_backward(x, a)
        ctx.grouping, ctx.path = grouping, path
        return grouped_linear(x.index_select(0, grouping.order).to(a.dtype), a, grouping, path)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, a = ctx.saved_tensors
        grouping = ctx.grouping
        # Rebuild the sorted rows (one gather) and redo the rank-r shrink under autograd: the
        # gradients then come from the same grouped kernels as the forward.
        xs = x.index_select(0, grouping.order).to(a.dtype).requires_grad_(True)
        a_ = a.detach().requires_grad_(True)
        with torch.enable_grad():
            h = grouped_linear(xs, a_, grouping, ctx.path)
        grad_xs, grad_a = torch.autograd.grad(h, (xs, a_), grad)
        grad_x = grad_xs.index_select(0, grouping.inverse).to(x.dtype)
        return (
            grad_x if ctx.needs_input_grad[0] else None,
            grad_a if ctx.needs_input_grad[1] else None,
            None,
            None,
        )


def sorted_shrink(
    x: torch.Tensor, a: torch.Tensor, grouping: ExpertGrouping, path: str
) -> torch.Tensor:
    """Expert shrink ``A_e x`` of unsorted rows ``x``, returned in expert order.

    Equal to ``grouped_linear(x[order], a)``, but autograd keeps ``x`` (which the block's router
    keeps anyway) instead of the sorted copy: without LoRA dropout the grouped path then saves
    no activation that LoRA does not. Backward pays one gather and one rank-r GEMM.
    """
    return _SortedShrink.apply(x, a, grouping, path)


class _ScaleRows(torch.autograd.Function):
    """``h * w`` (``w`` broadcast over the last dim) that keeps only the product for backward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = h * w
        ctx.save_for_backward(out, w)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, w = ctx.saved_tensors
        grad_h = grad * w if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            # d(h w)/dw = h = out / w. A zero weight (an expert the token was not sent to, or a
            # softmax probability that underflowed, whose upstream gradient carries a factor of
            # that same zero probability) gets a zero gradient.
            wf = w.float()
            dot = (grad.float() * out.float()).sum(-1, keepdim=True)
            grad_w = torch.where(wf == 0, 0.0, dot / torch.where(wf == 0, 1.0, wf)).to(w.dtype)
        return grad_h, grad_w


def scale_rows(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Gate the experts' rank-r activations: ``h * w`` with ``w`` of shape ``(..., 1)``.

    Equal to ``h * w``, but when ``w`` needs a gradient (a learned router) autograd keeps only
    the product, which the expand GEMM that follows keeps anyway, instead of ``h`` as well:
    one ``N x r`` activation per projection less, so that MoLE saves no more for backward than
    LoRA (whose constant scaling needs nothing). ``dL/dw = sum(dL/d(hw) * hw) / w``.
    """
    if not (torch.is_grad_enabled() and w.requires_grad):
        return h * w
    return _ScaleRows.apply(h, w)


def sorted_lora_delta(
    x_sorted: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    gate_sorted: torch.Tensor,
    scaling: float,
    grouping: ExpertGrouping,
    path: str,
    shrunk: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expert LoRA delta ``scaling * g * B_e A_e x`` on rows sorted by expert ``e``.

    Args:
        x_sorted: ``(N, in)`` rows grouped by expert (dropout applied); unused with ``shrunk``.
        a: ``(K, r, in)``; b: ``(K, out, r)``.
        gate_sorted: ``(N, 1)`` gate weight of each row.
        scaling: ``alpha / r``.
        grouping: the block's grouping; path: see :func:`grouped_linear`.
        shrunk: ``A_e x`` already computed (e.g. by :func:`sorted_shrink`), ``(N, r)``.
    """
    h = shrunk if shrunk is not None else grouped_linear(x_sorted.to(a.dtype), a, grouping, path)
    h = scale_rows(h, gate_sorted.to(h.dtype) * scaling)
    out_dtype = x_sorted.dtype if x_sorted is not None else h.dtype
    return grouped_linear(h, b, grouping, path).to(out_dtype)


def dense_shrink(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert's gated rank-r activations and the matching concatenated ``B``.

    ``h[:, k*r:(k+1)*r] = gate_k * A_k x`` (zero for unchosen experts), so that
    ``h @ b_cat.T = sum_k gate_k * B_k A_k x``: one GEMM over ``K * r`` columns to shrink and one
    to expand, which the caller may accumulate into the base output (``add_expand_``).

    Args:
        x: ``(N, in)``; a: ``(K, r, in)``; b: ``(K, out, r)``.
        gate: ``(N, K)`` routing weights times the LoRA scaling, in the adapter dtype (computed
            once per block and shared by its projections; see :meth:`Routing.dense_weights`).

    Returns:
        ``h`` ``(N, K * r)`` and ``b_cat`` ``(out, K * r)``.
    """
    k, r, _ = a.shape
    h = F.linear(x.to(a.dtype), a.reshape(k * r, -1)).view(-1, k, r)
    h = scale_rows(h, gate.unsqueeze(-1)).view(-1, k * r)
    return h, b.permute(1, 0, 2).reshape(b.shape[1], k * r)


def choose_path(requested: str, x: torch.Tensor, num_experts: int, rank: int, top_k: int) -> str:
    """Pick a dispatch path.

    ``triton`` (opt-in): the fused kernels of :mod:`.kernels` for top-1 forwards without
    gradient on CUDA (or under Triton's interpreter); anything else falls back to ``auto``.
    ``auto``: ``dense`` for ``top_k > 1``. On CPU: ``dense`` for ``K * r <= 32`` and ``loop``
    beyond. Dense reads every expert's weights: at model width 1024 it measured slower than the
    loop from ``K * r >= 64`` (up to 2.4x LoRA at K=8, r=128) and equal at ``K * r = 32``; at the
    tiny model's width (128) the loop's per-expert small operations cost more than dense's
    extra columns up to ``K * r = 32`` (training step 1.07-1.26x LoRA dense vs 1.25-1.35x loop;
    benchmarks/RESULTS.md, CPU sections).
    On CUDA (H200, bf16, one LLaMA-7B MLP block; benchmarks/RESULTS.md, GPU section): ``dense``
    for few tokens per expert (generation: 2.1-2.4x LoRA against 3.2-3.6x for ``grouped_mm``
    and 4-8x for ``loop``, all launch-bound) and for ``K * r <= 256`` (training at 16384 tokens:
    1.10-1.15x LoRA against 1.20-1.23x); ``grouped_mm`` beyond (1.19-1.20x against 1.26-1.45x
    dense at ``K * r`` of 512 and 1024) for bf16, ``loop`` for other dtypes (``grouped_mm`` takes
    bf16 only on CUDA).
    """
    if requested == "triton":
        # Forward-only kernels: used where no gradient is needed (generation, evaluation).
        if top_k == 1 and not torch.is_grad_enabled() and triton_usable(x):
            return "triton"
        requested = "auto"
    if requested != "auto":
        if requested == "grouped_mm" and not _HAS_GROUPED_MM:
            raise RuntimeError("dispatch='grouped_mm' needs torch >= 2.9")
        if requested in ("loop", "grouped_mm") and top_k > 1:
            return "dense"
        return requested
    if top_k > 1:
        return "dense"
    if not x.is_cuda:
        return "dense" if num_experts * rank <= CPU_DENSE_MAX_COLUMNS else "loop"
    if x.shape[0] <= 32 * num_experts or num_experts * rank <= 256:
        return "dense"
    return "grouped_mm" if _HAS_GROUPED_MM and x.dtype == torch.bfloat16 else "loop"
